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


class _Postings:
    """One term's postings: chunk positions (increasing) and term frequencies, grown by doubling.

    `count` is published after the rows are written, and a reader takes the
    (arrays, count) triple in one attribute read, so it never sees a half-written row.
    """

    __slots__ = ("state",)

    def __init__(self) -> None:
        self.state: tuple[np.ndarray, np.ndarray, int] = (np.empty(4, np.int64), np.empty(4, np.float64), 0)

    def extend(self, positions: list[int], tfs: list[int]) -> None:
        pos, tf, count = self.state
        end = count + len(positions)
        if end > len(pos):
            size = max(end, 2 * len(pos))
            pos, tf = _grown(pos, count, size), _grown(tf, count, size)
        pos[count:end] = positions
        tf[count:end] = tfs
        self.state = (pos, tf, end)


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
        self._postings: dict[str, _Postings] = {}
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
        with self._write:
            start = len(self.chunks)
            end = start + len(records)
            if end > len(self._vectors):
                size = max(end, 2 * len(self._vectors))
                self._vectors = _grown(self._vectors, start, size)
                self._lengths = _grown(self._lengths, start, size)
            if len(records):
                self._vectors[start:end] = vectors
            terms: dict[str, tuple[list[int], list[int]]] = {}
            for offset, record in enumerate(records):
                position = start + offset
                self._lengths[position] = len(record.tokens)
                for term, tf in Counter(record.tokens).items():
                    entry = terms.setdefault(term, ([], []))
                    entry[0].append(position)
                    entry[1].append(tf)
                self._first.setdefault(record.document_id, position)
            for term, (positions, tfs) in terms.items():
                self._postings.setdefault(term, _Postings()).extend(positions, tfs)
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
            pos, tf, count = postings.state
            cut = int(np.searchsorted(pos[:count], n))  # rows past n belong to newer snapshots
            if not cut:
                continue
            positions, freqs = pos[:cut], tf[:cut]
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
