"""The batch workers: consume the requests queue, run each line, settle every delivery.

Every delivery is settled, whatever happens: acked once its outcome is stored (or handed to
the retry queue), requeued after a short pause when a dependency failed (Redis, the broker:
the line is not at fault and must not lose its turn for good), dead-lettered when it cannot
be read (the broker moves it to `batch.dead`). A line failing for a reason that may pass is
retried with exponential backoff through `batch.retry`, up to `batch_max_retries` times; then
it fails, and a copy goes to `batch.dead`.

Lines in flight look, once a second per batch, whether their batch was cancelled, closed or
ran out of time: their calls are cancelled, which frees the engine slot.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aio_pika.abc import AbstractIncomingMessage

from preprocess.batches.direct import DirectProtocol, error_body
from preprocess.batches.finalizer import Finalizer, line_result
from preprocess.batches.lines import Request, UnreadableError, decode_request
from preprocess.batches.outcome import LINES, RUNNING, Outcome, Verdict
from preprocess.batches.store import BatchStore
from preprocess.keys import KeyStore
from preprocess.serving.operations import generates
from preprocess.settings import PreprocessSettings
from ragmesh.amqp import (
    TRANSIENT_ERRORS,
    Topology,
    backoff_seconds,
    consuming,
    declare_requests,
    retries_of,
    retry_copy,
    settle,
)
from ragmesh.amqp_client import LazyChannel, SupervisedConsumer
from ragmesh.context import request_id_var
from ragmesh.errors import REDIS_UNAVAILABLE_ERRORS, ErrorKind, RagmeshError, from_exception

log = logging.getLogger(__name__)

# Errors that may pass: the line is tried again later.
TRANSIENT = frozenset({ErrorKind.UNAVAILABLE, ErrorKind.DEADLINE, ErrorKind.RATE_LIMITED, ErrorKind.BAD_GATEWAY})
# A dependency failed while a delivery was handled: it goes back to the queue after this pause.
REQUEUE_DELAY = 1.0
DEPENDENCY_ERRORS: tuple[type[BaseException], ...] = (*TRANSIENT_ERRORS, *REDIS_UNAVAILABLE_ERRORS)
# How often a running line looks whether its batch was stopped (on any replica).
CANCEL_CHECK_SECONDS = 1.0

# Runs one request (url, body, the id of the key it runs for) through the mesh; returns the response body.
Runner = Callable[[str, dict[str, Any], str | None], Awaitable[dict[str, Any]]]


class StoppedError(Exception):
    """The line's batch was cancelled, closed, or ran out of time while the line ran."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


CANCELLED = RagmeshError(
    ErrorKind.CANCELLED, "The batch was cancelled before this line finished.", code="batch_cancelled"
)


