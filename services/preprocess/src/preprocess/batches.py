"""OpenAI Batches, and the direct queue protocol, over RabbitMQ.

A batch is one message per line on the durable `batch.requests` queue
(published with confirms before the batch is reported in progress). Workers
in every preprocess replica run each line through the same pipeline as an
interactive request, store its result in Redis, then ack. Results are stored
with HSETNX keyed by custom_id, so a line delivered twice (a worker killed
after storing, before acking) still has one result and is counted once. The
worker that stores a batch's last result writes the output and error files
(in input order); a status read finishes that work if its worker died.

A line failing for a reason that may pass (a dependency unavailable, a
deadline, a rate limit) is retried with exponential backoff through the
`batch.retry` queue (messages expire back into the requests queue); after
`batch_max_retries` attempts, or at once for a bad request, it fails: its
error goes to the error file, and retry-exhausted messages are copied to
`batch.dead`.

Direct protocol (documented in README): publish to the `requests` exchange,
routing key `request`, a JSON body {"v": 1, "url": ..., "body": {...}} with
`reply_to`, `correlation_id` and `message_id`; the result {"v": 1,
"status_code": ..., "body": ...} goes to `reply_to` with the same
correlation_id. Results are kept per message_id for a day, so a redelivered
request is answered from the stored result, never run twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import aio_pika
import orjson
import redis.asyncio as aioredis
from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractIncomingMessage, AbstractRobustConnection
from prometheus_client import Counter, Gauge

from preprocess.files import BatchLine, FileStore, parse_batch_lines
from preprocess.serving.operations import BATCH_URLS, generates
from preprocess.settings import PreprocessSettings
from ragmesh.amqp import REQUEST_ROUTING_KEY, Topology, connect, consuming, declare_requests, message_headers
from ragmesh.context import request_id_var
from ragmesh.errors import ErrorKind, RagmeshError, invalid_request

log = logging.getLogger(__name__)

LINES = Counter("ragmesh_preprocess_batch_lines_total", "Batch and direct-protocol requests by outcome", ["outcome"])
RUNNING = Gauge("ragmesh_preprocess_batch_lines_running", "Batch lines being worked on by this replica")

SCHEMA_VERSION = 1
RETRY_HEADER = "x-ragmesh-retries"
# Errors that may pass: the line is tried again later.
TRANSIENT = frozenset({ErrorKind.UNAVAILABLE, ErrorKind.DEADLINE, ErrorKind.RATE_LIMITED, ErrorKind.BAD_GATEWAY})
FINAL_STATES = ("completed", "failed", "cancelled", "expired")
# How often a running line looks whether its batch was cancelled (on any replica).
CANCEL_CHECK_SECONDS = 1.0
_CANCELLED = object()

# Runs one request (url, body) through the mesh; returns the response body.
Runner = Callable[[str, dict[str, Any]], Awaitable[dict[str, Any]]]


class BatchStore:
    """Batch state in Redis: the batch object, counters, and one result per custom_id."""

    def __init__(self, redis: aioredis.Redis, namespace: str) -> None:
        self.redis = redis
        self._prefix = f"{namespace or 'ragmesh'}:batch:"

    def key(self, batch_id: str, part: str = "") -> str:
        return f"{self._prefix}{batch_id}{':' + part if part else ''}"

    async def save(self, batch: dict[str, Any]) -> None:
        await self.redis.set(self.key(batch["id"]), orjson.dumps(batch))

    async def load(self, batch_id: str) -> dict[str, Any]:
        raw = await self.redis.get(self.key(batch_id))
        if raw is None:
            raise RagmeshError(
                ErrorKind.NOT_FOUND, f"No such batch: {batch_id}.", param="batch_id", code="batch_not_found"
            )
        batch: dict[str, Any] = orjson.loads(raw)
        counts = await self.redis.hgetall(self.key(batch_id, "counts"))
        done = {_text(k): int(v) for k, v in counts.items()}
        batch["request_counts"] = {
            "total": batch["request_counts"]["total"],
            "completed": done.get("completed", 0),
            "failed": done.get("failed", 0),
        }
        return batch

    async def record(self, batch_id: str, custom_id: str, result: dict[str, Any], ok: bool) -> bool:
        """Store a line's result once; True if this call stored it (and counted it)."""
        stored = await self.redis.hsetnx(self.key(batch_id, "results"), custom_id, orjson.dumps(result))
        if stored:
            await self.redis.hincrby(self.key(batch_id, "counts"), "completed" if ok else "failed", 1)
        return bool(stored)

    async def has_result(self, batch_id: str, custom_id: str) -> bool:
        return bool(await self.redis.hexists(self.key(batch_id, "results"), custom_id))

    async def results(self, batch_id: str) -> dict[str, dict[str, Any]]:
        raw = await self.redis.hgetall(self.key(batch_id, "results"))
        return {_text(k): orjson.loads(v) for k, v in raw.items()}


