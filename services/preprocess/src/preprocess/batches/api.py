"""The Batches API: create, read, list and cancel batches; upload their input files.

A batch is created `validating`, its lines are published (confirmed) to the requests queue,
then it moves to `in_progress` by compare-and-set: if a cancel came first, or every line
already finished and the batch ended, nothing is set back. Each batch belongs to the key
that made it (`owner`: the API key id, None with auth off); other keys get a 404.
"""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from collections.abc import Callable
from typing import Any

import aio_pika
import orjson

from preprocess.batches.finalizer import Finalizer
from preprocess.batches.lines import BATCH_URLS, LINE_TYPE, BatchLine, line_body, parse_batch_lines
from preprocess.batches.store import FINAL, BatchStore, not_found
from preprocess.files import FileStore
from preprocess.settings import PreprocessSettings
from ragmesh.amqp import REQUEST_ROUTING_KEY, Topology, message_headers
from ragmesh.amqp_client import LazyChannel
from ragmesh.errors import ErrorKind, RagmeshError, invalid_request

# Lines published with their confirms in flight together.
PUBLISH_WINDOW = 500
_WINDOW = re.compile(r"^([1-9][0-9]*)([smhd])$")
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400}
# The longest completion window accepted (OpenAI accepts "24h" only; longer windows are ragmesh's).
LONGEST_WINDOW = 30 * 86400


def window_seconds(value: Any) -> int:
    """A completion window: "24h" as OpenAI has it, or any "<n>s", "<n>m", "<n>h", "<n>d" up to 30 days."""
    match = _WINDOW.match(value) if isinstance(value, str) else None
    seconds = int(match[1]) * _UNIT[match[2]] if match else 0
    if not match or seconds > LONGEST_WINDOW:
        raise invalid_request(
            "completion_window must be a duration such as '24h' (a number and s, m, h or d), at most 30 days.",
            param="completion_window",
        )
    return seconds


def check_metadata(value: Any) -> dict[str, str] | None:
    """OpenAI's metadata: up to 16 string pairs (keys up to 64 characters, values up to 512)."""
    if value is None:
        return None
    if (
        not isinstance(value, dict)
        or len(value) > 16
        or not all(
            isinstance(k, str) and isinstance(v, str) and len(k) <= 64 and len(v) <= 512 for k, v in value.items()
        )
    ):
        raise invalid_request(
            "metadata must be an object of at most 16 string values (keys up to 64 characters, values up to 512).",
            param="metadata",
        )
    return dict(value)


def public(batch: dict[str, Any]) -> dict[str, Any]:
    """OpenAI's batch object: without the owning key's id."""
    return {k: v for k, v in batch.items() if k != "owner"}


