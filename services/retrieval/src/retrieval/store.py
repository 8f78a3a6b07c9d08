"""The collections of one retrieval replica, and the registry all replicas share.

Each replica holds its own copy of every collection on its own disk. A Redis
hash (the registry) says which collections exist, and under which id: it makes
a creation or a deletion visible to every replica at once, while the data
itself reaches other replicas through `index.events`. A per-collection version
counter in Redis orders changes across replicas and keys the result cache.
When Redis is unreachable a replica falls back to what it has on disk.
"""

from __future__ import annotations

import asyncio
import logging
import re
import shutil
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import orjson
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from ragmesh.errors import ErrorKind, RagmeshError, invalid_request
from ragmesh.redis_keys import RedisKeys
from retrieval.hnsw_builder import HnswBuilder
from retrieval.index import ChunkRecord, HnswBase, IndexParams, Meta, Snapshot
from retrieval.index_files import prune_hnsw, save_hnsw
from retrieval.settings import RetrievalSettings

log = logging.getLogger(__name__)

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
MAX_MODEL_NAME = 256

# Compare-and-set of one registry field: a deletion (or re-creation) between the
# read and the write is never undone by the write.
_CAS_SCRIPT = """
if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
  return 1
end
return 0
"""


# A version not read yet (None is Redis's answer for a key that does not exist).
_UNREAD = object()


@dataclass(frozen=True)
class RegistryEntry:
    id: str
    created: int
    reranker: str = ""  # the collection's default reranking model


@dataclass(frozen=True)
class SearchView:
    """What a search needs: the local snapshot and, when Redis answers, the global version."""

    snapshot: Snapshot
    global_version: int | None
    reranker: str = ""  # the collection's default reranking model ("" when Redis cannot say)


def check_name(name: str) -> None:
    if not NAME_PATTERN.match(name):
        raise invalid_request(
            "Collection names are 1-64 characters: letters, digits, '_', '-' and '.', starting with a letter or digit.",
            param="name",
        )


def registry_down() -> RagmeshError:
    return RagmeshError(ErrorKind.UNAVAILABLE, "The collection registry (Redis) is unavailable; retry shortly.")


def not_found(name: str) -> RagmeshError:
    return RagmeshError(
        ErrorKind.NOT_FOUND, f"Collection '{name}' does not exist.", param="collection", code="collection_not_found"
    )


class RegistryUnavailableError(Exception):
    """Redis did not answer."""


class CollectionGoneError(Exception):
    """The collection was deleted (or re-created) while work on it was under way."""


