"""One collection's searchable state: chunk store, FAISS index, BM25 index.

A `Snapshot` is immutable once built: a change builds a new snapshot (in a
worker thread) and the collection swaps its reference, so searches running in
other threads never see a half-applied change. Snapshots are saved under
`<data_dir>/<collection>/v<version>/` (written to a temporary folder, then
renamed) and `CURRENT` names the live one (also replaced by rename), so a crash
leaves either the old or the new state on disk, never a mix.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import bm25s
import faiss
import numpy as np
import Stemmer

from ragmesh.durable import fsync_dir, write_atomic

_STEMMER = Stemmer.Stemmer("english")


def bm25_tokens(texts: Sequence[str]) -> list[list[str]]:
    """Lower-cased, English stop words removed, Snowball-stemmed tokens."""
    return list(bm25s.tokenize(list(texts), stopwords="en", stemmer=_STEMMER, return_ids=False, show_progress=False))


@dataclass(frozen=True)
class ChunkRecord:
    chunk_id: str
    document_id: str
    title: str
    text: str
    metadata: dict[str, Any]
    tokens: list[str]

    def to_json(self) -> dict[str, Any]:
        return {
            "chunk_id": self.chunk_id,
            "document_id": self.document_id,
            "title": self.title,
            "text": self.text,
            "metadata": self.metadata,
            "tokens": self.tokens,
        }

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> ChunkRecord:
        return cls(raw["chunk_id"], raw["document_id"], raw["title"], raw["text"], raw["metadata"], raw["tokens"])


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


@dataclass(frozen=True)
class Snapshot:
    meta: Meta
    chunks: tuple[ChunkRecord, ...] = ()
    vectors: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), dtype=np.float32))
    faiss_index: Any = None
    bm25: Any = None

    @property
    def documents(self) -> int:
        return len({c.document_id for c in self.chunks})

    @property
    def index_type(self) -> str:
        if self.faiss_index is None:
            return "flat"
        return "hnsw" if isinstance(self.faiss_index, faiss.IndexHNSWFlat) else "flat"

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
        """A snapshot with `new_chunks` added; chunks of the same documents already present are replaced."""
        replaced = {c.document_id for c in new_chunks}
        keep = [i for i, c in enumerate(self.chunks) if c.document_id not in replaced]
        dims = new_vectors.shape[1] if len(new_vectors) else self.meta.dimensions
        old_vectors = self.vectors if len(self.vectors) else np.zeros((0, dims), dtype=np.float32)
        if len(keep) == len(self.chunks):
            chunks = (*self.chunks, *new_chunks)
            vectors = np.concatenate([old_vectors, new_vectors]) if len(new_vectors) else old_vectors
            faiss_index = _extend_faiss(self.faiss_index, vectors, new_vectors, params)
        else:  # some documents replaced: rebuild from what is kept
            chunks = (*(self.chunks[i] for i in keep), *new_chunks)
            vectors = np.concatenate([old_vectors[keep], new_vectors])
            faiss_index = _build_faiss(vectors, params)
        meta = replace(
            self.meta,
            version=version,
            applied_jobs=(*self.meta.applied_jobs, job_id)[-1000:],
            dimensions=dims,
        )
        return Snapshot(meta, chunks, vectors, faiss_index, _build_bm25(chunks))

    @classmethod
    def build(cls, meta: Meta, chunks: Sequence[ChunkRecord], vectors: np.ndarray, params: IndexParams) -> Snapshot:
        """A snapshot of exactly these chunks and vectors (another replica's copy, imported whole)."""
        if len(chunks) != len(vectors):
            raise ValueError(f"{len(chunks)} chunks but {len(vectors)} vectors")
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        return cls(meta, tuple(chunks), vectors, _build_faiss(vectors, params), _build_bm25(chunks))

    # --- searching ------------------------------------------------------------

    def dense(self, query: np.ndarray, k: int) -> list[tuple[int, float]]:
        """(chunk position, cosine similarity), best first."""
        if self.faiss_index is None or not self.chunks:
            return []
        scores, ids = self.faiss_index.search(query.reshape(1, -1), min(k, len(self.chunks)))
        return [(int(i), float(s)) for i, s in zip(ids[0], scores[0], strict=True) if i >= 0]

    def sparse(self, query_tokens: list[str], k: int) -> list[tuple[int, float]]:
        """(chunk position, BM25 score), best first; chunks sharing no term are left out."""
        if self.bm25 is None or not self.chunks or not query_tokens:
            return []
        ids, scores = self.bm25.retrieve([query_tokens], k=min(k, len(self.chunks)), show_progress=False, n_threads=1)
        return [(int(i), float(s)) for i, s in zip(ids[0], scores[0], strict=True) if s > 0]

    # --- persistence ----------------------------------------------------------

    def save(self, collection_dir: Path) -> None:
        """Write this snapshot as `v<version>` and point CURRENT at it, atomically."""
        collection_dir.mkdir(parents=True, exist_ok=True)
        final = collection_dir / f"v{self.meta.version}"
        tmp = collection_dir / f".tmp-v{self.meta.version}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        with open(tmp / "chunks.jsonl", "w", encoding="utf-8") as out:
            for chunk in self.chunks:
                out.write(json.dumps(chunk.to_json(), ensure_ascii=False) + "\n")
        np.save(tmp / "vectors.npy", self.vectors)
        if self.faiss_index is not None:
            faiss.write_index(self.faiss_index, str(tmp / "faiss.index"))
        if self.bm25 is not None:
            self.bm25.save(str(tmp / "bm25"), show_progress=False)
        (tmp / "meta.json").write_text(json.dumps(self.meta.to_json()))
        fsync_dir(tmp)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        write_atomic(collection_dir / "CURRENT", final.name.encode())
        for old in collection_dir.iterdir():
            if old.name not in (final.name, "CURRENT") and (old.name.startswith("v") or old.name.startswith(".tmp")):
                shutil.rmtree(old, ignore_errors=True)

    @classmethod
    def load(cls, collection_dir: Path, params: IndexParams) -> Snapshot | None:
        """The snapshot CURRENT names, or None when there is none (never finished writing)."""
        try:
            current = collection_dir / (collection_dir / "CURRENT").read_text().strip()
        except FileNotFoundError:
            return None
        meta_raw = json.loads((current / "meta.json").read_text())
        meta = Meta(
            name=meta_raw["name"],
            id=meta_raw["id"],
            created=meta_raw["created"],
            version=meta_raw["version"],
            applied_jobs=tuple(meta_raw["applied_jobs"]),
            dimensions=meta_raw["dimensions"],
        )
        with open(current / "chunks.jsonl", encoding="utf-8") as lines:
            chunks = tuple(ChunkRecord.from_json(json.loads(line)) for line in lines)
        vectors = np.load(current / "vectors.npy")
        faiss_index = faiss.read_index(str(current / "faiss.index")) if (current / "faiss.index").exists() else None
        if isinstance(faiss_index, faiss.IndexHNSWFlat):
            faiss_index.hnsw.efSearch = params.hnsw_ef_search
        bm25 = bm25s.BM25.load(str(current / "bm25"), show_progress=False) if (current / "bm25").exists() else None
        return cls(meta, chunks, vectors, faiss_index, bm25)


def _build_faiss(vectors: np.ndarray, params: IndexParams) -> Any:
    if not len(vectors):
        return None
    dims = vectors.shape[1]
    index: Any
    if len(vectors) > params.hnsw_threshold:
        index = faiss.IndexHNSWFlat(dims, params.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = params.hnsw_ef_construction
        index.hnsw.efSearch = params.hnsw_ef_search
    else:
        index = faiss.IndexFlatIP(dims)
    index.add(np.ascontiguousarray(vectors, dtype=np.float32))
    return index


def _extend_faiss(index: Any, all_vectors: np.ndarray, new_vectors: np.ndarray, params: IndexParams) -> Any:
    crossing = len(all_vectors) > params.hnsw_threshold and not isinstance(index, faiss.IndexHNSWFlat)
    if index is None or crossing:
        return _build_faiss(all_vectors, params)
    if not len(new_vectors):
        return index
    extended = faiss.clone_index(index)  # the old snapshot keeps serving searches meanwhile
    extended.add(np.ascontiguousarray(new_vectors, dtype=np.float32))
    return extended


def _build_bm25(chunks: Iterable[ChunkRecord]) -> Any:
    tokens = [c.tokens for c in chunks]
    if not tokens:
        return None
    bm25 = bm25s.BM25()
    bm25.index(tokens, show_progress=False)
    return bm25
