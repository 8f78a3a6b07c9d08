"""One collection's searchable state: chunks, vectors, BM25 postings and, past a size, an HNSW graph.

A `Snapshot` is immutable once built: a change builds a new snapshot (in a
worker thread) and the collection swaps its reference, so searches running in
other threads never see a half-applied change. Snapshots of one lineage share
an append-only `ChunkLog` (retrieval/chunk_log.py) and each sees its first `n`
rows, so adding a job costs O(job), whatever the collection holds.

Dense search is exact (FAISS brute-force inner product over the rows) up to
`hnsw_threshold` chunks. Past it an HNSW graph over the first rows is built in
the background (`with_hnsw`, run by the store) and searched together with the
rows added since, which stay exact; the graph is rebuilt over every row once
that tail passes a tenth of it. Removing chunks (a document ingested again)
starts a new log, as a full rebuild does. Files: retrieval/index_files.py.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import Stemmer
from bm25s.stopwords import STOPWORDS_EN

from retrieval.chunk_log import ChunkLog, ChunkRecord, ChunkView

__all__ = [
    "ChunkRecord",
    "HnswBase",
    "IndexParams",
    "Meta",
    "SavedState",
    "Snapshot",
    "bm25_tokens",
    "embedding_text",
    "top_scores",
]

_STEMMER = Stemmer.Stemmer("english")

# An HNSW graph is rebuilt once the rows added since it was built pass this many,
# and a tenth of the graph's own rows.
HNSW_MIN_TAIL = 2000


# What bm25s.tokenize(stopwords="en", stemmer=_STEMMER) makes, without its cost per call (a
# job is tokenized alone, so per-call work would grow with the number of jobs): the same
# split, stop words and stems, with stems remembered across calls.
_SPLIT = re.compile(r"(?u)\b\w\w+\b").findall
_STOPWORDS = frozenset(STOPWORDS_EN)
_STEMS: dict[str, str] = {}
_STEMS_MAX = 1_000_000
_STEMMER_LOCK = threading.Lock()  # a PyStemmer object is not thread-safe


def bm25_tokens(texts: Sequence[str]) -> list[list[str]]:
    """Lower-cased, English stop words removed, Snowball-stemmed tokens (bm25s's tokenizer)."""
    split = []
    unknown: set[str] = set()
    for text in texts:
        kept = [w for w in _SPLIT(text.lower()) if w not in _STOPWORDS]
        split.append(kept)
        unknown.update(w for w in kept if w not in _STEMS)
    fresh: dict[str, str] = {}
    if unknown:
        ordered = list(unknown)
        with _STEMMER_LOCK:
            fresh = dict(zip(ordered, _STEMMER.stemWords(ordered), strict=True))
        if len(_STEMS) > _STEMS_MAX:
            _STEMS.clear()
        _STEMS.update(fresh)
    return [[fresh[w] if w in fresh else _stem(w) for w in words] for words in split]


def _stem(word: str) -> str:
    stem = _STEMS.get(word)
    if stem is None:  # dropped by a clear() in another thread meanwhile
        with _STEMMER_LOCK:
            stem = _STEMMER.stemWord(word)
    return stem


def embedding_text(title: str, text: str) -> str:
    """What is embedded (and indexed by BM25) for a chunk: its document's title, then its text."""
    return f"{title}\n{text}" if title else text


@dataclass(frozen=True)
class IndexParams:
    hnsw_threshold: int
    hnsw_m: int
    hnsw_ef_construction: int
    hnsw_ef_search: int


@dataclass(frozen=True)
class Meta:
    """What identifies a collection's state; saved beside the indexes."""

    name: str
    id: str
    created: int
    version: int = 0
    applied_jobs: tuple[str, ...] = ()
    dimensions: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "id": self.id,
            "created": self.created,
            "version": self.version,
            "applied_jobs": list(self.applied_jobs),
            "dimensions": self.dimensions,
        }

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Meta:
        return cls(
            name=raw["name"],
            id=raw["id"],
            created=raw["created"],
            version=raw["version"],
            applied_jobs=tuple(raw["applied_jobs"]),
            dimensions=raw["dimensions"],
        )


