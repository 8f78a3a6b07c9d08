"""The append-only memory of a collection: chunks, vectors and BM25 postings, shared by snapshots.

Adding a job must cost what the job costs, not what the collection holds, so a
new snapshot does not copy the old one: every snapshot of one lineage shares a
`ChunkLog` and sees its first `n` rows. Appending writes only past the end the
newest snapshot sees (numpy buffers and posting arrays grow by doubling, so a
row is copied O(1) times on average), and readers of older snapshots never
look there: a search running in another thread meanwhile reads exactly what it
read before. A log is appended to only from its tip; a change from an older
snapshot (or one that removes chunks) starts a new log.

BM25 is scored at query time from the postings with the collection's current
statistics (documents, average length, document frequency up to `n`), so it
needs no re-indexing when chunks arrive, and a log built in one go and one
built a job at a time give bit-identical scores.
"""

from __future__ import annotations

import math
import threading
from array import array
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, overload

import numpy as np

# BM25 parameters (the "lucene" variant bm25s uses by default).
K1 = 1.5
B = 0.75


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


# One term's postings: (chunk position, term frequency) pairs, positions increasing, in one
# array.array('q') so that an append (one C call, under the GIL) and a reader's copy
# (`postings[:]`, one C call) never interleave: a reader sees whole pairs only. No
# buffer of it is ever exported, so it can always grow.


def _grown(array: np.ndarray, used: int, size: int) -> np.ndarray:
    bigger = np.empty((size, *array.shape[1:]), dtype=array.dtype)
    bigger[:used] = array[:used]
    return bigger


class ChunkLog:
    """Chunks, their vectors and BM25 postings, appended in order (see the module docstring)."""

    def __init__(self, dimensions: int) -> None:
        self.dimensions = dimensions
        self.chunks: list[ChunkRecord] = []
        self._vectors = np.empty((16, dimensions), dtype=np.float32)
        self._lengths = np.empty(16, dtype=np.float64)  # BM25 tokens per chunk
        self._postings: dict[str, array[int]] = {}
        # First position of each document: a document with a position < n is in snapshot n.
        self._first: dict[str, int] = {}
        self._write = threading.Lock()  # appends come from one thread at a time; this says so

    @property
    def size(self) -> int:
        return len(self.chunks)

    def append(self, records: Sequence[ChunkRecord], vectors: np.ndarray) -> None:
        """Add rows at the end (only the tip snapshot may: the caller checks `size`)."""
        if len(records) != len(vectors):
            raise ValueError(f"{len(records)} chunks but {len(vectors)} vectors")
        if len(records) and (vectors.ndim != 2 or vectors.shape[1] != self.dimensions):
            # Checked before anything is written: a half-applied append would shift every later row.
            raise ValueError(f"vectors of shape {vectors.shape} for a collection of {self.dimensions} dimensions")
        with self._write:
            start = len(self.chunks)
            end = start + len(records)
            if end > len(self._vectors):
                size = max(end, 2 * len(self._vectors))
                self._vectors = _grown(self._vectors, start, size)
                self._lengths = _grown(self._lengths, start, size)
            if len(records):
                self._vectors[start:end] = vectors
            self._lengths[start:end] = [len(record.tokens) for record in records]
            terms: dict[str, list[int]] = {}
            for offset, record in enumerate(records):
                position = start + offset
                for term, tf in Counter(record.tokens).items():
                    pairs = terms.get(term)
                    if pairs is None:
                        terms[term] = [position, tf]
                    else:
                        pairs += (position, tf)
                self._first.setdefault(record.document_id, position)
            postings = self._postings
            for term, pairs in terms.items():
                existing = postings.get(term)
                if existing is None:
                    postings[term] = array("q", pairs)
                else:
                    existing.extend(pairs)
            # Published last: a snapshot of `end` rows is only made once everything is written.
            self.chunks.extend(records)

    def vectors(self, n: int) -> np.ndarray:
        """The first n vectors (a view: never copied)."""
        return self._vectors[:n]

    def has_document(self, document_id: str, n: int) -> bool:
        first = self._first.get(document_id)
        return first is not None and first < n

    def bm25(self, query_tokens: Sequence[str], n: int, total_length: float) -> np.ndarray:
        """BM25 score of each of the first n chunks for these query tokens (a repeated token counts again)."""
        scores = np.zeros(n, dtype=np.float64)
        if not n:
            return scores
        average = total_length / n
        for term in query_tokens:
            postings = self._postings.get(term)
            if postings is None:
                continue
            pairs = np.frombuffer(postings[:], dtype=np.int64).reshape(-1, 2)  # a copy: whole pairs
            cut = int(np.searchsorted(pairs[:, 0], n))  # rows past n belong to newer snapshots
            if not cut:
                continue
            positions, freqs = pairs[:cut, 0], pairs[:cut, 1].astype(np.float64)
            idf = math.log(1.0 + (n - cut + 0.5) / (cut + 0.5))
            norm = freqs + K1 * (1.0 - B + B * self._lengths[positions] / average)
            scores[positions] += idf * freqs / norm
        return scores

    def lengths_total(self, start: int, end: int) -> float:
        return float(self._lengths[start:end].sum())


class ChunkView(Sequence[ChunkRecord]):
    """The first n chunks of a log, read-only (what a snapshot calls its chunks)."""

    __slots__ = ("_chunks", "_n")

    def __init__(self, chunks: list[ChunkRecord], n: int) -> None:
        self._chunks = chunks
        self._n = n

    def __len__(self) -> int:
        return self._n

    @overload
    def __getitem__(self, index: int) -> ChunkRecord: ...

    @overload
    def __getitem__(self, index: slice) -> Sequence[ChunkRecord]: ...

    def __getitem__(self, index: int | slice) -> ChunkRecord | Sequence[ChunkRecord]:
        if isinstance(index, slice):
            return self._chunks[slice(*index.indices(self._n))]
        if index < 0:
            index += self._n
        if not 0 <= index < self._n:
            raise IndexError("chunk position out of range")
        return self._chunks[index]

    def __iter__(self) -> Iterator[ChunkRecord]:
        for i in range(self._n):
            yield self._chunks[i]

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Sequence):
            return len(other) == self._n and all(a == b for a, b in zip(self, other, strict=False))
        return NotImplemented

    def __hash__(self) -> int:
        return hash(tuple(self))
