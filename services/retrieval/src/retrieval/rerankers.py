"""Local reranking models: cross-encoders from folders the operator names, and the built-in stage.

A cross-encoder reads the query and one document together and gives one
logit: far better at ordering a few dozen candidates than the bi-encoder and
BM25 that found them, and far too slow to run over a whole collection. Models
are loaded with sentence-transformers' `CrossEncoder` from a local folder only
(`local_files_only`: the mesh never downloads), run on their own thread and
score in batches of documents of similar length (less padding). A query +
document pair longer than the model reads is refused, or cut when the caller
allows it. A call whose caller went away (deadline, cancellation) stops at the
next batch instead of scoring for nobody.

The built-in stage (`retrieval.sentence_rerank`) needs no model beyond the
embedding model.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from prometheus_client import Counter, Histogram

from ragmesh.errors import ErrorKind, RagmeshError, invalid_request
from ragmesh.v1 import common_pb2
from retrieval.settings import RerankerSpec

log = logging.getLogger(__name__)

RERANK_SECONDS = Histogram(
    "ragmesh_retrieval_rerank_seconds",
    "Time to score one rerank request, by model",
    ["model"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
RERANK_DOCUMENTS = Counter("ragmesh_retrieval_rerank_documents_total", "Documents scored, by model", ["model"])


class RerankerLoadError(Exception):
    """A reranker the settings name cannot be loaded (the service does not start)."""


class ScoringCancelledError(Exception):
    """The caller went away; the remaining batches were not scored."""


@dataclass(frozen=True)
class Scores:
    logits: np.ndarray  # one per document, in input order
    relevances: np.ndarray | None  # in [0, 1]; None: the sigmoid of the logits
    tokens: int


class Reranker(Protocol):
    name: str
    max_length: int

    def card(self) -> common_pb2.ModelCard: ...

    async def score(self, query: str, documents: Sequence[str], truncate: bool) -> Scores: ...


def too_long(model: str, index: int, length: int, cap: int) -> RagmeshError:
    return invalid_request(
        f"documents[{index}]: the query and this document are {length} tokens; the model `{model}` reads at most "
        f'{cap}. Shorten it, or allow truncation (`truncate: "END"` on /v1/ranking, `truncation: true` on '
        "/v1/rerank).",
        param="documents",
        code="context_length_exceeded",
    )


def length_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Document positions in batches of similar length (shortest first): less padding per batch."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


class CrossEncoderReranker:
    """A sentence-transformers CrossEncoder loaded from a local folder."""

    def __init__(self, name: str, spec: RerankerSpec, executor: ThreadPoolExecutor) -> None:
        self.name = name
        self._spec = spec
        self._executor = executor
        self._model: Any = None
        self.max_length = 0

    def load(self) -> None:
        """Load the model (blocking). RerankerLoadError when the folder does not hold one."""
        folder = Path(self._spec.path)
        if not folder.is_dir():
            raise RerankerLoadError(f"reranker {self.name!r}: {folder} is not a folder (the mesh never downloads)")
        from sentence_transformers import CrossEncoder

        started = time.perf_counter()
        try:
            model = CrossEncoder(str(folder), device="cpu", local_files_only=True, max_length=self._spec.max_length)
        except Exception as exc:
            raise RerankerLoadError(f"reranker {self.name!r}: cannot load {folder}: {exc}") from exc
        if model.num_labels != 1:
            raise RerankerLoadError(
                f"reranker {self.name!r}: the model has {model.num_labels} outputs; a reranker has one (a relevance)"
            )
        cap = model.get_max_seq_length()
        if not cap:
            raise RerankerLoadError(f"reranker {self.name!r}: the model names no maximum length; set max_length")
        self.max_length = int(cap)
        model.predict([("warm", "up")], show_progress_bar=False)  # the first call allocates
        self._model = model
        log.info(
            "reranker loaded",
            extra={
                "model": self.name,
                "max_length": self.max_length,
                "seconds": round(time.perf_counter() - started, 2),
            },
        )

    def card(self) -> common_pb2.ModelCard:
        return common_pb2.ModelCard(
            id=self.name,
            owned_by="ragmesh",
            created=0,
            max_context=self.max_length,
            backend="embedded",
            capabilities=["rerank"],
        )

    def pair_lengths(self, query: str, documents: Sequence[str]) -> list[int]:
        """Tokens of each query + document pair as the model reads it, special tokens included."""
        encoded = self._model.tokenizer([query] * len(documents), list(documents), truncation=False)
        return [len(ids) for ids in encoded["input_ids"]]

    def _score(
        self, query: str, documents: Sequence[str], truncate: bool, cancelled: threading.Event
    ) -> tuple[np.ndarray, int]:
        import torch

        lengths = self.pair_lengths(query, documents)
        if not truncate:
            for i, length in enumerate(lengths):
                if length > self.max_length:
                    raise too_long(self.name, i, length, self.max_length)
        logits = np.zeros(len(documents), dtype=np.float32)
        for batch in length_batches(lengths, self._spec.batch_size):
            if cancelled.is_set():
                raise ScoringCancelledError()
            scores = self._model.predict(
                [(query, documents[i]) for i in batch],
                batch_size=len(batch),
                activation_fn=torch.nn.Identity(),  # the raw logit; the sigmoid is applied once, by the caller
                convert_to_numpy=True,
                show_progress_bar=False,
            )
            logits[batch] = np.asarray(scores, dtype=np.float32).reshape(-1)
        return logits, sum(min(length, self.max_length) for length in lengths)

    async def score(self, query: str, documents: Sequence[str], truncate: bool) -> Scores:
        cancelled = threading.Event()
        try:
            logits, tokens = await asyncio.get_running_loop().run_in_executor(
                self._executor, self._score, query, documents, truncate, cancelled
            )
        finally:
            cancelled.set()  # a call nobody waits for any more stops at its next batch
        return Scores(logits, None, tokens)


class Rerankers:
    """The local reranking models of this replica, by name."""

    def __init__(self, models: dict[str, Reranker], executor: ThreadPoolExecutor) -> None:
        self._models = models
        self._executor = executor

    @classmethod
    def from_specs(cls, specs: dict[str, RerankerSpec], extra: Sequence[Reranker] = ()) -> Rerankers:
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rerank")
        models: dict[str, Reranker] = {name: CrossEncoderReranker(name, spec, executor) for name, spec in specs.items()}
        for model in extra:
            if model.name in models:
                raise RerankerLoadError(f"reranker {model.name!r} is named twice")
            models[model.name] = model
        return cls(models, executor)

    def load(self) -> None:
        """Load every cross-encoder (blocking; call from a thread)."""
        for model in self._models.values():
            if isinstance(model, CrossEncoderReranker):
                model.load()

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    def cards(self) -> list[common_pb2.ModelCard]:
        return [model.card() for model in self._models.values()]

    def get(self, name: str) -> Reranker:
        model = self._models.get(name)
        if model is None:
            raise RagmeshError(
                ErrorKind.NOT_FOUND,
                f"The reranking model `{name}` does not exist here.",
                param="model",
                code="model_not_found",
            )
        return model

    async def score(self, name: str, query: str, documents: Sequence[str], truncate: bool) -> Scores:
        """Scores of `documents` against `query` by the model `name`, timed and counted."""
        model = self.get(name)
        started = time.perf_counter()
        try:
            scores = await model.score(query, documents, truncate)
        except ScoringCancelledError:
            raise RagmeshError(ErrorKind.CANCELLED, "The rerank was cancelled.") from None
        RERANK_SECONDS.labels(name).observe(time.perf_counter() - started)
        RERANK_DOCUMENTS.labels(name).inc(len(documents))
        return scores
