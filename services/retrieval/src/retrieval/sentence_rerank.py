"""The built-in rerank stage: re-scoring candidates with the embedding model, sentence by sentence.

A chunk embedding averages everything the chunk says; a query usually matches
one sentence of it. This stage embeds each candidate's sentences (through the
embedding cache, so a passage seen before costs nothing) and scores a
candidate by its best sentence, blended with the whole chunk's similarity.
No model beyond the embedding model is needed.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

from ragmesh.v1 import common_pb2
from retrieval.embedder import Embedder
from retrieval.rerankers import Scores

# A sentence ends at . ! or ? followed by space and a capital, a digit or a bracket.
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9(\[])")
# Sentences scored per document: past this the rest of a long document is one piece.
MAX_SENTENCES = 32
# Weight of the best sentence against the whole document's similarity.
SENTENCE_WEIGHT = 0.5


def sentences(text: str, limit: int = MAX_SENTENCES) -> list[str]:
    """The sentences of a text (at most `limit`; the last one takes the remainder)."""
    parts = [p.strip() for p in _SENTENCE_END.split(text) if p.strip()]
    if len(parts) > limit:
        parts = [*parts[: limit - 1], " ".join(parts[limit - 1 :])]
    return parts or [text]


class SentenceReranker:
    """Scores documents by their best sentence's and their own cosine similarity to the query."""

    def __init__(self, name: str, embedder: Embedder) -> None:
        self.name = name
        self._embedder = embedder
        self.max_length = 0  # any length: long sentences are cut by the embedding model

    def card(self) -> common_pb2.ModelCard:
        return common_pb2.ModelCard(
            id=self.name,
            owned_by="ragmesh",
            created=0,
            max_context=self._embedder.max_tokens,
            backend="embedded",
            capabilities=["rerank"],
        )

    async def score(self, query: str, documents: Sequence[str], truncate: bool) -> Scores:
        split = [sentences(d) for d in documents]
        texts = [query, *documents, *(s for parts in split for s in parts)]
        vectors = await self._embedder.embed(texts)
        query_vector = vectors[0]
        whole = vectors[1 : 1 + len(documents)] @ query_vector
        sentence_scores = vectors[1 + len(documents) :] @ query_vector
        best = np.empty(len(documents), dtype=np.float32)
        start = 0
        for i, parts in enumerate(split):
            best[i] = sentence_scores[start : start + len(parts)].max()
            start += len(parts)
        cosine = (SENTENCE_WEIGHT * best + (1 - SENTENCE_WEIGHT) * whole).astype(np.float32)
        tokens = sum(await self._embedder.count_tokens_async(texts))
        # The raw score is a cosine, not a logit; its relevance is the cosine clipped to [0, 1].
        return Scores(cosine, np.clip(cosine, 0.0, 1.0), tokens)
