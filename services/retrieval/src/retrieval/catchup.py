"""Catching up: a replica that lacks collections the registry lists copies them from a peer.

A new replica, or one whose data folder was lost, starts with no collections
while the registry (Redis) lists some. Changes reach replicas through their own
durable `index.events` queue, so what happened before that queue existed never
will. Such a replica therefore declares its queue first (changes from then on
wait there), then asks its peers (`RAGMESH_RETRIEVAL_PEERS`) for a whole copy of
each collection it lacks (`ExportCollection`: state, chunks, vectors), installs
it, and only then applies the queued changes and starts serving (its gRPC
health stays NOT_SERVING meanwhile). A change that is in the copy and in the
queue is applied once: the copy lists the ingestion jobs it holds.

A peer that is itself behind (its own queue not yet drained) may have an older
copy: the copy's version is checked against the registry's, and another peer is
asked; the newest copy seen is kept when none is current.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import grpc
import numpy as np
from google.protobuf.json_format import MessageToDict
from google.protobuf.struct_pb2 import Struct

from ragmesh.errors import ErrorKind, RagmeshError
from ragmesh.grpc_client import call_metadata, create_channel
from ragmesh.v1 import ingest_pb2, retrieval_pb2, retrieval_pb2_grpc
from retrieval.index import ChunkRecord, Meta, Snapshot, bm25_tokens, embedding_text
from retrieval.settings import RetrievalSettings
from retrieval.store import CollectionStore, RegistryEntry, RegistryUnavailableError

log = logging.getLogger(__name__)

# Chunks per part of an export (with 384 dimensions: 1.5 MB of vectors and the texts).
EXPORT_BATCH = 1000
# Peers asked for one collection before the newest copy seen is taken.
ATTEMPTS = 6


@dataclass(frozen=True)
class Wanted:
    name: str
    entry: RegistryEntry


def export_parts(snapshot: Snapshot) -> list[retrieval_pb2.ExportCollectionResponse]:
    """A snapshot as ExportCollection sends it: its state, then its chunks and vectors in parts."""
    meta = snapshot.meta
    parts = [
        retrieval_pb2.ExportCollectionResponse(
            state=retrieval_pb2.CollectionState(
                name=meta.name,
                id=meta.id,
                created=meta.created,
                version=meta.version,
                applied_jobs=list(meta.applied_jobs),
                dimensions=meta.dimensions,
                chunks=len(snapshot.chunks),
            )
        )
    ]
    for begin in range(0, len(snapshot.chunks), EXPORT_BATCH):
        records = snapshot.chunks[begin : begin + EXPORT_BATCH]
        chunks = []
        for record in records:
            metadata = Struct()
            metadata.update(record.metadata)
            chunks.append(
                ingest_pb2.Chunk(
                    chunk_id=record.chunk_id,
                    document_id=record.document_id,
                    title=record.title,
                    text=record.text,
                    metadata=metadata,
                )
            )
        vectors = np.ascontiguousarray(snapshot.vectors[begin : begin + len(records)], dtype="<f4").tobytes()
        parts.append(
            retrieval_pb2.ExportCollectionResponse(chunks=retrieval_pb2.ChunkBatch(chunks=chunks, vectors=vectors))
        )
    return parts


def import_parts(
    state: retrieval_pb2.CollectionState, batches: list[retrieval_pb2.ChunkBatch], store: CollectionStore
) -> Snapshot:
    """The snapshot an export describes (blocking: builds the indexes)."""
    chunks = [chunk for batch in batches for chunk in batch.chunks]
    if len(chunks) != state.chunks:
        raise ValueError(f"the copy of {state.name!r} ended after {len(chunks)} of {state.chunks} chunks")
    dims = state.dimensions
    vectors = (
        np.concatenate([np.frombuffer(b.vectors, dtype="<f4").reshape(len(b.chunks), dims) for b in batches])
        if chunks
        else np.zeros((0, dims), dtype=np.float32)
    )
    tokens = bm25_tokens([embedding_text(c.title, c.text) for c in chunks]) if chunks else []
    records = [
        ChunkRecord(c.chunk_id, c.document_id, c.title, c.text, MessageToDict(c.metadata), t)
        for c, t in zip(chunks, tokens, strict=True)
    ]
    meta = Meta(
        name=state.name,
        id=state.id,
        created=state.created,
        version=state.version,
        applied_jobs=tuple(state.applied_jobs),
        dimensions=dims,
    )
    return Snapshot.build(meta, records, vectors, store.params)


def peer_addresses(settings: RetrievalSettings) -> str:
    """The peers, without this replica's own address when they are a static list."""
    if ":///" in settings.peers:
        return settings.peers.strip()  # a cluster's headless Service lists only ready pods: never this one
    port = settings.grpc_port
    own = {f"127.0.0.1:{port}", f"localhost:{port}", f"{settings.host}:{port}"}
    return ",".join(a.strip() for a in settings.peers.split(",") if a.strip() and a.strip() not in own)