class Batches:
    """The Batches API, and the workers that run batch lines and direct requests."""

    def __init__(self, settings: PreprocessSettings, redis: aioredis.Redis, files: FileStore, run: Runner) -> None:
        self._settings = settings
        self._redis = redis
        self.files = files
        self._run = run
        self.store = BatchStore(redis, settings.namespace)
        self._topology = Topology(settings.namespace)
        self._connection: AbstractRobustConnection | None = None
        self._publish: AbstractChannel | None = None
        self._exchange: AbstractExchange | None = None
        self._lock = asyncio.Lock()
        self._consumer: asyncio.Task[None] | None = None
        self._direct_prefix = f"{settings.namespace or 'ragmesh'}:direct:"
        self._generating = asyncio.Semaphore(max(1, settings.batch_generation_workers))
        # Per batch: when its status was last read and the read (shared by all its lines in flight).
        self._cancel_reads: dict[str, tuple[float, asyncio.Future[bool]]] = {}

    # --- connection -------------------------------------------------------------------

    async def _channel(self) -> tuple[AbstractChannel, AbstractExchange]:
        async with self._lock:
            if self._connection is None:
                self._connection = await connect(self._settings.amqp_url)
            if self._publish is None or self._publish.is_closed:
                self._publish = await self._connection.channel(publisher_confirms=True)
                await declare_requests(self._publish, self._topology)
                self._exchange = await self._publish.get_exchange(self._topology.requests_exchange)
            assert self._exchange is not None
            return self._publish, self._exchange

    def start_workers(self) -> None:
        """Consume the requests queue in the background (retrying until the broker answers)."""
        if self._settings.batch_workers > 0:
            self._consumer = asyncio.create_task(self._consume())

    async def _consume(self) -> None:
        while True:
            try:
                await self._channel()
                break
            except Exception as exc:  # noqa: BLE001 - the broker may come later
                log.warning("batch workers waiting for RabbitMQ", extra={"error": repr(exc)})
                await asyncio.sleep(2)
        assert self._connection is not None
        worker_channel = await self._connection.channel()
        # Bounded: batch lines use at most this many engine slots, the rest stay for interactive traffic.
        await worker_channel.set_qos(prefetch_count=self._settings.batch_workers)
        queue = await declare_requests(worker_channel, self._topology)
        await queue.consume(self._on_message)
        log.info("batch workers consuming", extra={"queue": queue.name, "concurrency": self._settings.batch_workers})

    async def close(self) -> None:
        if self._consumer is not None:
            self._consumer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._consumer
        if self._connection is not None:
            await self._connection.close()

    async def check(self) -> str:
        try:
            await asyncio.wait_for(self._channel(), timeout=self._settings.publish_timeout)
        except Exception as exc:  # noqa: BLE001 - reported, not raised
            return f"unavailable: {exc!r}"
        return "ok"

    # --- the API ------------------------------------------------------------------------

    async def upload(self, data: bytes, filename: str, purpose: str, owner: str | None) -> dict[str, Any]:
        if purpose != "batch":
            raise invalid_request("Only purpose 'batch' is accepted.", param="purpose")
        if len(data) > self._settings.max_file_bytes:
            raise RagmeshError(
                ErrorKind.PAYLOAD_TOO_LARGE,
                f"A file may hold at most {self._settings.max_file_bytes} bytes.",
                param="file",
            )
        lines = await asyncio.to_thread(parse_batch_lines, data, self._settings.max_file_lines)
        return await self.files.put(data, filename, purpose, len(lines), owner)

    async def create(self, body: Any, owner: str | None) -> dict[str, Any]:
        """Create a batch from an uploaded file; `owner` (the API key id, None with auth off) alone sees it."""
        if not isinstance(body, dict):
            raise invalid_request("The request body must be a JSON object.")
        endpoint = body.get("endpoint")
        if endpoint not in BATCH_URLS:
            raise invalid_request(f"endpoint must be one of {', '.join(BATCH_URLS)}.", param="endpoint")
        if body.get("completion_window", "24h") != "24h":
            raise invalid_request("completion_window must be '24h'.", param="completion_window")
        file_id = body.get("input_file_id")
        if not isinstance(file_id, str):
            raise invalid_request("input_file_id is required.", param="input_file_id")
        lines = parse_batch_lines(await self.files.content(file_id, owner), self._settings.max_file_lines)
        wrong = next((line for line in lines if line.url != endpoint), None)
        if wrong is not None:
            raise invalid_request(
                f"Line {wrong.custom_id!r} asks for {wrong.url}, but the batch's endpoint is {endpoint}.",
                param="input_file_id",
            )
        now = int(time.time())
        batch: dict[str, Any] = {
            "id": f"batch_{uuid.uuid4().hex}",
            "object": "batch",
            "endpoint": endpoint,
            "errors": None,
            "input_file_id": file_id,
            "completion_window": "24h",
            "status": "validating",
            "output_file_id": None,
            "error_file_id": None,
            "created_at": now,
            "in_progress_at": None,
            "expires_at": now + 24 * 3600,
            "finalizing_at": None,
            "completed_at": None,
            "failed_at": None,
            "expired_at": None,
            "cancelling_at": None,
            "cancelled_at": None,
            "request_counts": {"total": len(lines), "completed": 0, "failed": 0},
            "metadata": body.get("metadata"),
            "owner": owner,
        }
        await self.store.save(batch)
        try:
            await self._publish_lines(batch["id"], lines)
        except Exception as exc:
            # Lines already published will find the batch failed and do nothing.
            batch.update(status="failed", failed_at=int(time.time()))
            batch["errors"] = {"object": "list", "data": [{"code": "queue_unavailable", "message": repr(exc)}]}
            await self.store.save(batch)
            raise RagmeshError(
                ErrorKind.UNAVAILABLE, "The batch queue (RabbitMQ) is unavailable; retry shortly.", retry_after=5
            ) from exc
        batch.update(status="in_progress", in_progress_at=int(time.time()))
        await self.store.save(batch)
        return _public(await self.store.load(batch["id"]))

    async def _publish_lines(self, batch_id: str, lines: list[BatchLine]) -> None:
        _, exchange = await self._channel()
        for begin in range(0, len(lines), 500):  # confirms pipelined, 500 in flight at most
            await asyncio.gather(
                *(
                    exchange.publish(
                        aio_pika.Message(
                            orjson.dumps(
                                {
                                    "v": SCHEMA_VERSION,
                                    "batch_id": batch_id,
                                    "custom_id": line.custom_id,
                                    "url": line.url,
                                    "body": line.body,
                                }
                            ),
                            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                            content_type="application/json",
                            message_id=f"{batch_id}/{line.custom_id}",
                            type="ragmesh.batch-line.v1",
                            headers=message_headers(),
                        ),
                        routing_key=REQUEST_ROUTING_KEY,
                        timeout=self._settings.publish_timeout,
                    )
                    for line in lines[begin : begin + 500]
                )
            )

    async def _owned(self, batch_id: str, owner: str | None) -> dict[str, Any]:
        batch = await self.store.load(batch_id)
        if owner is not None and batch.get("owner") != owner:
            raise RagmeshError(
                ErrorKind.NOT_FOUND, f"No such batch: {batch_id}.", param="batch_id", code="batch_not_found"
            )
        return batch

    async def get(self, batch_id: str, owner: str | None) -> dict[str, Any]:
        batch = await self._owned(batch_id, owner)
        counts = batch["request_counts"]
        if batch["status"] not in FINAL_STATES and counts["completed"] + counts["failed"] >= counts["total"]:
            await self._finalize(batch_id)  # its worker died before finishing the batch
            batch = await self.store.load(batch_id)
        return _public(batch)

    async def list(self, limit: int, after: str | None, owner: str | None) -> dict[str, Any]:
        keys = [k.decode() async for k in self._redis.scan_iter(f"{self.store.key('*')}", count=1000)]
        ids = sorted({k.split(":")[-1] for k in keys if k.count(":") == self.store.key("x").count(":")})
        batches = [await self.store.load(i) for i in ids]
        batches = [_public(b) for b in batches if owner is None or b.get("owner") == owner]
        batches.sort(key=lambda b: (b["created_at"], b["id"]), reverse=True)
        if after:
            position = next((i for i, b in enumerate(batches) if b["id"] == after), -1)
            batches = batches[position + 1 :]
        page = batches[:limit]
        return {
            "object": "list",
            "data": page,
            "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None,
            "has_more": len(batches) > limit,
        }

    async def cancel(self, batch_id: str, owner: str | None) -> dict[str, Any]:
        batch = await self._owned(batch_id, owner)
        if batch["status"] in FINAL_STATES:
            raise RagmeshError(
                ErrorKind.CONFLICT, f"Batch {batch_id} is {batch['status']}; it cannot be cancelled.", param="batch_id"
            )
        batch.update(status="cancelling", cancelling_at=int(time.time()))
        await self.store.save(batch)
        return await self.get(batch_id, owner)

    # --- workers --------------------------------------------------------------------------

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        RUNNING.inc()
        try:
            with consuming(message, "batch line"):
                await self._handle(message)
        finally:
            RUNNING.dec()

    async def _handle(self, message: AbstractIncomingMessage) -> None:
        try:
            payload = orjson.loads(message.body)
            url, body = payload["url"], payload["body"]
            assert isinstance(body, dict) and payload.get("v", SCHEMA_VERSION) == SCHEMA_VERSION
        except Exception:  # noqa: BLE001 - undecodable: nothing to answer, keep it for inspection
            LINES.labels("poison").inc()
            await message.reject(requeue=False)
            await self._dead_letter(message)
            return
        batch_id = payload.get("batch_id")
        if batch_id:
            await self._batch_line(message, batch_id, payload["custom_id"], url, body)
        else:
            await self._direct(message, url, body)

    async def _batch_line(
        self, message: AbstractIncomingMessage, batch_id: str, custom_id: str, url: str, body: dict[str, Any]
    ) -> None:
        try:
            batch = await self.store.load(batch_id)
        except RagmeshError:
            await message.ack()  # the batch is gone: nothing to do
            return
        if batch["status"] == "failed" or await self.store.has_result(batch_id, custom_id):
            await message.ack()  # a redelivery: the line already has its one result
            return
        outcome: Any = _CANCELLED
        if batch["status"] not in ("cancelling", "cancelled"):
            outcome = await self._unless_cancelled(batch_id, self._attempt(message, url, body))
        if outcome is _CANCELLED:
            cancelled = RagmeshError(
                ErrorKind.CANCELLED, "The batch was cancelled before this line finished.", code="batch_cancelled"
            )
            await self._finish_line(batch_id, custom_id, None, cancelled)
            await message.ack()
            return
        if outcome is None:
            return  # retried later
        response, err = outcome
        await self._finish_line(batch_id, custom_id, response, err)
        await message.ack()

    async def _unless_cancelled(self, batch_id: str, attempt: Awaitable[Any]) -> Any:
        """The attempt's outcome, or _CANCELLED when its batch is cancelled first. Lines wait for
        an engine slot behind other batch work, so a cancel must reach lines already in flight:
        cancelling the call frees the slot or takes the line out of the engine's queue."""
        task = asyncio.ensure_future(attempt)
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=CANCEL_CHECK_SECONDS)
                if done:
                    return task.result()
                if await self._batch_cancelled(batch_id):
                    task.cancel()
                    await asyncio.wait({task})
                    return _CANCELLED if task.cancelled() else task.result()
        finally:
            if not task.done():  # this worker is being stopped: the message goes back unacked
                task.cancel()

    async def _batch_cancelled(self, batch_id: str) -> bool:
        """Whether the batch is being cancelled. Every line in flight asks each second; one Redis
        read per batch and second answers them all (64 lines polling on their own cost more of
        this process's time than running them)."""
        now = time.monotonic()
        last = self._cancel_reads.get(batch_id)
        if last is None or now - last[0] >= CANCEL_CHECK_SECONDS:
            for stale in [b for b, (at, _) in self._cancel_reads.items() if now - at > 60]:
                del self._cancel_reads[stale]
            last = (now, asyncio.ensure_future(self._read_cancelled(batch_id)))
            self._cancel_reads[batch_id] = last
        return await asyncio.shield(last[1])

    async def _read_cancelled(self, batch_id: str) -> bool:
        try:
            status = (await self.store.load(batch_id))["status"]
        except Exception:  # noqa: BLE001 - Redis away or the batch gone: the line decides for itself
            return False
        return status in ("cancelling", "cancelled")

    async def _attempt(
        self, message: AbstractIncomingMessage, url: str, body: dict[str, Any]
    ) -> tuple[dict[str, Any] | None, RagmeshError | None] | None:
        """(response, None) or (None, final error); None when the message went back for a retry."""
        try:
            if not generates(url):
                response = await self._run(url, body)
            else:
                async with self._generating:
                    response = await self._run(url, body)
        except RagmeshError as err:
            retries = _retries(message)
            if err.kind in TRANSIENT and retries < self._settings.batch_max_retries:
                await self._retry_later(message, retries + 1)
                return None
            if err.kind in TRANSIENT:
                await self._dead_letter(message)
                return None, RagmeshError(
                    err.kind, f"gave up after {retries + 1} attempts: {err.message}", code=err.code
                )
            return None, err
        except Exception as exc:
            log.exception("batch line failed")
            return None, RagmeshError(ErrorKind.INTERNAL, f"internal error: {type(exc).__name__}")
        return response, None

    async def _retry_later(self, message: AbstractIncomingMessage, attempt: int) -> None:
        """Back into the queue after a backoff, through the retry queue; then ack this copy."""
        channel, _ = await self._channel()
        delay_ms = int(
            min(self._settings.batch_backoff_max, self._settings.batch_backoff_base * 2 ** (attempt - 1)) * 1000
        )
        await channel.default_exchange.publish(
            aio_pika.Message(
                message.body,
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                content_type=message.content_type,
                message_id=message.message_id,
                correlation_id=message.correlation_id,
                reply_to=message.reply_to,
                type=message.type,
                headers={**(message.headers or {}), RETRY_HEADER: attempt},
                expiration=delay_ms / 1000,
            ),
            routing_key=self._topology.retry_queue,
        )
        LINES.labels("retried").inc()
        await message.ack()

    async def _dead_letter(self, message: AbstractIncomingMessage) -> None:
        with contextlib.suppress(Exception):
            channel, _ = await self._channel()
            await channel.default_exchange.publish(
                aio_pika.Message(
                    message.body, headers=message.headers or {}, delivery_mode=aio_pika.DeliveryMode.PERSISTENT
                ),
                routing_key=self._topology.requests_dead_queue,
            )

    async def _finish_line(
        self, batch_id: str, custom_id: str, response: dict[str, Any] | None, err: RagmeshError | None
    ) -> None:
        rid = request_id_var.get()
        result: dict[str, Any] = {"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": custom_id}
        if err is None:
            result.update(response={"status_code": 200, "request_id": rid, "body": response}, error=None)
        else:
            result.update(
                response={"status_code": err.http_status, "request_id": rid, "body": err.to_openai()},
                error={"code": err.code or err.kind.value, "message": err.message},
            )
        LINES.labels("ok" if err is None else "failed").inc()
        if await self.store.record(batch_id, custom_id, result, ok=err is None):
            batch = await self.store.load(batch_id)
            counts = batch["request_counts"]
            if counts["completed"] + counts["failed"] >= counts["total"]:
                await self._finalize(batch_id)

    async def _finalize(self, batch_id: str) -> None:
        """Write the output and error files in input order; idempotent, one finaliser at a time."""
        lock = self.store.key(batch_id, "finalizing")
        if not await self._redis.set(lock, b"1", nx=True, ex=120):
            return
        try:
            batch = await self.store.load(batch_id)
            if batch["status"] in FINAL_STATES:
                return
            batch.update(
                status="finalizing" if batch["status"] != "cancelling" else "cancelling", finalizing_at=int(time.time())
            )
            await self.store.save(batch)
            order = [
                line.custom_id
                for line in parse_batch_lines(await self.files.content(batch["input_file_id"], None), 10**9)
            ]
            results = await self.store.results(batch_id)
            good = [results[c] for c in order if c in results and results[c]["error"] is None]
            bad = [results[c] for c in order if c in results and results[c]["error"] is not None]
            if good:
                batch["output_file_id"] = (
                    await self.files.put(
                        _jsonl(good), f"{batch_id}_output.jsonl", "batch_output", len(good), batch.get("owner")
                    )
                )["id"]
            if bad:
                batch["error_file_id"] = (
                    await self.files.put(
                        _jsonl(bad), f"{batch_id}_error.jsonl", "batch_output", len(bad), batch.get("owner")
                    )
                )["id"]
            now = int(time.time())
            if batch["status"] == "cancelling":
                batch.update(status="cancelled", cancelled_at=now)
            else:
                batch.update(status="completed", completed_at=now)
            await self.store.save(batch)
        finally:
            await self._redis.delete(lock)

    # --- direct protocol ---------------------------------------------------------------------

    async def _direct(self, message: AbstractIncomingMessage, url: str, body: dict[str, Any]) -> None:
        key = self._direct_prefix + (message.message_id or uuid.uuid4().hex)
        raw = await self._redis.get(key) if message.message_id else None
        stored: bytes | None = raw if isinstance(raw, bytes) else None
        if stored is None:
            if url not in BATCH_URLS:
                outcome: tuple[dict[str, Any] | None, RagmeshError | None] | None = (
                    None,
                    invalid_request(f"url must be one of {', '.join(BATCH_URLS)}.", param="url"),
                )
            else:
                outcome = await self._attempt(message, url, body)
            if outcome is None:
                return  # retried later
            response, err = outcome
            reply = (
                {"v": SCHEMA_VERSION, "status_code": 200, "body": response}
                if err is None
                else {"v": SCHEMA_VERSION, "status_code": err.http_status, "body": err.to_openai()}
            )
            stored = orjson.dumps(reply)
            # Kept before it is sent: a redelivered request is answered from here, not run again.
            if message.message_id and not await self._redis.set(key, stored, nx=True, ex=24 * 3600):
                earlier = await self._redis.get(key)
                stored = earlier if isinstance(earlier, bytes) else stored
            LINES.labels("ok" if err is None else "failed").inc()
        if message.reply_to:
            channel, _ = await self._channel()
            await channel.default_exchange.publish(
                aio_pika.Message(
                    stored,
                    content_type="application/json",
                    correlation_id=message.correlation_id,
                    message_id=message.message_id,
                    type="ragmesh.response.v1",
                    delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                    headers=message_headers(),
                ),
                routing_key=message.reply_to,
            )
        await message.ack()


def _public(batch: dict[str, Any]) -> dict[str, Any]:
    """OpenAI's batch object: without the owning key's id."""
    return {k: v for k, v in batch.items() if k != "owner"}


def _retries(message: AbstractIncomingMessage) -> int:
    value = (message.headers or {}).get(RETRY_HEADER, 0)
    return int(value) if isinstance(value, int | str) and str(value).isdigit() else 0


def _jsonl(items: list[dict[str, Any]]) -> bytes:
    return b"".join(orjson.dumps(item) + b"\n" for item in items)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