class CollectionStore:
    def __init__(self, settings: RetrievalSettings, redis: aioredis.Redis | None) -> None:
        self._settings = settings
        self._redis = redis
        self._root = Path(settings.collections_root()) / "collections"
        self._snapshots: dict[str, Snapshot] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._schema = RedisKeys(settings.namespace)
        self._registry_key = self._schema.collections
        # Present as long as Redis has kept the registry (absent after a flush).
        self._epoch_key = self._schema.collections_epoch
        # Ids of collections deleted while this process runs: work on them stops.
        self._gone: set[str] = set()
        self._cleanups: set[asyncio.Task[None]] = set()
        self.params = IndexParams(
            settings.hnsw_threshold, settings.hnsw_m, settings.hnsw_ef_construction, settings.hnsw_ef_search
        )
        self.hnsw = HnswBuilder(self)

    # --- startup ----------------------------------------------------------------

    def load_all(self) -> list[Meta]:
        """Load every collection saved on this replica's disk (blocking); their metadata."""
        self._root.mkdir(parents=True, exist_ok=True)
        for folder in sorted(self._root.iterdir()):
            if not folder.is_dir():
                continue
            snapshot = Snapshot.load(folder, self.params)
            if snapshot is None:
                shutil.rmtree(folder, ignore_errors=True)  # created but never saved: nothing to keep
                continue
            self._snapshots[snapshot.meta.name] = snapshot
            log.info("collection loaded", extra={"collection": snapshot.meta.name, "chunks": len(snapshot.chunks)})
        return [snapshot.meta for snapshot in self._snapshots.values()]

    async def reconcile(self) -> None:
        """Make the registry and this replica agree after a start.

        When Redis lost the registry (its epoch marker is gone), the collections
        on disk are registered again. Otherwise the registry is the truth: a
        collection it lacks, or lists under another id, was deleted (and maybe
        re-created) while this replica was away, so the local copy goes.
        """
        try:
            registry = await self._registry_all()
            epoch = await self._redis_call(self._redis.get(self._epoch_key))  # type: ignore[union-attr]
        except RegistryUnavailableError:
            log.warning("registry unavailable at start; serving collections from disk")
            return
        assert self._redis is not None
        for name, snapshot in list(self._snapshots.items()):
            entry = registry.get(name)
            if entry is None and not epoch:
                entry_json = _entry_json(snapshot.meta.id, snapshot.meta.created)
                await self._redis_call(self._redis.hsetnx(self._registry_key, name, entry_json))
                log.warning("collection registered again from disk", extra={"collection": name})
            elif entry is None or entry.id != snapshot.meta.id:
                await self._drop_local(name)
        await self._redis_call(self._redis.setnx(self._epoch_key, int(time.time())))

    # --- registry ---------------------------------------------------------------

    async def _redis_call(self, awaitable: object) -> object:
        if self._redis is None:
            raise RegistryUnavailableError()
        try:
            return await awaitable  # type: ignore[misc]
        except (RedisError, OSError) as exc:
            log.warning("registry unavailable", extra={"error": str(exc)})
            raise RegistryUnavailableError() from exc

    async def _registry_all(self) -> dict[str, RegistryEntry]:
        if self._redis is None:
            raise RegistryUnavailableError()
        raw = await self._redis_call(self._redis.hgetall(self._registry_key))
        assert isinstance(raw, dict)
        return {_text(k): _entry(v) for k, v in raw.items()}

    async def registry_entry(self, name: str) -> RegistryEntry | None:
        if self._redis is None:
            raise RegistryUnavailableError()
        raw = await self._redis_call(self._redis.hget(self._registry_key, name))
        return _entry(raw) if raw else None

    def _version_key(self, collection_id: str) -> str:
        return self._schema.collection_version(collection_id)

    # --- collections --------------------------------------------------------------

    async def registry(self) -> dict[str, RegistryEntry]:
        """Every collection the registry lists (RegistryUnavailableError when Redis does not answer)."""
        return await self._registry_all()

    async def global_version(self, collection_id: str) -> int:
        """The version of the latest change any replica made to a collection."""
        if self._redis is None:
            raise RegistryUnavailableError()
        version = await self._redis_call(self._redis.get(self._version_key(collection_id)))
        return int(version) if version else 0  # type: ignore[call-overload]

    async def install(self, snapshot: Snapshot) -> None:
        """Save and serve a whole copy of a collection, replacing this replica's (call under its lock)."""
        self._snapshots[snapshot.meta.name] = await asyncio.to_thread(snapshot.save, self._root / snapshot.meta.name)
        self.hnsw.schedule(snapshot.meta.name)

    def lock(self, name: str) -> asyncio.Lock:
        return self._locks.setdefault(name, asyncio.Lock())

    def local(self, name: str) -> Snapshot | None:
        return self._snapshots.get(name)

    async def names(self) -> list[str]:
        """Every collection's name: the registry's, or this replica's when Redis is down."""
        try:
            return sorted(await self._registry_all())
        except RegistryUnavailableError:
            return sorted(self._snapshots)

    async def create(self, name: str, reranker: str = "") -> Snapshot:
        check_name(name)
        check_model_name(reranker)
        meta = Meta(name=name, id=uuid.uuid4().hex, created=int(time.time()))
        if self._redis is None:
            raise RagmeshError(ErrorKind.UNAVAILABLE, "The collection registry (Redis) is not configured.")
        try:
            taken = not await self._redis_call(
                self._redis.hsetnx(self._registry_key, name, _entry_json(meta.id, meta.created, reranker))
            )
        except RegistryUnavailableError:
            raise RagmeshError(
                ErrorKind.UNAVAILABLE, "The collection registry (Redis) is unavailable; retry shortly."
            ) from None
        if taken:
            raise RagmeshError(
                ErrorKind.CONFLICT, f"Collection '{name}' already exists.", param="name", code="collection_exists"
            )
        await self._redis_call(self._redis.setnx(self._epoch_key, int(time.time())))
        async with self.lock(name):
            return await self._install_empty(meta)

    async def ensure_local(self, name: str, collection_id: str, created: int = 0) -> Snapshot | None:
        """This replica's copy of a collection the registry knows (created empty if it is new here)."""
        if collection_id in self._gone:
            return None
        snapshot = self._snapshots.get(name)
        if snapshot is not None and snapshot.meta.id == collection_id:
            return snapshot
        try:
            entry = await self.registry_entry(name)
        except RegistryUnavailableError:
            entry = RegistryEntry(collection_id, created) if created else None
        if entry is None or entry.id != collection_id:
            return None  # deleted (or re-created) since
        if snapshot is not None:
            await self._drop_local(name)
        return await self._install_empty(Meta(name=name, id=entry.id, created=entry.created))

    async def _install_empty(self, meta: Meta) -> Snapshot:
        snapshot = await asyncio.to_thread(Snapshot(meta).save, self._root / meta.name)
        self._snapshots[meta.name] = snapshot
        return snapshot

    async def delete(self, name: str) -> Snapshot:
        """Remove a collection everywhere: from the registry at once, from this disk soon after.

        No lock is taken for the registry: an ingestion job holding the
        collection may run for minutes, and the deletion must not wait for it.
        The job sees the deletion (`is_gone`) and is abandoned.
        """
        check_name(name)
        try:
            entry = await self.registry_entry(name)
        except RegistryUnavailableError:
            raise registry_down() from None
        if entry is None:
            raise not_found(name)
        assert self._redis is not None
        await self._redis_call(self._redis.hdel(self._registry_key, name))
        await self._redis_call(self._redis.delete(self._version_key(entry.id)))
        local = self._snapshots.get(name)
        self._forget(name, entry.id)
        if local is not None and local.meta.id == entry.id:
            return local
        return Snapshot(Meta(name=name, id=entry.id, created=entry.created))

    async def set_reranker(self, name: str, reranker: str) -> RegistryEntry:
        """Name a collection's default reranking model ("" for none), in one compare-and-set."""
        check_name(name)
        check_model_name(reranker)
        if self._redis is None:
            raise registry_down()
        for _ in range(10):
            try:
                raw = await self._redis_call(self._redis.hget(self._registry_key, name))
                if not raw:
                    raise not_found(name)
                entry = _entry(raw)
                new = _entry_json(entry.id, entry.created, reranker)
                swapped = await self._redis_call(
                    self._redis.eval(_CAS_SCRIPT, 1, self._registry_key, name, raw, new)  # type: ignore[arg-type]
                )
            except RegistryUnavailableError:
                raise registry_down() from None
            if swapped:
                return RegistryEntry(entry.id, entry.created, reranker)
        raise RagmeshError(ErrorKind.CONFLICT, f"Collection '{name}' is changing; retry.", code="conflict")

    async def drop_if(self, name: str, collection_id: str) -> None:
        """Apply a deletion another replica made."""
        self._forget(name, collection_id)

    async def _registered(self, snapshot: Snapshot) -> bool:
        """Whether the registry still lists this collection (true when Redis cannot say)."""
        try:
            entry = await self.registry_entry(snapshot.meta.name)
        except RegistryUnavailableError:
            return True
        if entry is None or entry.id != snapshot.meta.id:
            self._gone.add(snapshot.meta.id)
            return False
        return True

    def is_gone(self, collection_id: str) -> bool:
        return collection_id in self._gone

    def _forget(self, name: str, collection_id: str) -> None:
        """Stop serving a collection now; remove its files once no job holds it."""
        self._gone.add(collection_id)
        local = self._snapshots.get(name)
        if local is not None and local.meta.id == collection_id:
            del self._snapshots[name]

        async def cleanup() -> None:
            async with self.lock(name):
                if name not in self._snapshots:  # not re-created meanwhile
                    await asyncio.to_thread(shutil.rmtree, self._root / name, True)

        task = asyncio.create_task(cleanup())
        self._cleanups.add(task)
        task.add_done_callback(self._cleanups.discard)

    async def _drop_local(self, name: str) -> None:
        self._snapshots.pop(name, None)
        await asyncio.to_thread(shutil.rmtree, self._root / name, True)

    async def resolve(self, name: str) -> SearchView:
        """The collection to search, checked against the registry so a deletion shows at once."""
        check_name(name)
        local = self._snapshots.get(name)
        try:
            if local is not None:
                # The common case: the registry names this replica's copy, whose global version
                # comes in the same round trip.
                entry, version = await self._entry_and_version(name, local.meta.id)
            else:
                entry, version = await self.registry_entry(name), _UNREAD
        except RegistryUnavailableError:
            if local is None:
                raise not_found(name) from None
            return SearchView(local, None)
        if entry is None:
            raise not_found(name)
        snapshot = local
        if snapshot is None or snapshot.meta.id != entry.id:
            # Created elsewhere and not yet applied here: an empty view of it.
            snapshot = Snapshot(Meta(name=name, id=entry.id, created=entry.created))
            version = _UNREAD
        if version is _UNREAD:
            assert self._redis is not None
            try:
                version = await self._redis_call(self._redis.get(self._version_key(entry.id)))
            except RegistryUnavailableError:
                return SearchView(snapshot, None, entry.reranker)
        return SearchView(snapshot, int(version) if version else 0, entry.reranker)  # type: ignore[call-overload]

    async def _entry_and_version(self, name: str, collection_id: str) -> tuple[RegistryEntry | None, object]:
        """The registry's entry for `name` and the global version of `collection_id`, in one round trip."""
        if self._redis is None:
            raise RegistryUnavailableError()

        async def both() -> list[object]:
            assert self._redis is not None
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.hget(self._registry_key, name)
                pipe.get(self._version_key(collection_id))
                return await pipe.execute()

        answers = await self._redis_call(both())
        assert isinstance(answers, list)
        raw, version = answers
        return (_entry(raw) if raw else None), version

    async def next_version(self, snapshot: Snapshot) -> int:
        """The version a new change gets: one past every change any replica made."""
        if self._redis is not None:
            try:
                version = await self._redis_call(self._redis.incr(self._version_key(snapshot.meta.id)))
                assert isinstance(version, int)
                return max(version, snapshot.meta.version + 1)
            except RegistryUnavailableError:
                pass
        return snapshot.meta.version + 1

    async def add_chunks(
        self,
        snapshot: Snapshot,
        chunks: Sequence[ChunkRecord],
        vectors: np.ndarray,
        *,
        version: int,
        job_id: str,
    ) -> Snapshot:
        """Build, save and install the snapshot with `chunks` added (call under the collection's lock)."""

        def build_and_save() -> Snapshot:
            updated = snapshot.with_chunks(chunks, vectors, self.params, version=version, job_id=job_id)
            if self.is_gone(snapshot.meta.id):
                raise CollectionGoneError()  # deleted while this was built: do not write it back
            return updated.save(self._root / snapshot.meta.name)

        if self.is_gone(snapshot.meta.id) or not await self._registered(snapshot):
            raise CollectionGoneError()
        updated = await asyncio.to_thread(build_and_save)
        if self.is_gone(snapshot.meta.id):
            raise CollectionGoneError()  # its files go with the cleanup that waits for this lock
        self._snapshots[snapshot.meta.name] = updated
        self.hnsw.schedule(snapshot.meta.name)
        return updated

    async def adopt_hnsw(self, name: str, built_from: Snapshot, base: HnswBase) -> bool:
        """Swap in a graph built over `built_from`'s rows, saved with the collection, if the
        collection is still that lineage (rows may have been added since); whether it was."""
        async with self.lock(name):
            current = self._snapshots.get(name)
            if current is None or not current.same_lineage(built_from) or self.is_gone(current.meta.id):
                return False
            if current.hnsw is not None and current.hnsw.rows >= base.rows:
                return True
            folder = self._root / name

            def persist() -> Snapshot:
                if not save_hnsw(current, base, folder):
                    return current.with_hnsw(base)  # not on disk: built again after a restart
                updated = current.with_hnsw(base, saved_rows=base.rows).save(folder)
                prune_hnsw(folder, updated)
                return updated

            self._snapshots[name] = await asyncio.to_thread(persist)
            return True

    def start_background(self) -> None:
        """Build the graphs the loaded collections lack (call once the event loop runs)."""
        for name in list(self._snapshots):
            self.hnsw.schedule(name)

    async def close(self) -> None:
        """Stop background work."""
        await self.hnsw.close()


def check_model_name(name: str) -> None:
    if len(name) > MAX_MODEL_NAME or (name and not name.strip()):
        raise invalid_request(f"A model name is at most {MAX_MODEL_NAME} characters, not blank.", param="reranker")


def _entry_json(collection_id: str, created: int, reranker: str = "") -> bytes:
    entry: dict[str, object] = {"id": collection_id, "created": created}
    if reranker:
        entry["reranker"] = reranker
    return orjson.dumps(entry)


def _entry(raw: object) -> RegistryEntry:
    data = orjson.loads(raw)  # type: ignore[arg-type]
    return RegistryEntry(id=data["id"], created=int(data["created"]), reranker=str(data.get("reranker", "")))


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