class CatchUp:
    def __init__(self, settings: RetrievalSettings, store: CollectionStore) -> None:
        self._settings = settings
        self._store = store

    async def missing(self) -> list[Wanted]:
        """Collections the registry lists that this replica has no copy of (or a copy of an
        older collection of the same name); none when Redis does not answer."""
        try:
            registry = await self._store.registry()
        except RegistryUnavailableError:
            return []
        wanted = []
        for name, entry in sorted(registry.items()):
            local = self._store.local(name)
            if local is None or local.meta.id != entry.id:
                wanted.append(Wanted(name, entry))
        return wanted

    async def behind(self) -> list[Wanted]:
        """Collections this replica has, older than the registry's version of them."""
        try:
            registry = await self._store.registry()
            wanted = []
            for name, entry in sorted(registry.items()):
                local = self._store.local(name)
                same = local is not None and local.meta.id == entry.id
                if same and local.meta.version < await self._store.global_version(entry.id):  # type: ignore[union-attr]
                    wanted.append(Wanted(name, entry))
        except RegistryUnavailableError:
            return []
        return wanted

    async def run(self, new_replica: bool) -> int:
        """Copy what this replica lacks (and, when its events queue is new, what it has
        behind) from its peers; how many collections were copied."""
        peers = peer_addresses(self._settings)
        wanted = await self.missing()
        if new_replica:
            wanted += await self.behind()
        if not peers or not wanted:
            return 0
        copied = 0
        # Balanced over the peers but not health-checked: a peer that is catching up
        # itself (NOT_SERVING) still answers for the collections it has.
        async with create_channel(peers, health_checked=False) as channel:
            stub = retrieval_pb2_grpc.RetrievalStub(channel)
            for item in wanted:
                async with self._store.lock(item.name):
                    snapshot = await self._fetch(stub, item)
                    if snapshot is None or self._store.is_gone(item.entry.id):
                        continue
                    await self._store.install(snapshot)
                copied += 1
                log.info(
                    "collection copied from a peer",
                    extra={"collection": item.name, "chunks": len(snapshot.chunks), "version": snapshot.meta.version},
                )
        return copied

    async def _fetch(self, stub: retrieval_pb2_grpc.RetrievalAsyncStub, item: Wanted) -> Snapshot | None:
        """The newest copy of a collection the peers have, asking until one is current."""
        best: tuple[retrieval_pb2.CollectionState, list[retrieval_pb2.ChunkBatch]] | None = None
        try:
            current = await self._store.global_version(item.entry.id)
        except RegistryUnavailableError:
            current = 0
        for attempt in range(ATTEMPTS):
            try:
                copy = await asyncio.wait_for(self._download(stub, item.name), self._settings.catch_up_timeout)
            except (grpc.aio.AioRpcError, RagmeshError, TimeoutError, ValueError) as exc:
                log.warning("no copy from this peer", extra={"collection": item.name, "error": repr(exc)})
                await asyncio.sleep(min(2.0, 0.25 * (attempt + 1)))
                continue
            state = copy[0]
            if state.id != item.entry.id:
                continue  # the peer holds another collection of that name (not caught up itself)
            if best is None or state.version > best[0].version:
                best = copy
            if state.version >= current:
                break
        if best is None:
            log.error("no peer had a copy; the collection starts empty here", extra={"collection": item.name})
            return None
        return await asyncio.to_thread(import_parts, best[0], best[1], self._store)

    async def _download(
        self, stub: retrieval_pb2_grpc.RetrievalAsyncStub, name: str
    ) -> tuple[retrieval_pb2.CollectionState, list[retrieval_pb2.ChunkBatch]]:
        call = stub.ExportCollection(retrieval_pb2.ExportCollectionRequest(name=name), metadata=call_metadata())
        state: retrieval_pb2.CollectionState | None = None
        batches: list[retrieval_pb2.ChunkBatch] = []
        async for part in call:
            if part.HasField("state"):
                state = part.state
            else:
                batches.append(part.chunks)
        if state is None:
            raise RagmeshError(ErrorKind.INTERNAL, "an export without its state")
        return state, batches
