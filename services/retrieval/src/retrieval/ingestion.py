"""The asynchronous side of retrieval: the `ingest` queue and `index.events`.

A job is acked only once its chunks are embedded, indexed and saved to disk,
and the change is published to `index.events`; a job that cannot be processed
is dead-lettered (to `ingest.dead`) with the error recorded on the job. A
redelivered job that was already applied (the replica died before its ack) is
recognised by its id and only re-announced, never indexed twice.

Every replica consumes `index.events` through a durable queue of its own, so
changes made while it was down are applied when it comes back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence

import numpy as np
from aio_pika.abc import (
    AbstractChannel,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractRobustConnection,
)
from aio_pika.exceptions import ChannelNotFoundEntity
from google.protobuf.json_format import MessageToDict
from google.protobuf.message import DecodeError
from prometheus_client import Counter
from redis.exceptions import RedisError

from ragmesh.amqp import Topology, connect, consuming, declare_index_events, declare_ingest, persistent_message
from ragmesh.consumers import ConsumerGate
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

# Seconds to wait before a job that hit a transient failure goes back to the queue.
RETRY_DELAY = 1.0


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
        exists, before applying its events or taking jobs (`caught_up` is set when done)."""
        self._settings = settings
        self._store = store
        self._embedder = embedder
        self._jobs = jobs
        self._topology = Topology(settings.namespace)
        self._connection: AbstractRobustConnection | None = None
        self._publish_channel: AbstractChannel | None = None
        self._events: AbstractExchange | None = None
        self._starter: asyncio.Task[None] | None = None
        self._gate = ConsumerGate(settings.shutdown_grace)
        self._catch_up = catch_up
        self.caught_up = asyncio.Event()
        self.ready = False

    # --- lifecycle ------------------------------------------------------------------

    def start(self) -> None:
        """Connect in the background (retrying until the broker answers), then consume."""
        self._starter = asyncio.create_task(self._connect_and_consume())

    async def _connect_and_consume(self) -> None:
        while True:
            try:
                self._connection = await connect(self._settings.amqp_url)
                break
            except (TimeoutError, OSError, ConnectionError) as exc:
                log.warning("RabbitMQ unavailable, retrying", extra={"error": str(exc)})
                await asyncio.sleep(2.0)
        self._publish_channel = await self._connection.channel(publisher_confirms=True)
        self._events = await declare_index_events(self._publish_channel, self._topology)

        events_channel = await self._connection.channel()
        await events_channel.set_qos(prefetch_count=16)
        events = await declare_index_events(events_channel, self._topology)
        queue_name = self._topology.index_events_queue(self._settings.replica_id)
        new_replica = not await self._queue_exists(queue_name)
        mine = await events_channel.declare_queue(
            queue_name,
            durable=True,
            # A replica gone for a week is gone for good: its queue goes too.
            arguments={"x-expires": 7 * 24 * 3600 * 1000},
        )
        await mine.bind(events)
        # Changes wait in the queue from now on: what came before is copied from a peer.
        if self._catch_up is not None:
            try:
                await self._catch_up.run(new_replica)
            except Exception:
                log.exception("catching up failed; serving the collections this replica has")
        self.caught_up.set()
        await self._gate.consume(mine, self._on_event)

        jobs_channel = await self._connection.channel()
        await jobs_channel.set_qos(prefetch_count=1)  # embedding is CPU-bound: one job at a time
        ingest_queue = await declare_ingest(jobs_channel, self._topology)
        await self._gate.consume(ingest_queue, self._on_job)
        self.ready = True
        log.info("consuming", extra={"queue": ingest_queue.name, "events": mine.name})

    async def wait_caught_up(self) -> None:
        """Until the collections this replica lacked are copied from a peer (see CatchUp)."""
        await self.caught_up.wait()

    async def _queue_exists(self, name: str) -> bool:
        assert self._connection is not None
        channel = await self._connection.channel()  # a failed passive declare closes its channel
        try:
            await channel.declare_queue(name, passive=True)
        except ChannelNotFoundEntity:
            return False
        finally:
            if not channel.is_closed:
                await channel.close()
        return True

    async def stop_consuming(self) -> None:
        """SIGTERM: take no new jobs or events; the one in hand goes on until `close`."""
        await self._gate.stop()

    async def close(self) -> None:
        """Stop consuming, let the job in hand finish (the grace from the first stop), close.
        A job still running then is not acked: the broker gives it to another replica."""
        await self._gate.settle()
        if self._starter is not None:
            self._starter.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._starter
        if self._connection is not None:
            await self._connection.close()

    async def announce(self, event: ingest_pb2.IndexEvent) -> None:
        """Publish a change this replica made to every other replica (confirmed)."""
        if self._events is None:
            raise ConnectionError("not connected to RabbitMQ yet")
        event.origin = self._settings.replica_id
        await self._events.publish(
            persistent_message(event.SerializeToString(), message_id=f"{event.collection_id}", type_="index.event"),
            routing_key="",
        )

    # --- jobs ---------------------------------------------------------------------------

    async def _on_job(self, message: AbstractIncomingMessage) -> None:
        with consuming(message, "ingest job"):
            await self._handle_job(message)

    async def _handle_job(self, message: AbstractIncomingMessage) -> None:
        try:
            job = ingest_pb2.IngestJob.FromString(message.body)
        except DecodeError:
            log.error("undecodable ingest message dead-lettered", extra={"message_id": message.message_id})
            JOBS.labels("poison").inc()
            await message.reject(requeue=False)
            return
        try:
            await self._process(job)
        except CollectionGoneError:
            JOBS.labels("collection_gone").inc()
            await self._record(self._fail(job.job_id, f"collection '{job.collection}' was deleted"))
            await message.ack()
        except (TimeoutError, RedisError, RegistryUnavailableError, ConnectionError, OSError) as exc:
            # Transient: the broker or Redis blinked. The job goes back to the queue.
            log.warning("ingest job deferred", extra={"job": job.job_id, "error": str(exc)})
            JOBS.labels("retried").inc()
            await asyncio.sleep(RETRY_DELAY)
            await message.nack(requeue=True)
        except Exception as exc:
            log.exception("ingest job failed", extra={"job": job.job_id})
            JOBS.labels("failed").inc()
            await self._record(self._fail(job.job_id, f"{type(exc).__name__}: {exc}"))
            await message.reject(requeue=False)
        else:
            JOBS.labels("succeeded").inc()
            await message.ack()

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
            log.error("undecodable index event dropped")
            await message.reject(requeue=False)
            return
        if event.origin == self._settings.replica_id:
            await message.ack()
            return
        try:
            await self._apply(event)
        except Exception:
            log.exception("index event not applied; retrying", extra={"collection": event.collection})
            await asyncio.sleep(RETRY_DELAY)
            await message.nack(requeue=True)
            return
        await message.ack()

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