@dataclass(frozen=True)
class HnswBase:
    """An HNSW graph over the first `rows` rows of a log (read-only once built)."""

    index: Any
    rows: int


@dataclass(frozen=True)
class SavedState:
    """What of a snapshot's lineage is on disk: a generation folder holding its first `rows` rows."""

    generation: str
    rows: int
    chunk_bytes: int  # of chunks.jsonl that count (what a crash left past them does not)
    hnsw_rows: int = 0  # rows the graph saved in the folder covers (0: none saved)
    meta: Meta | None = None  # the state saved with them


@dataclass(frozen=True)
class Snapshot:
    meta: Meta
    log: ChunkLog | None = None
    n: int = 0
    total_length: float = 0.0  # BM25 tokens in the first n chunks
    documents: int = 0
    hnsw: HnswBase | None = None
    saved: SavedState | None = None

    @property
    def chunks(self) -> Sequence[ChunkRecord]:
        return ChunkView(self.log.chunks, self.n) if self.log is not None else ()

    @property
    def vectors(self) -> np.ndarray:
        if self.log is None:
            return np.zeros((0, self.meta.dimensions), dtype=np.float32)
        return self.log.vectors(self.n)

    @property
    def index_type(self) -> str:
        return "hnsw" if self.hnsw is not None else "flat"

    # --- building -------------------------------------------------------------

    def with_chunks(
        self,
        new_chunks: Sequence[ChunkRecord],
        new_vectors: np.ndarray,
        params: IndexParams,
        *,
        version: int,
        job_id: str,
    ) -> Snapshot:
        """A snapshot with `new_chunks` added; chunks of the same documents already present are replaced.

        Appending (no document replaced) costs O(job); replacing rebuilds the log from what is kept.
        """
        del params  # the HNSW graph is built in the background (needs_hnsw / with_hnsw)
        new_vectors = np.ascontiguousarray(new_vectors, dtype=np.float32)
        dims = new_vectors.shape[1] if len(new_vectors) else self.meta.dimensions
        meta = replace(
            self.meta, version=version, applied_jobs=(*self.meta.applied_jobs, job_id)[-1000:], dimensions=dims
        )
        replaced = {c.document_id for c in new_chunks}
        log = self.log
        if log is not None and any(log.has_document(d, self.n) for d in replaced):
            kept = [c for c in self.chunks if c.document_id not in replaced]
            keep_rows = [i for i, c in enumerate(self.chunks) if c.document_id not in replaced]
            vectors = np.concatenate([self.vectors[keep_rows], new_vectors])
            return Snapshot.build(meta, [*kept, *new_chunks], vectors)
        if not len(new_chunks):
            return replace(self, meta=meta)
        if log is None or log.dimensions != dims:
            if self.n:
                raise ValueError(f"vectors of {dims} dimensions for a collection of {log.dimensions if log else 0}")
            log = ChunkLog(dims)
        elif log.size != self.n:
            log = _fork(log, self.n)  # a newer snapshot of this log exists (never installed): branch off
        log.append(new_chunks, new_vectors)
        return replace(
            self,
            meta=meta,
            log=log,
            n=self.n + len(new_chunks),
            total_length=self.total_length + log.lengths_total(self.n, self.n + len(new_chunks)),
            documents=self.documents + len(replaced),
        )

    @classmethod
    def build(
        cls, meta: Meta, chunks: Sequence[ChunkRecord], vectors: np.ndarray, params: IndexParams | None = None
    ) -> Snapshot:
        """A snapshot of exactly these chunks and vectors (a full rebuild, or another replica's copy)."""
        del params  # the HNSW graph is built in the background (needs_hnsw / with_hnsw)
        if len(chunks) != len(vectors):
            raise ValueError(f"{len(chunks)} chunks but {len(vectors)} vectors")
        if not len(chunks):
            return cls(meta)
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        log = ChunkLog(vectors.shape[1])
        log.append(chunks, vectors)
        return cls(
            replace(meta, dimensions=vectors.shape[1]),
            log,
            len(chunks),
            log.lengths_total(0, len(chunks)),
            len({c.document_id for c in chunks}),
        )

    def needs_hnsw(self, params: IndexParams) -> bool:
        """Whether the background should (re)build the HNSW graph of this snapshot."""
        if self.n <= params.hnsw_threshold:
            return False
        if self.hnsw is None:
            return True
        tail = self.n - self.hnsw.rows
        return tail >= max(HNSW_MIN_TAIL, self.hnsw.rows // 10)

    def build_hnsw(self, params: IndexParams) -> HnswBase:
        """An HNSW graph over every row of this snapshot (blocking, CPU-heavy: the background's job)."""
        index = faiss.IndexHNSWFlat(self.log.dimensions if self.log else 0, params.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = params.hnsw_ef_construction
        index.hnsw.efSearch = params.hnsw_ef_search
        index.add(self.vectors)
        return HnswBase(index, self.n)

    def with_hnsw(self, base: HnswBase, saved_rows: int = 0) -> Snapshot:
        """This snapshot searching `base` (built over a prefix of its log) plus the rows after it."""
        saved = replace(self.saved, hnsw_rows=saved_rows) if self.saved is not None and saved_rows else self.saved
        return replace(self, hnsw=base, saved=saved)

    def same_lineage(self, other: Snapshot) -> bool:
        """Whether `other`'s rows are a prefix of this snapshot's (same log, fewer or as many rows)."""
        return self.log is not None and self.log is other.log and other.n <= self.n

    # --- searching ------------------------------------------------------------

    def dense(self, query: np.ndarray, k: int) -> list[tuple[int, float]]:
        """(chunk position, cosine similarity), best first."""
        if not self.n or k <= 0:
            return []
        q = np.ascontiguousarray(query, dtype=np.float32).reshape(1, -1)
        hits: list[tuple[int, float]] = []
        start = 0
        if self.hnsw is not None:
            start = self.hnsw.rows
            scores, ids = self.hnsw.index.search(q, min(k, start))
            hits = [(int(i), float(s)) for i, s in zip(ids[0], scores[0], strict=True) if i >= 0]
        if self.n > start:
            tail = self.vectors[start:]
            scores, ids = faiss.knn(q, tail, min(k, len(tail)), metric=faiss.METRIC_INNER_PRODUCT)
            hits += [(start + int(i), float(s)) for i, s in zip(ids[0], scores[0], strict=True) if i >= 0]
        if start:  # two rankings: one order
            hits.sort(key=lambda hit: (-hit[1], hit[0]))
        return hits[:k]

    def sparse(self, query_tokens: list[str], k: int) -> list[tuple[int, float]]:
        """(chunk position, BM25 score), best first; chunks sharing no term are left out."""
        if self.log is None or not self.n or not query_tokens or k <= 0:
            return []
        scores = self.log.bm25(query_tokens, self.n, self.total_length)
        return top_scores(scores, k)

    # --- persistence (retrieval/index_files.py) --------------------------------

    def save(self, collection_dir: Path) -> Snapshot:
        """Make this snapshot durable: its new rows appended to its generation's files when it
        has one on disk, else a new generation written whole; the snapshot, knowing what is saved."""
        from retrieval.index_files import save

        return save(self, collection_dir)

    @classmethod
    def load(cls, collection_dir: Path, params: IndexParams) -> Snapshot | None:
        """The snapshot CURRENT names, or None when there is none (never finished writing)."""
        from retrieval.index_files import load

        return load(collection_dir, params)


def top_scores(scores: np.ndarray, k: int) -> list[tuple[int, float]]:
    """The k best positive scores as (position, score), best first, ties: the earlier position first.

    A common query term gives thousands of chunks a score: sorting them all costs more than
    the scoring. Only those at or above the k-th best value are sorted (all of its ties
    included, so the order is the full sort's).
    """
    positive = np.flatnonzero(scores > 0)
    values = scores[positive]
    if len(positive) > k:
        kth = np.partition(values, len(values) - k)[len(values) - k]
        keep = values >= kth
        positive, values = positive[keep], values[keep]
    order = np.lexsort((positive, -values))[:k]
    return [(int(positive[i]), float(values[i])) for i in order]


def _fork(log: ChunkLog, n: int) -> ChunkLog:
    fork = ChunkLog(log.dimensions)
    fork.append(log.chunks[:n], log.vectors(n))
    return fork
