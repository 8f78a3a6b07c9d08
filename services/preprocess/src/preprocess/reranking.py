"""Reranking, whichever service runs the model: where a model lives, scoring, and search -> rerank.

Local rerankers (cross-encoders, the built-in stage) run in retrieval; upstream
ones (NIM, vLLM, TEI, Infinity) in inference. Retrieval never calls inference,
so preprocess is where the two meet: it finds the model in either service's
model list, and for a search with a rerank step it fetches the fused
candidates, has them scored where the model lives and reorders them.

A reranker that fails or is too slow never fails a search: the fused order is
answered with `rerank: "skipped"` and the reason, unless the request said the
rerank is required.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any, Literal

import grpc

from preprocess.clients import MeshClients
from preprocess.settings import PreprocessSettings
from ragmesh.errors import ErrorKind, RagmeshError, from_rpc_error, invalid_request
from ragmesh.grpc_client import call_metadata
from ragmesh.v1 import common_pb2, retrieval_pb2

log = logging.getLogger(__name__)

Where = Literal["retrieval", "inference"]
# Failures of the reranker itself; anything else (a bad request) is the client's.
_RERANKER_FAILURES = frozenset(
    {
        ErrorKind.UNAVAILABLE,
        ErrorKind.DEADLINE,
        ErrorKind.BAD_GATEWAY,
        ErrorKind.INTERNAL,
        ErrorKind.RATE_LIMITED,
        ErrorKind.CANCELLED,
    }
)


class ForwardOnlyError(RagmeshError):
    """An upstream model that reranks but that inference's Rerank does not serve: forward the request."""

    def __init__(self, model: str) -> None:
        super().__init__(ErrorKind.NOT_FOUND, f"The reranking model `{model}` is served by forwarding only.")
        self.model = model


def model_not_found(model: str) -> RagmeshError:
    return RagmeshError(
        ErrorKind.NOT_FOUND,
        f"The reranking model `{model}` does not exist.",
        param="model",
        code="model_not_found",
    )


class RerankCatalog:
    """Which service serves each reranking model: both services' model lists, kept a few seconds.

    A model missing from the kept lists makes them be read again (at most once
    a second), so a backend added by a reload is found at once.
    """

    def __init__(self, clients: MeshClients, ttl: float = 10.0, deadline: float = 5.0) -> None:
        self._clients = clients
        self._ttl = ttl
        self._deadline = deadline
        self._models: dict[str, tuple[Where, common_pb2.ModelCard]] = {}
        self._others: set[str] = set()  # models served, but not for reranking
        self._read_at = -1e9
        self._complete = False
        self._lock = asyncio.Lock()

    async def _refresh(self) -> None:
        request = common_pb2.ListModelsRequest()
        answers = await asyncio.gather(
            self._clients.retrieval.ListModels(request, timeout=self._deadline, metadata=call_metadata()),
            self._clients.inference.ListModels(request, timeout=self._deadline, metadata=call_metadata()),
            return_exceptions=True,
        )
        models: dict[str, tuple[Where, common_pb2.ModelCard]] = {}
        others: set[str] = set()
        complete = True
        for where, answer in zip(("retrieval", "inference"), answers, strict=True):
            if not isinstance(answer, common_pb2.ListModelsResponse):
                complete = False
                log.warning("model list unavailable", extra={"service": where, "error": str(answer)})
                continue
            for card in answer.models:
                if "rerank" in card.capabilities:
                    models.setdefault(card.id, (where, card))  # type: ignore[arg-type]
                else:
                    others.add(card.id)
        self._models, self._others, self._complete = models, others, complete
        self._read_at = time.monotonic()

    async def _fresh(self, wanted: str | None = None) -> None:
        async with self._lock:
            age = time.monotonic() - self._read_at
            if age > self._ttl or (wanted is not None and wanted not in self._models and age > 1.0):
                await self._refresh()

    async def locate(self, model: str) -> Where:
        """The service that serves `model`: 404 when neither does, 400 when it is no reranker."""
        await self._fresh(model)
        found = self._models.get(model)
        if found is not None:
            return found[0]
        if model in self._others:
            raise invalid_request(f"The model `{model}` is not a reranking model.", param="model")
        if not self._complete:
            raise RagmeshError(
                ErrorKind.UNAVAILABLE, f"Cannot tell where `{model}` runs: a service is unavailable.", retry_after=1
            )
        raise model_not_found(model)

    async def cards(self) -> list[common_pb2.ModelCard]:
        await self._fresh()
        return [card for _, card in self._models.values()]


@dataclass(frozen=True)
class RerankOption:
    """What a search or RAG request asked: `rerank` is a model, true (the collection's default), false
    (never) or None (the collection's default when it names one)."""

    rerank: bool | str | None = None
    candidates: int | None = None
    required: bool = False