class BatchWorker:
    def __init__(
        self,
        settings: PreprocessSettings,
        store: BatchStore,
        finalizer: Finalizer,
        publisher: LazyChannel,
        run: Runner,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._settings = settings
        self._store = store
        self._finalizer = finalizer
        self._publisher = publisher
        self._run = run
        self._clock = clock
        self._topology = Topology(settings.namespace)
        self._generating = asyncio.Semaphore(max(1, settings.batch_generation_workers))
        keys = KeyStore(store.redis, settings.namespace, settings.rate_limit_window) if settings.auth == "on" else None
        self._direct = DirectProtocol(store.redis, settings.namespace, publisher, self.attempt, keys)
        # Per batch: when its state was last read and the read (shared by all its lines in flight).
        self._stop_reads: dict[str, tuple[float, asyncio.Future[str | None]]] = {}
        self._consumer = SupervisedConsumer(
            settings.amqp_url,
            name=f"{settings.namespace or 'ragmesh'}.preprocess.batch-worker",
            # Bounded: batch lines use at most this many engine slots, the rest stay for interactive traffic.
            prefetch=settings.batch_workers,
            declare=lambda channel: declare_requests(channel, self._topology),
            handle=self.on_message,
        )

    def start(self) -> None:
        self._consumer.start()

    @property
    def state(self) -> str:
        """ "ok" while consuming, else why not (readiness)."""
        return self._consumer.state

    async def pause(self) -> None:
        """Take no new lines; the ones in hand go on."""
        await self._consumer.pause()

    async def stop(self, grace: float) -> None:
        """Take no new lines; the ones in hand get `grace` seconds from the first pause."""
        await self._consumer.stop(grace)

    # --- settling -------------------------------------------------------------------------

    async def on_message(self, message: AbstractIncomingMessage) -> None:
        """Handle one delivery and settle it, whatever was raised."""
        RUNNING.inc()
        try:
            with consuming(message, "batch line"):
                verdict = await self._handle(message)
        except DEPENDENCY_ERRORS as exc:
            LINES.labels("deferred").inc()
            log.warning("batch line deferred: a dependency failed", extra={"error": repr(exc)})
            await asyncio.sleep(REQUEUE_DELAY)
            await settle(message, requeue=True)
        except Exception as exc:
            LINES.labels("poison").inc()
            log.exception("batch line handler failed; the message is dead-lettered")
            await self._answer_poison(message, exc)
            await settle(message)
        else:
            await settle(message, ack=verdict is Verdict.ACK)
        finally:
            RUNNING.dec()

    async def _answer_poison(self, message: AbstractIncomingMessage, exc: Exception) -> None:
        """A request whose handling raised (no dependency failure: it would raise again) still gets
        an outcome, so nothing waits for it for ever: a batch line's failure is recorded (the batch
        can end), a direct request's producer gets a 500 in the protocol's shape. Best effort: the
        message goes to batch.dead whatever happens here."""
        try:
            request = decode_request(message.body)
        except UnreadableError:
            return  # answered (if it could be) by _handle already
        err = from_exception(exc)  # a Redis error that is no outage (a refused command): still a 503
        if err.kind is ErrorKind.INTERNAL:
            err = RagmeshError(
                ErrorKind.INTERNAL, f"internal error handling this request: {type(exc).__name__}", code="line_failed"
            )
        try:
            if request.batch_id is None:
                await self._direct.reply(message, error_body(err))
                return
            assert request.custom_id is not None
            record = line_result(request.batch_id, request.custom_id, None, err, request_id_var.get())
            recorded = await self._store.record(request.batch_id, request.custom_id, record, ok=False)
            if recorded.complete:
                await self._finalizer.maybe_finalize(request.batch_id)
        except Exception as again:  # noqa: BLE001 - the dead letter keeps the request; the sweeper ends the batch
            log.warning("poison request left without an outcome", extra={"error": repr(again)})

    async def _handle(self, message: AbstractIncomingMessage) -> Verdict:
        try:
            request = decode_request(message.body)
        except UnreadableError as exc:
            LINES.labels("poison").inc()
            log.warning("unreadable request dead-lettered", extra={"message_id": message.message_id, "error": str(exc)})
            if message.reply_to:
                await self._direct.refuse(message, str(exc))
            return Verdict.DEAD_LETTER
        if request.batch_id is None:
            return await self._direct.handle(message, request)
        return await self._batch_line(message, request)

    # --- batch lines --------------------------------------------------------------------------

    async def _batch_line(self, message: AbstractIncomingMessage, request: Request) -> Verdict:
        batch_id, custom_id = request.batch_id, request.custom_id
        assert batch_id is not None and custom_id is not None
        state = await self._store.line_state(batch_id)
        if state is None or state.frozen:
            return Verdict.ACK  # gone, or ending: its finalizer answers for this line
        if await self._store.has_result(batch_id, custom_id):
            # Delivered again: the first delivery stored the result and died before the rest.
            await self._finalizer.maybe_finalize(batch_id)
            return Verdict.ACK
        if self._clock() >= state.expires_at:
            await self._finalizer.expire(batch_id)
            return Verdict.ACK
        if state.status == "cancelling":
            outcome: Outcome | None = Outcome(None, CANCELLED)
        else:
            try:
                outcome = await self._watched(batch_id, self.attempt(message, request.url, request.body, request.owner))
            except StoppedError as stop:
                if stop.reason != "cancelled":
                    if stop.reason == "expired":
                        await self._finalizer.expire(batch_id)
                    return Verdict.ACK
                outcome = Outcome(None, CANCELLED)
        if outcome is None:
            return Verdict.ACK  # a copy waits in the retry queue
        record = line_result(batch_id, custom_id, outcome.response, outcome.error, request_id_var.get())
        LINES.labels("ok" if outcome.error is None else "failed").inc()
        recorded = await self._store.record(batch_id, custom_id, record, ok=outcome.error is None)
        if recorded.complete:
            await self._finalizer.maybe_finalize(batch_id)
        return Verdict.DEAD_LETTER if outcome.exhausted else Verdict.ACK

    async def _watched(self, batch_id: str, attempt: Awaitable[Outcome | None]) -> Outcome | None:
        """The attempt's outcome, or StoppedError when its batch stops first. Lines wait for an engine
        slot behind other batch work, so a cancel must reach lines already in flight:
        cancelling the call frees the slot or takes the line out of the engine's queue."""
        task = asyncio.ensure_future(attempt)
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=CANCEL_CHECK_SECONDS)
                if done:
                    return task.result()
                reason = await self._stop_reason(batch_id)
                if reason is not None:
                    task.cancel()
                    await asyncio.wait({task})
                    if task.cancelled():
                        raise StoppedError(reason)
                    return task.result()
        finally:
            if not task.done():  # this worker is being stopped: the message goes back unacked
                task.cancel()

    async def _stop_reason(self, batch_id: str) -> str | None:
        """Why the batch's lines should stop (None: they go on). Every line in flight asks each
        second; one Redis read per batch and second answers them all (64 lines polling on their
        own cost more of this process's time than running them)."""
        now = time.monotonic()
        last = self._stop_reads.get(batch_id)
        if last is None or now - last[0] >= CANCEL_CHECK_SECONDS:
            for stale in [b for b, (at, _) in self._stop_reads.items() if now - at > 60]:
                del self._stop_reads[stale]
            last = (now, asyncio.ensure_future(self._read_stop_reason(batch_id)))
            self._stop_reads[batch_id] = last
        return await asyncio.shield(last[1])

    async def _read_stop_reason(self, batch_id: str) -> str | None:
        try:
            state = await self._store.line_state(batch_id)
        except Exception:  # noqa: BLE001 - Redis away: the line goes on; its result is recorded later
            return None
        if state is None:
            return "gone"
        if state.status in ("cancelling", "cancelled"):
            return "cancelled"
        if state.frozen:
            return "closed"
        if self._clock() >= state.expires_at:
            return "expired"
        return None

    # --- running a request ------------------------------------------------------------------

    async def attempt(
        self, message: AbstractIncomingMessage, url: str, body: dict[str, Any], owner: str | None = None
    ) -> Outcome | None:
        """Run a request once: its outcome, or None when it went to the retry queue for later."""
        try:
            if not generates(url):
                response = await self._run(url, body, owner)
            else:
                async with self._generating:
                    response = await self._run(url, body, owner)
        except Exception as exc:
            # The error table reads it: a Redis error (the line's key looked up, say) is
            # UNAVAILABLE, retried like any dependency down, never recorded as a 500.
            error = from_exception(exc)
            if error is not exc and error.kind is ErrorKind.INTERNAL:
                log.exception("batch line failed")
            return await self._failed(message, error)
        return Outcome(response)

    async def _failed(self, message: AbstractIncomingMessage, err: RagmeshError) -> Outcome | None:
        """A failed attempt's outcome: the error itself, or None once a copy went to the retry
        queue (an error that may pass, retries left), or the last error when none are left."""
        retries = retries_of(message)
        if err.kind not in TRANSIENT:
            return Outcome(None, err)
        if retries < self._settings.batch_max_retries:
            await self._retry_later(message, retries + 1)
            return None
        gave_up = RagmeshError(err.kind, f"gave up after {retries + 1} attempts: {err.message}", code=err.code)
        return Outcome(None, gave_up, exhausted=True)

    async def _retry_later(self, message: AbstractIncomingMessage, attempt: int) -> None:
        """A copy goes to the retry queue, which sends it back after a backoff (this delivery is then acked)."""
        delay = backoff_seconds(attempt, self._settings.batch_backoff_base, self._settings.batch_backoff_max)
        channel = await self._publisher.get()
        await channel.default_exchange.publish(
            retry_copy(message, attempt, delay),
            routing_key=self._topology.retry_queue,
            timeout=self._settings.publish_timeout,
        )
        LINES.labels("retried").inc()
