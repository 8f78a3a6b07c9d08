"""Rerank scores as every service reports them: a raw logit and a relevance in [0, 1].

Reranking APIs disagree on the score they return: NVIDIA's /v1/ranking gives the
model's raw logit, the Cohere-shaped /v1/rerank (vLLM, TEI, Infinity, Jina) a
relevance score in [0, 1] (the logit through a sigmoid, for a cross-encoder).
Every backend fills both, so that either API can be answered from any model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from ragmesh.v1 import common_pb2

# Past this a float32 sigmoid is 0 or 1 and its inverse is infinite.
_LOGIT_LIMIT = 30.0


def sigmoid(logit: float) -> float:
    """The relevance in [0, 1] of a raw logit."""
    if logit >= 0:
        return 1.0 / (1.0 + math.exp(-min(logit, _LOGIT_LIMIT)))
    z = math.exp(max(logit, -_LOGIT_LIMIT))
    return z / (1.0 + z)


def logit_of(relevance: float) -> float:
    """The logit of a relevance in [0, 1] (a score outside it is taken as a logit already)."""
    if not 0.0 <= relevance <= 1.0:
        return relevance
    p = min(max(relevance, 1e-13), 1.0 - 1e-13)
    return math.log(p / (1.0 - p))


def ranked(logits: Sequence[float], relevances: Sequence[float] | None = None) -> list[common_pb2.RerankScore]:
    """Every document's scores, best first (ties keep the input order)."""
    scores = [
        common_pb2.RerankScore(
            index=i, logit=float(logit), relevance_score=sigmoid(logit) if relevances is None else relevances[i]
        )
        for i, logit in enumerate(logits)
    ]
    return sorted(scores, key=lambda s: (-s.logit, s.index))
