"""Dense, sparse and hybrid search over a collection snapshot, with a Redis result cache.

Hybrid search fuses the two rankings by reciprocal rank fusion (RRF): a chunk
scores w_dense / (k + rank_dense) + w_sparse / (k + rank_sparse), ranks from 1,
a ranking that does not list the chunk contributing nothing. Rank fusion needs
no score calibration between cosine similarities and BM25 scores.

Cached results are keyed by the collection's id and its global index version
(plus mode, top_k and the query's hash), so any change to the collection moves
searches to new keys: a stale answer can never be served. A replica whose own
index is behind the global version does not write the cache.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from dataclasses import dataclass
from typing import Any

import orjson
import redis.asyncio as aioredis
from prometheus_client import Counter, Histogram
from redis.exceptions import RedisError

from ragmesh.redis_keys import RedisKeys
from retrieval.embedder import CACHE_ERRORS, Embedder
from retrieval.index import Snapshot, bm25_tokens
from retrieval.settings import RetrievalSettings
from retrieval.store import SearchView

log = logging.getLogger(__name__)

RESULT_CACHE = Counter("ragmesh_retrieval_result_cache_total", "Search result cache lookups", ["outcome"])
SEARCH_SECONDS = Histogram(
    "ragmesh_retrieval_search_seconds",
    "Search time (cache misses), by mode",
    ["mode"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1),
)
QUERY_EMBEDDING_SECONDS = Histogram(
    "ragmesh_retrieval_query_embedding_seconds",
    "Time to embed a search query (the cache read included, as far as it did not overlap the collection's lookup)",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1),
)


# Exact (flat) collections up to this many chunks are searched on the event loop (about a
# millisecond for dense and sparse together at 384 dimensions on one core).
INLINE_ROWS = 20_000


@dataclass(frozen=True)
class Hit:
    position: int
    score: float


def rrf(rankings: list[tuple[list[tuple[int, float]], float]], k: int, top_k: int) -> list[Hit]:
    """Reciprocal rank fusion of (ranking, weight) pairs; each ranking lists (position, score) best first."""
    fused: dict[int, float] = {}
    for ranking, weight in rankings:
        for rank, (position, _) in enumerate(ranking, start=1):
            fused[position] = fused.get(position, 0.0) + weight / (k + rank)
    best = sorted(fused.items(), key=lambda item: (-item[1], item[0]))[:top_k]
    return [Hit(position, score) for position, score in best]


class Searcher:
    def __init__(self, settings: RetrievalSettings, embedder: Embedder, redis: aioredis.Redis | None) -> None:
        self._settings = settings
        self._embedder = embedder
        self._redis = redis
        self._schema = RedisKeys(settings.namespace)

    def _cache_key(self, view: SearchView, mode: str, top_k: int, query: str) -> str:
        digest = hashlib.sha256(query.encode()).hexdigest()
        return self._schema.search_result(view.snapshot.meta.id, view.global_version, mode, top_k, digest)

    def prefetch(self, query: str, mode: str) -> asyncio.Task[list[bytes | None]] | None:
        """Start reading the query's embedding from the cache (dense and hybrid searches need it)
        so that the read overlaps the collection's lookup; nothing is computed. Pass the task to
        `search`, or cancel it."""
        if mode == "sparse":
            return None
        return asyncio.ensure_future(self._embedder.cached([query]))

    async def search(
        self,
        view: SearchView,
        query: str,
        mode: str,
        top_k: int,
        use_cache: bool,
        prefetched: asyncio.Task[list[bytes | None]] | None = None,
    ) -> tuple[list[dict[str, Any]], bool]:
        """(hits as dicts, whether they came from the cache)."""
        cacheable = use_cache and self._redis is not None and view.global_version is not None
        key = self._cache_key(view, mode, top_k, query) if cacheable else ""
        if cacheable:
            cached = await self._cache_get(key)
            if cached is not None:
                RESULT_CACHE.labels("hit").inc()
                return cached, True
            RESULT_CACHE.labels("miss").inc()
        hits = await self._compute(view.snapshot, query, mode, top_k, prefetched)
        if cacheable and view.snapshot.meta.version >= (view.global_version or 0):
            await self._cache_set(key, hits)
        return hits, False

    async def _compute(
        self,
        snapshot: Snapshot,
        query: str,
        mode: str,
        top_k: int,
        prefetched: asyncio.Task[list[bytes | None]] | None,
    ) -> list[dict[str, Any]]:
        if not snapshot.chunks:
            return []
        with SEARCH_SECONDS.labels(mode).time():
            candidates = max(top_k, self._settings.fusion_candidates)
            vector = None
            if mode != "sparse":
                with QUERY_EMBEDDING_SECONDS.time():
                    cached = await prefetched if prefetched is not None else None
                    vector = (await self._embedder.embed([query], cached=cached))[0]
            tokens = bm25_tokens([query])[0] if mode != "dense" else []

            def run() -> list[Hit]:
                dense = snapshot.dense(vector, candidates) if vector is not None else []
                sparse = snapshot.sparse(tokens, candidates) if tokens else []
                if mode == "dense":
                    return [Hit(p, s) for p, s in dense[:top_k]]
                if mode == "sparse":
                    return [Hit(p, s) for p, s in sparse[:top_k]]
                return rrf(
                    [(dense, self._settings.dense_weight), (sparse, self._settings.sparse_weight)],
                    self._settings.rrf_k,
                    top_k,
                )

            # A small exact index is searched in well under a millisecond: handing that to a
            # thread (and the answer back to the loop) costs more than it, most of all on a
            # busy machine, where each hand-over waits for the scheduler. Larger ones, and
            # HNSW graphs, run beside the loop.
            if snapshot.hnsw is None and snapshot.n <= INLINE_ROWS:
                hits = run()
            else:
                hits = await asyncio.to_thread(run)
        return [_hit_dict(snapshot, hit) for hit in hits]

    async def _cache_get(self, key: str) -> list[dict[str, Any]] | None:
        assert self._redis is not None
        try:
            raw = await self._redis.get(key)
        except (RedisError, OSError) as exc:
            CACHE_ERRORS.labels("search").inc()
            log.warning("result cache unavailable", extra={"error": str(exc)})
            return None
        return orjson.loads(raw) if raw else None

    async def _cache_set(self, key: str, hits: list[dict[str, Any]]) -> None:
        assert self._redis is not None
        try:
            await self._redis.set(key, orjson.dumps(hits), ex=self._settings.result_cache_ttl)
        except (RedisError, OSError) as exc:
            CACHE_ERRORS.labels("search").inc()
            log.warning("result cache unavailable", extra={"error": str(exc)})


def _hit_dict(snapshot: Snapshot, hit: Hit) -> dict[str, Any]:
    chunk = snapshot.chunks[hit.position]
    return {
        "document_id": chunk.document_id,
        "chunk_id": chunk.chunk_id,
        "score": hit.score,
        "text": chunk.text,
        "title": chunk.title,
        "metadata": chunk.metadata,
    }
