"""Search -> rerank in preprocess: where a model runs, candidates, reordering, skipping (stub services)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest

from preprocess.reranking import Reranking, RerankOption
from preprocess.settings import PreprocessSettings
from ragmesh.errors import ErrorKind, RagmeshError
from ragmesh.rerank import ranked
from ragmesh.v1 import common_pb2, retrieval_pb2


def rpc_error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details=details)


@dataclass
class Stub:
    """One service: its model cards, its answer to Rerank (scores by document text, or an error)."""

    cards: list[common_pb2.ModelCard]
    scores: dict[str, float] = field(default_factory=dict)
    error: grpc.aio.AioRpcError | None = None
    hits: int = 10
    reranker: str = ""
    calls: list[Any] = field(default_factory=list)

    async def ListModels(self, request: Any, **kw: Any) -> common_pb2.ListModelsResponse:  # noqa: N802
        if self.error is not None and self.error.code() == grpc.StatusCode.UNAVAILABLE and not self.cards:
            raise self.error
        return common_pb2.ListModelsResponse(models=self.cards)

    async def Rerank(self, request: common_pb2.RerankRequest, **kw: Any) -> common_pb2.RerankResponse:  # noqa: N802
        self.calls.append(request)
        if self.error is not None:
            raise self.error
        logits = [self.scores.get(d, 0.0) for d in request.documents]
        return common_pb2.RerankResponse(results=ranked(logits), model=request.model)

    async def Search(self, request: retrieval_pb2.SearchRequest, **kw: Any) -> retrieval_pb2.SearchResponse:  # noqa: N802
        self.calls.append(request)
        reply = retrieval_pb2.SearchResponse(collection_id="c1", index_version=3, reranker=self.reranker)
        for i in range(min(request.top_k, self.hits)):
            reply.hits.add(document_id=f"d{i}", chunk_id=f"d{i}#0", score=1.0 / (i + 1), text=f"text {i}")
        return reply


@dataclass
class Clients:
    retrieval: Stub
    inference: Stub


def card(model: str, *capabilities: str) -> common_pb2.ModelCard:
    return common_pb2.ModelCard(id=model, capabilities=list(capabilities))


def mesh(**settings: Any) -> tuple[Reranking, Clients]:
    retrieval = Stub([card("all-MiniLM-L6-v2", "embedding"), card("local", "rerank")])
    inference = Stub([card("chat-model"), card("upstream", "rerank")])
    clients = Clients(retrieval, inference)
    return Reranking(clients, PreprocessSettings(**settings)), clients  # type: ignore[arg-type]


def search(top_k: int = 3) -> retrieval_pb2.SearchRequest:
    return retrieval_pb2.SearchRequest(collection="c", query="q", top_k=top_k)


def test_candidates_are_about_four_times_top_k_within_bounds() -> None:
    reranking, _ = mesh(max_rerank_candidates=30)
    assert reranking.candidates(RerankOption(), 5) == 20
    assert reranking.candidates(RerankOption(), 10) == 30
    assert reranking.candidates(RerankOption(candidates=2), 5) == 5
    assert reranking.candidates(RerankOption(candidates=25), 5) == 25
    assert reranking.candidates(RerankOption(rerank=False), 5) == 5


async def test_a_local_model_reorders_the_candidates_and_keeps_top_k() -> None:
    reranking, clients = mesh()
    clients.retrieval.scores = {"text 7": 3.0, "text 2": 2.0, "text 9": 1.0}
    found = await reranking.search(search(3), RerankOption("local"), 5)
    fetched = clients.retrieval.calls[0]
    assert isinstance(fetched, retrieval_pb2.SearchRequest) and fetched.top_k == 12
    (scored,) = [c for c in clients.retrieval.calls if isinstance(c, common_pb2.RerankRequest)]
    assert len(scored.documents) == 10 and scored.truncate
    assert [h.document_id for h in found.hits] == ["d7", "d2", "d9"]
    assert found.rerank_scores == pytest.approx([0.9526, 0.8808, 0.7311], abs=1e-4)
    assert found.summary() == {"rerank": "ok", "rerank_model": "local", "rerank_candidates": 10}
    assert not clients.inference.calls


async def test_an_upstream_model_is_scored_by_inference() -> None:
    reranking, clients = mesh()
    clients.inference.scores = {"text 1": 5.0}
    found = await reranking.search(search(2), RerankOption("upstream"), 5)
    assert [h.document_id for h in found.hits] == ["d1", "d0"] and found.status == "ok"
    assert len(clients.inference.calls) == 1


async def test_the_collections_default_reranks_unless_told_not_to() -> None:
    reranking, clients = mesh()
    clients.retrieval.reranker = "local"
    clients.retrieval.scores = {"text 4": 1.0}
    assert (await reranking.search(search(2), RerankOption(), 5)).hits[0].document_id == "d4"
    assert (await reranking.search(search(2), RerankOption(True), 5)).model == "local"
    off = await reranking.search(search(2), RerankOption(False), 5)
    assert off.status == "off" and [h.document_id for h in off.hits] == ["d0", "d1"]
    assert off.rerank_scores == [None, None]


async def test_no_default_means_no_rerank_step_or_a_400_when_asked() -> None:
    reranking, clients = mesh()
    plain = await reranking.search(search(2), RerankOption(), 5)
    assert plain.status == "off" and [h.document_id for h in plain.hits] == ["d0", "d1"]
    assert not [c for c in clients.retrieval.calls if isinstance(c, common_pb2.RerankRequest)]
    with pytest.raises(RagmeshError) as refused:
        await reranking.search(search(2), RerankOption(True), 5)
    assert refused.value.kind is ErrorKind.INVALID_REQUEST and refused.value.param == "rerank"
    meshwide, _ = mesh(default_reranker="upstream")
    assert (await meshwide.search(search(2), RerankOption(), 5)).model == "upstream"


@pytest.mark.parametrize(
    ("code", "kind", "words"),
    [
        (grpc.StatusCode.UNAVAILABLE, ErrorKind.UNAVAILABLE, "failed"),
        (grpc.StatusCode.DEADLINE_EXCEEDED, ErrorKind.DEADLINE, "did not answer within 10 s"),
        (grpc.StatusCode.INTERNAL, ErrorKind.INTERNAL, "failed"),
    ],
)
async def test_a_failing_reranker_is_skipped_unless_required(
    code: grpc.StatusCode, kind: ErrorKind, words: str
) -> None:
    reranking, clients = mesh()
    clients.inference.error = rpc_error(code, "upstream trouble")
    skipped = await reranking.search(search(3), RerankOption("upstream"), 5)
    assert skipped.status == "skipped" and words in skipped.reason and "upstream" in skipped.reason
    assert [h.document_id for h in skipped.hits] == ["d0", "d1", "d2"]  # the fused order
    assert skipped.summary()["rerank_reason"] == skipped.reason
    with pytest.raises(RagmeshError) as required:
        await reranking.search(search(3), RerankOption("upstream", required=True), 5)
    assert required.value.kind is kind and "required" in required.value.message


async def test_unknown_models_are_the_clients_mistake_but_a_stale_default_is_skipped() -> None:
    reranking, clients = mesh()
    with pytest.raises(RagmeshError) as unknown:
        await reranking.search(search(), RerankOption("nope"), 5)
    assert unknown.value.kind is ErrorKind.NOT_FOUND and unknown.value.code == "model_not_found"
    with pytest.raises(RagmeshError) as chat:
        await reranking.search(search(), RerankOption("chat-model"), 5)
    assert chat.value.kind is ErrorKind.INVALID_REQUEST and "not a reranking model" in chat.value.message
    clients.retrieval.reranker = "removed-model"
    stale = await reranking.search(search(), RerankOption(), 5)
    assert stale.status == "skipped" and "does not exist" in stale.reason


async def test_a_service_that_cannot_list_its_models_is_a_503_for_models_nobody_else_has() -> None:
    reranking, clients = mesh()
    clients.inference.cards = []
    clients.inference.error = rpc_error(grpc.StatusCode.UNAVAILABLE, "down")
    assert await reranking.catalog.locate("local") == "retrieval"
    with pytest.raises(RagmeshError) as unsure:
        await reranking.catalog.locate("upstream")
    assert unsure.value.kind is ErrorKind.UNAVAILABLE
