"""The asynchronous side of retrieval: the `ingest` queue and `index.events`.

A job is acked only once its chunks are embedded, indexed and saved to disk,
and the change is published to `index.events`; a job that cannot be processed
is dead-lettered (to `ingest.dead`) with the error recorded on the job. A
redelivered job that was already applied (the replica died before its ack) is
recognised by its id and only re-announced, never indexed twice.

Every replica consumes `index.events` through a durable queue of its own, so
changes made while it was down are applied when it comes back. An event that fails to apply
is tried again after a backoff (through the replica's retry queue, with a retry count), up to
`index_event_max_retries` times; then it is dead-lettered to `index.events.dead` with an error
logged, instead of blocking the replica's queue for ever.

A replica that lacks collections the registry lists (new, or its data lost) declares its
events queue first, copies them from a peer (retrieval/catchup.py), and only then consumes.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
from collections.abc import Sequence

import numpy as np
from aio_pika.abc import AbstractIncomingMessage
from aio_pika.exceptions import ChannelNotFoundEntity
from google.protobuf.json_format import MessageToDict
from google.protobuf.message import DecodeError
from prometheus_client import Counter
from redis.exceptions import RedisError

from ragmesh.amqp import (
    TRANSIENT_ERRORS,
    Topology,
    backoff_seconds,
    consuming,
    declare_index_events,
    declare_ingest,
    declare_replica_events,
    persistent_message,
    retries_of,
    retry_copy,
    settle,
)
from ragmesh.amqp_client import LazyChannel, SupervisedConsumer
from ragmesh.jobs import JobStore
from ragmesh.v1 import ingest_pb2
from retrieval.catchup import CatchUp
from retrieval.embedder import Embedder
from retrieval.index import ChunkRecord, Snapshot, bm25_tokens, embedding_text
from retrieval.settings import RetrievalSettings
from retrieval.store import CollectionGoneError, CollectionStore, RegistryUnavailableError

log = logging.getLogger(__name__)

JOBS = Counter("ragmesh_retrieval_ingest_jobs_total", "Ingestion jobs by outcome", ["outcome"])
CHUNKS_INDEXED = Counter("ragmesh_retrieval_chunks_indexed_total", "Chunks indexed by this replica")
EVENTS_APPLIED = Counter("ragmesh_retrieval_index_events_applied_total", "index.events changes applied", ["change"])
EVENTS_FAILED = Counter(
    "ragmesh_retrieval_index_events_failed_total", "index.events changes that failed to apply", ["outcome"]
)
# Longest wait before an event is tried again.
EVENT_BACKOFF_MAX = 60.0

# Seconds to wait before a job that hit a transient failure goes back to the queue.
RETRY_DELAY = 1.0
# A dependency failed (the broker, Redis, the registry), not the job: it goes back to the queue.
JOB_DEFERRED_ERRORS: tuple[type[BaseException], ...] = (*TRANSIENT_ERRORS, RedisError, RegistryUnavailableError)


class _Verdict(enum.Enum):
    """What becomes of a job's delivery."""

    ACK = "ack"
    REQUEUE = "requeue"  # a dependency failed, not the job
    DEAD_LETTER = "dead_letter"


def check_job(job: ingest_pb2.IngestJob) -> None:
    """Refuse a job that cannot be indexed as it is (it is dead-lettered, not retried)."""
    if not job.job_id or not job.collection:
        raise ValueError("job without an id or a collection")
    seen: set[str] = set()
    for chunk in job.chunks:
        if not chunk.chunk_id or not chunk.document_id:
            raise ValueError("chunk without a chunk_id or a document_id")
        if chunk.chunk_id in seen:
            raise ValueError(f"chunk id {chunk.chunk_id!r} appears twice in the job")
        seen.add(chunk.chunk_id)


def records_from(chunks: Sequence[ingest_pb2.Chunk]) -> list[ChunkRecord]:
    texts = [embedding_text(c.title, c.text) for c in chunks]
    return [
        ChunkRecord(c.chunk_id, c.document_id, c.title, c.text, MessageToDict(c.metadata), tokens)
        for c, tokens in zip(chunks, bm25_tokens(texts), strict=True)
    ]