@dataclass
class Reranked:
    """A search's hits in their final order, with what the rerank step did."""

    hits: list[retrieval_pb2.SearchHit]
    rerank_scores: list[float | None]
    found: retrieval_pb2.SearchResponse
    status: Literal["ok", "skipped", "off"] = "off"
    model: str = ""
    reason: str = ""
    candidates: int = 0

    def summary(self) -> dict[str, Any]:
        """The `rerank` fields of a search response."""
        out: dict[str, Any] = {"rerank": self.status}
        if self.model:
            out["rerank_model"] = self.model
        if self.status != "off":
            out["rerank_candidates"] = self.candidates
        if self.reason:
            out["rerank_reason"] = self.reason
        return out


def passage_text(hit: retrieval_pb2.SearchHit) -> str:
    """What the reranker reads for a hit: its document's title, then its text (as it was embedded)."""
    return f"{hit.title}\n{hit.text}" if hit.title else hit.text


class Reranking:
    """Scores with any reranking model, and searches with a rerank step."""

    def __init__(self, clients: MeshClients, settings: PreprocessSettings) -> None:
        self._clients = clients
        self._settings = settings
        self.catalog = RerankCatalog(clients)

    async def score(
        self, model: str, query: str, documents: list[str], *, truncate: bool, deadline: float
    ) -> common_pb2.RerankResponse:
        """Every document's scores, best first, from the service that serves `model`."""
        where = await self.catalog.locate(model)
        stub = self._clients.retrieval if where == "retrieval" else self._clients.inference
        request = common_pb2.RerankRequest(model=model, query=query, documents=documents, truncate=truncate)
        try:
            reply: common_pb2.RerankResponse = await stub.Rerank(request, timeout=deadline, metadata=call_metadata())
        except grpc.aio.AioRpcError as exc:
            err = from_rpc_error(exc)
            if where == "inference" and err.kind is ErrorKind.NOT_FOUND:
                # Listed as a reranker (stated or guessed from its id) without a `rerank:` API in the
                # backends file: only its owner's own endpoint can answer it.
                raise ForwardOnlyError(model) from None
            raise err from None
        return reply

    def candidates(self, option: RerankOption, top_k: int) -> int:
        """How many fused results to fetch: what the reranker sees (about 4x top_k), or top_k without one."""
        if option.rerank is False:
            return top_k
        wanted = option.candidates or self._settings.rerank_candidates_factor * top_k
        return max(top_k, min(wanted, self._settings.max_rerank_candidates))

    def _model(self, option: RerankOption, found: retrieval_pb2.SearchResponse, collection: str) -> str:
        if isinstance(option.rerank, str):
            return option.rerank
        if option.rerank is False:
            return ""
        model = found.reranker or self._settings.default_reranker
        if option.rerank is True and not model:
            raise invalid_request(
                f"Collection '{collection}' names no default reranker: name a model in 'rerank'.", param="rerank"
            )
        return model

    async def search(self, search: retrieval_pb2.SearchRequest, option: RerankOption, deadline: float) -> Reranked:
        """Search (top_k as asked), with the rerank step the option and the collection call for."""
        top_k = search.top_k
        fetch = retrieval_pb2.SearchRequest()
        fetch.CopyFrom(search)
        fetch.top_k = self.candidates(option, top_k)
        try:
            found: retrieval_pb2.SearchResponse = await self._clients.retrieval.Search(
                fetch, timeout=deadline, metadata=call_metadata()
            )
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc) from None
        hits = list(found.hits)
        model = self._model(option, found, search.collection)
        if not model or not hits:
            return Reranked(hits[:top_k], [None] * min(top_k, len(hits)), found, model=model)
        try:
            scored = await self.score(
                model,
                search.query,
                [passage_text(h) for h in hits],
                truncate=True,  # passages are chunks: cut the odd long one rather than lose the step
                deadline=self._settings.rerank_timeout,
            )
        except RagmeshError as err:
            return self._skipped(err, option, model, found, hits, top_k)
        order = [(hits[r.index], r.relevance_score) for r in scored.results if 0 <= r.index < len(hits)]
        return Reranked(
            [h for h, _ in order[:top_k]],
            [s for _, s in order[:top_k]],
            found,
            status="ok",
            model=model,
            candidates=len(hits),
        )

    def _skipped(
        self,
        err: RagmeshError,
        option: RerankOption,
        model: str,
        found: retrieval_pb2.SearchResponse,
        hits: list[retrieval_pb2.SearchHit],
        top_k: int,
    ) -> Reranked:
        if isinstance(option.rerank, str) and err.kind not in _RERANKER_FAILURES:
            raise err  # the client's own mistake: an unknown model, a chat model
        if err.kind is ErrorKind.DEADLINE:
            reason = f"the reranker `{model}` did not answer within {self._settings.rerank_timeout:g} s"
        else:
            reason = f"the reranker `{model}` failed: {err.message}"
        if option.required:
            kind = err.kind if err.kind in _RERANKER_FAILURES else ErrorKind.UNAVAILABLE
            raise RagmeshError(kind, f"Rerank is required and {reason}.", param="rerank", retry_after=1) from err
        log.warning("rerank skipped", extra={"model": model, "reason": reason})
        return Reranked(
            hits[:top_k],
            [None] * min(top_k, len(hits)),
            found,
            status="skipped",
            model=model,
            reason=reason,
            candidates=len(hits),
        )