class BatchApi:
    def __init__(
        self,
        settings: PreprocessSettings,
        store: BatchStore,
        files: FileStore,
        finalizer: Finalizer,
        publisher: LazyChannel,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._settings = settings
        self._store = store
        self._files = files
        self._finalizer = finalizer
        self._publisher = publisher
        self._clock = clock

    async def upload(self, data: bytes, filename: str, purpose: str, owner: str | None) -> dict[str, Any]:
        """Keep a batch input file, checked whole first (a bad file is a 400/413 and nothing is kept)."""
        if purpose != "batch":
            raise invalid_request("Only purpose 'batch' is accepted.", param="purpose")
        if len(data) > self._settings.max_file_bytes:
            raise RagmeshError(
                ErrorKind.PAYLOAD_TOO_LARGE,
                f"A file may hold at most {self._settings.max_file_bytes} bytes.",
                param="file",
            )
        lines = await asyncio.to_thread(parse_batch_lines, data, self._settings.max_file_lines)
        if owner is not None:
            quota = self._settings.max_file_storage_per_key
            used = await self._files.stored_bytes(owner)
            if used + len(data) > quota:
                raise invalid_request(
                    f"This key's files take {used} bytes; with this one they would pass its quota of {quota} "
                    "bytes. Delete files it no longer needs (DELETE /v1/files/{id}).",
                    param="file",
                    code="storage_quota_exceeded",
                )
        return await self._files.put(data, filename, purpose, len(lines), owner, now=self._clock())

    async def create(self, body: Any, owner: str | None) -> dict[str, Any]:
        """Create a batch from an uploaded file; `owner` (the API key id, None with auth off) alone sees it."""
        if not isinstance(body, dict):
            raise invalid_request("The request body must be a JSON object.")
        endpoint = body.get("endpoint")
        if endpoint not in BATCH_URLS:
            raise invalid_request(f"endpoint must be one of {', '.join(BATCH_URLS)}.", param="endpoint")
        window = body.get("completion_window", "24h")
        seconds = window_seconds(window)
        metadata = check_metadata(body.get("metadata"))
        file_id = body.get("input_file_id")
        if not isinstance(file_id, str):
            raise invalid_request("input_file_id is required.", param="input_file_id")
        if (await self._files.info(file_id, owner))["purpose"] != "batch":
            raise invalid_request(f"{file_id} is not a batch input file (purpose 'batch').", param="input_file_id")
        data = await self._files.content(file_id, owner)
        lines = await asyncio.to_thread(parse_batch_lines, data, self._settings.max_file_lines)
        wrong = next((line for line in lines if line.url != endpoint), None)
        if wrong is not None:
            raise invalid_request(
                f"Line {wrong.custom_id!r} asks for {wrong.url}, but the batch's endpoint is {endpoint}.",
                param="input_file_id",
            )
        now = self._clock()
        batch_id = f"batch_{uuid.uuid4().hex}"
        doc = {
            "id": batch_id,
            "endpoint": endpoint,
            "input_file_id": file_id,
            "completion_window": window,
            "created_at": int(now),
            "expires_at": int(now) + seconds,
            "metadata": metadata,
            "owner": owner,
        }
        await self._store.create(doc, [line.custom_id for line in lines], int(now * 1000))
        try:
            await self._publish_lines(batch_id, lines, owner)
        except Exception as exc:
            # Lines already published find the batch failed and do nothing.
            errors = {"object": "list", "data": [{"code": "queue_unavailable", "message": repr(exc)}]}
            failed_at = self._clock()
            await self._store.finish(
                batch_id,
                "failed",
                int(failed_at),
                failed_at + self._settings.batch_retention,
                errors=orjson.dumps(errors).decode(),
            )
            raise RagmeshError(
                ErrorKind.UNAVAILABLE, "The batch queue (RabbitMQ) is unavailable; retry shortly.", retry_after=5
            ) from exc
        await self._store.transition(batch_id, ("validating",), "in_progress", int(self._clock()))
        await self._finalizer.maybe_finalize(batch_id)  # every line may have finished already
        return public(await self._store.load(batch_id))

    async def _publish_lines(self, batch_id: str, lines: list[BatchLine], owner: str | None = None) -> None:
        channel = await self._publisher.get()
        exchange = await channel.get_exchange(Topology(self._settings.namespace).requests_exchange)
        for begin in range(0, len(lines), PUBLISH_WINDOW):
            await asyncio.gather(
                *(
                    exchange.publish(
                        aio_pika.Message(
                            line_body(batch_id, line, owner),
                            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                            content_type="application/json",
                            message_id=f"{batch_id}/{line.custom_id}",
                            type=LINE_TYPE,
                            headers=message_headers(),
                        ),
                        routing_key=REQUEST_ROUTING_KEY,
                        timeout=self._settings.publish_timeout,
                    )
                    for line in lines[begin : begin + PUBLISH_WINDOW]
                )
            )

    async def _owned(self, batch_id: str, owner: str | None) -> dict[str, Any]:
        batch = await self._store.load(batch_id)
        if owner is not None and batch.get("owner") != owner:
            raise not_found(batch_id)
        return batch

    async def get(self, batch_id: str, owner: str | None) -> dict[str, Any]:
        """The batch; a read also ends a batch whose ending nobody finished (a worker died first)."""
        batch = await self._owned(batch_id, owner)
        if batch["status"] not in FINAL:
            counts = batch["request_counts"]
            if counts["completed"] + counts["failed"] >= counts["total"] or batch["status"] == "finalizing":
                await self._finalizer.maybe_finalize(batch_id)
                batch = await self._store.load(batch_id)
            elif self._clock() >= batch["expires_at"]:
                await self._finalizer.expire(batch_id)
                batch = await self._store.load(batch_id)
        return public(batch)

    async def list(self, limit: int, after: str | None, owner: str | None) -> dict[str, Any]:
        """The owner's batches, newest first, after the batch `after` (OpenAI's cursor page)."""
        ids, has_more = await self._store.page(owner, after, limit)
        batches = [public(b) for b in await self._store.load_many(ids)]
        return {
            "object": "list",
            "data": batches,
            "first_id": batches[0]["id"] if batches else None,
            "last_id": batches[-1]["id"] if batches else None,
            "has_more": has_more,
        }

    async def cancel(self, batch_id: str, owner: str | None) -> dict[str, Any]:
        """validating or in_progress -> cancelling (compare-and-set); 409 once the batch is ending."""
        await self._owned(batch_id, owner)
        moved, status = await self._store.transition(
            batch_id, ("validating", "in_progress"), "cancelling", int(self._clock())
        )
        if not moved and status != "cancelling":
            raise RagmeshError(
                ErrorKind.CONFLICT, f"Batch {batch_id} is {status}; it cannot be cancelled.", param="batch_id"
            )
        await self._finalizer.maybe_finalize(batch_id)  # every line may be done already
        return await self.get(batch_id, owner)