class Ingestion:
    def __init__(
        self,
        settings: RetrievalSettings,
        store: CollectionStore,
        embedder: Embedder,
        jobs: JobStore | None,
        catch_up: CatchUp | None = None,
    ) -> None:
        """`catch_up`: copy missing collections from peers once this replica's events queue
        exists, before consuming events or jobs (`wait_caught_up` returns when done)."""
        self._settings = settings
        self._store = store
        self._embedder = embedder
        self._jobs = jobs
        self._topology = Topology(settings.namespace)
        name = f"{settings.namespace or 'ragmesh'}.retrieval.{settings.replica_id}"
        self._publisher = LazyChannel(
            settings.amqp_url, name=f"{name}.publisher", declare=lambda ch: declare_index_events(ch, self._topology)
        )
        # Embedding is CPU-bound: one job at a time.
        self._job_consumer = SupervisedConsumer(
            settings.amqp_url,
            name=f"{name}.ingest",
            prefetch=1,
            declare=lambda ch: declare_ingest(ch, self._topology),
            handle=self._on_job,
        )
        self._event_consumer = SupervisedConsumer(
            settings.amqp_url,
            name=f"{name}.events",
            prefetch=16,
            declare=lambda ch: declare_replica_events(ch, self._topology, settings.replica_id),
            handle=self._on_event,
        )
        self._catch_up = catch_up
        self._starter: asyncio.Task[None] | None = None
        self._caught_up = asyncio.Event()

    # --- lifecycle ------------------------------------------------------------------

    def start(self) -> None:
        """Consume the ingest queue and this replica's index.events queue (each supervised:
        (re)connecting until the broker answers); first catch up, when there is a catch-up."""
        if self._catch_up is None:
            self._begin_consuming()
            return
        self._starter = asyncio.create_task(self._catch_up_then_consume(self._catch_up), name="catch-up")

    def _begin_consuming(self) -> None:
        self._caught_up.set()
        self._job_consumer.start()
        self._event_consumer.start()

    async def _catch_up_then_consume(self, catch_up: CatchUp) -> None:
        while True:
            try:
                new_replica = await self._declare_own_queue()
                break
            except Exception as exc:  # noqa: BLE001 - the broker may come later
                log.warning("catch-up waiting for RabbitMQ", extra={"error": repr(exc)})
                await asyncio.sleep(2.0)
        # Changes wait in this replica's queue from now on: what came before is copied from a peer.
        try:
            await catch_up.run(new_replica)
        except Exception:
            log.exception("catching up failed; serving the collections this replica has")
        self._begin_consuming()

    async def _declare_own_queue(self) -> bool:
        """Declare this replica's events queue; whether it is new (did not exist before)."""
        connection = await self._publisher.connection()
        probe = await connection.channel()  # a failed passive declare closes its channel
        try:
            await probe.declare_queue(self._topology.index_events_queue(self._settings.replica_id), passive=True)
            existed = True
        except ChannelNotFoundEntity:
            existed = False
        finally:
            if not probe.is_closed:
                await probe.close()
        channel = await connection.channel()
        try:
            await declare_replica_events(channel, self._topology, self._settings.replica_id)
        finally:
            await channel.close()
        return not existed

    async def wait_caught_up(self) -> None:
        """Until the collections this replica lacked are copied from a peer (see CatchUp)."""
        await self._caught_up.wait()

    async def stop_consuming(self) -> None:
        """SIGTERM: take no new jobs or events; the ones in hand go on until `close`."""
        await asyncio.gather(self._job_consumer.pause(), self._event_consumer.pause())

    def state(self) -> str:
        """Readiness: "ok" while both consumers consume, else what is wrong."""
        states = {"ingest": self._job_consumer.state, "index.events": self._event_consumer.state}
        bad = {k: v for k, v in states.items() if v != "ok"}
        return "ok" if not bad else "; ".join(f"{k}: {v}" for k, v in bad.items())

    async def close(self) -> None:
        """Stop consuming; the job in hand gets the grace (counted from the first pause) to finish,
        and is not acked if it does not: the broker gives it to another replica."""
        if self._starter is not None:
            self._starter.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._starter
        await asyncio.gather(
            self._job_consumer.stop(self._settings.shutdown_grace),
            self._event_consumer.stop(self._settings.shutdown_grace),
        )
        await self._publisher.close()

    async def announce(self, event: ingest_pb2.IndexEvent) -> None:
        """Publish a change this replica made to every other replica (confirmed)."""
        event.origin = self._settings.replica_id
        channel = await self._publisher.get()
        exchange = await channel.get_exchange(self._topology.index_events_exchange, ensure=False)
        await exchange.publish(
            persistent_message(event.SerializeToString(), message_id=f"{event.collection_id}", type_="index.event"),
            routing_key="",
        )

    # --- jobs ---------------------------------------------------------------------------

    async def _on_job(self, message: AbstractIncomingMessage) -> None:
        """Handle one ingest job and settle its delivery (shared `settle`), whatever was raised:
        a handler that raises dead-letters the job (to `ingest.dead`), never leaves it unsettled
        (with prefetch 1, an unsettled job would stop this replica's ingestion)."""
        with consuming(message, "ingest job"):
            try:
                verdict = await self._handle_job(message)
            except Exception:
                log.exception("ingest job handler failed; the message is dead-lettered")
                JOBS.labels("handler_error").inc()
                await settle(message)
                return
            if verdict is _Verdict.REQUEUE:
                await asyncio.sleep(RETRY_DELAY)
            await settle(message, ack=verdict is _Verdict.ACK, requeue=verdict is _Verdict.REQUEUE)

    async def _handle_job(self, message: AbstractIncomingMessage) -> _Verdict:
        """Process one job; what to do with its delivery."""
        try:
            job = ingest_pb2.IngestJob.FromString(message.body)
        except DecodeError:
            log.error("undecodable ingest message dead-lettered", extra={"message_id": message.message_id})
            JOBS.labels("poison").inc()
            return _Verdict.DEAD_LETTER
        try:
            await self._process(job)
        except CollectionGoneError:
            JOBS.labels("collection_gone").inc()
            await self._record(self._fail(job.job_id, f"collection '{job.collection}' was deleted"))
            return _Verdict.ACK
        except JOB_DEFERRED_ERRORS as exc:
            # Transient: the broker or Redis blinked (announcing the change, say). The job goes back
            # to the queue; its redelivery finds it applied and only announces it.
            log.warning("ingest job deferred", extra={"job": job.job_id, "error": str(exc)})
            JOBS.labels("retried").inc()
            return _Verdict.REQUEUE
        except Exception as exc:
            log.exception("ingest job failed", extra={"job": job.job_id})
            JOBS.labels("failed").inc()
            await self._record(self._fail(job.job_id, f"{type(exc).__name__}: {exc}"))
            return _Verdict.DEAD_LETTER
        JOBS.labels("succeeded").inc()
        return _Verdict.ACK

    async def _fail(self, job_id: str, error: str) -> None:
        if self._jobs is not None:
            await self._jobs.failed(job_id, error)

    @staticmethod
    async def _record(update: object) -> None:
        """A job-status write whose failure must not hide the job's real outcome."""
        try:
            await update  # type: ignore[misc]
        except (RedisError, OSError) as exc:
            log.warning("job status not recorded", extra={"error": str(exc)})

    async def _process(self, job: ingest_pb2.IngestJob) -> None:
        check_job(job)
        async with self._store.lock(job.collection):
            snapshot = await self._store.ensure_local(job.collection, job.collection_id)
            if snapshot is None:
                raise CollectionGoneError()
            total = len(job.chunks)
            already = job.job_id in snapshot.meta.applied_jobs
            if self._jobs is not None and not already:
                await self._jobs.running(job.job_id)
            vectors = await self._embed_with_progress(job, total, snapshot.meta.id)
            if already:
                version = snapshot.meta.version
            else:
                records = await asyncio.to_thread(records_from, job.chunks)
                version = await self._store.next_version(snapshot)
                snapshot = await self._store.add_chunks(snapshot, records, vectors, version=version, job_id=job.job_id)
                CHUNKS_INDEXED.inc(total)
            await self.announce(_added_event(snapshot, job, vectors, version))
            if self._jobs is not None:
                await self._jobs.succeeded(job.job_id, total)

    async def _embed_with_progress(self, job: ingest_pb2.IngestJob, total: int, collection_id: str) -> np.ndarray:
        texts = [embedding_text(c.title, c.text) for c in job.chunks]
        parts = []
        step = self._settings.ingest_batch_size
        for begin in range(0, total, step):
            if self._store.is_gone(collection_id):
                raise CollectionGoneError()  # deleted meanwhile: no point embedding the rest
            parts.append(await self._embedder.embed(texts[begin : begin + step], bulk=True))
            if self._jobs is not None:
                await self._record(self._jobs.progress(job.job_id, min(total, begin + step)))
        if not parts:
            return np.zeros((0, self._embedder.dimensions), dtype=np.float32)
        return np.concatenate(parts)

    # --- events --------------------------------------------------------------------------

    async def _on_event(self, message: AbstractIncomingMessage) -> None:
        with consuming(message, "index event"):
            await self._handle_event(message)

    async def _handle_event(self, message: AbstractIncomingMessage) -> None:
        try:
            event = ingest_pb2.IndexEvent.FromString(message.body)
        except DecodeError:
            log.error("undecodable index event dead-lettered", extra={"message_id": message.message_id})
            EVENTS_FAILED.labels("poison").inc()
            await settle(message)
            return
        if event.origin == self._settings.replica_id:
            await settle(message, ack=True)
            return
        try:
            await self._apply(event)
        except Exception as exc:  # noqa: BLE001 - retried, then dead-lettered; the queue moves on
            await self._retry_or_dead_letter(message, event, exc)
            return
        await settle(message, ack=True)

    async def _retry_or_dead_letter(
        self, message: AbstractIncomingMessage, event: ingest_pb2.IndexEvent, exc: Exception
    ) -> None:
        attempt = retries_of(message) + 1
        where = {"collection": event.collection, "attempt": attempt, "error": repr(exc)}
        if attempt > self._settings.index_event_max_retries:
            log.error("index event dead-lettered: this replica misses the change", extra=where)
            EVENTS_FAILED.labels("dead_lettered").inc()
            await settle(message)
            return
        log.warning("index event not applied; retrying later", extra=where)
        EVENTS_FAILED.labels("retried").inc()
        delay = backoff_seconds(attempt, self._settings.index_event_backoff, EVENT_BACKOFF_MAX)
        try:
            channel = await self._publisher.get()
            await channel.default_exchange.publish(
                retry_copy(message, attempt, delay),
                routing_key=self._topology.index_events_retry_queue(self._settings.replica_id),
            )
        except Exception as publish_error:  # noqa: BLE001 - the broker is away: the event goes back as it is
            log.warning("index event requeued", extra={"error": repr(publish_error)})
            await asyncio.sleep(RETRY_DELAY)
            await settle(message, requeue=True)
            return
        await settle(message, ack=True)

    async def _apply(self, event: ingest_pb2.IndexEvent) -> None:
        change = event.WhichOneof("change")
        if change == "created":
            async with self._store.lock(event.collection):
                await self._store.ensure_local(event.collection, event.collection_id, event.created.created)
        elif change == "deleted":
            await self._store.drop_if(event.collection, event.collection_id)
        elif change == "added":
            added = event.added
            async with self._store.lock(event.collection):
                snapshot = await self._store.ensure_local(event.collection, event.collection_id)
                if snapshot is None or added.job_id in snapshot.meta.applied_jobs:
                    return
                vectors = np.frombuffer(added.vectors, dtype="<f4").reshape(len(added.chunks), added.dimensions)
                records = await asyncio.to_thread(records_from, added.chunks)
                version = max(added.version, snapshot.meta.version + 1)
                try:
                    await self._store.add_chunks(snapshot, records, vectors, version=version, job_id=added.job_id)
                except CollectionGoneError:
                    return
        EVENTS_APPLIED.labels(change or "unknown").inc()


def _added_event(
    snapshot: Snapshot, job: ingest_pb2.IngestJob, vectors: np.ndarray, version: int
) -> ingest_pb2.IndexEvent:
    return ingest_pb2.IndexEvent(
        collection=snapshot.meta.name,
        collection_id=snapshot.meta.id,
        added=ingest_pb2.ChunksAdded(
            job_id=job.job_id,
            version=version,
            chunks=job.chunks,
            vectors=np.ascontiguousarray(vectors, dtype="<f4").tobytes(),
            dimensions=vectors.shape[1] if len(vectors) else 0,
        ),
    )
