"""Inference's Rerank over real gRPC, against an upstream reranker written in the test (both API shapes)."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import grpc
import pytest

from inference.config import parse_backends
from inference.router import Router
from inference.servicer import InferenceServicer
from ragmesh.errors import from_rpc_error
from ragmesh.v1 import common_pb2, inference_pb2_grpc

from ..rerank_upstream import COHERE_MODEL, NIM_MODEL, RERANK_KEY, RerankUpstream, overlap, rerank_backends_yaml
from .conftest import serving

QUERY = "what pulls the ocean tides"
DOCUMENTS = [
    "Bread rises in the oven.",
    "The moon pulls the ocean and makes tides.",
    "Ocean water is salty.",
    "Tides: what the moon pulls.",
]


@asynccontextmanager
async def inference(yaml: str, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[inference_pb2_grpc.InferenceAsyncStub]:
    """Inference with only upstream backends (no embedded engine), behind a real gRPC server."""
    monkeypatch.setenv("TEST_RERANK_KEY", RERANK_KEY)
    router = Router(None)
    config = parse_backends(yaml)
    await router.load(config)
    servicer = InferenceServicer(router, None, lambda: router.load(config))
    try:
        async with serving(lambda s: inference_pb2_grpc.add_InferenceServicer_to_server(servicer, s)) as channel:
            yield inference_pb2_grpc.InferenceStub(channel)
    finally:
        await router.aclose()


def request(model: str, truncate: bool = False) -> common_pb2.RerankRequest:
    return common_pb2.RerankRequest(model=model, query=QUERY, documents=DOCUMENTS, truncate=truncate)


def expected_order() -> list[int]:
    scores = [overlap(QUERY, d) for d in DOCUMENTS]
    return sorted(range(len(DOCUMENTS)), key=lambda i: (-scores[i], i))


@pytest.fixture
def upstream() -> Iterator[RerankUpstream]:
    with RerankUpstream() as server:
        yield server


async def test_nim_ranking_shape_with_the_server_key(upstream: RerankUpstream, monkeypatch: pytest.MonkeyPatch) -> None:
    async with inference(rerank_backends_yaml(upstream.url), monkeypatch) as stub:
        reply = await stub.Rerank(request(NIM_MODEL, truncate=True), timeout=10)
    (sent,) = upstream.faults.seen
    assert sent["path"] == "/v1/ranking" and sent["headers"]["authorization"] == f"Bearer {RERANK_KEY}"
    assert sent["body"] == {
        "model": NIM_MODEL,
        "query": {"text": QUERY},
        "passages": [{"text": d} for d in DOCUMENTS],
        "truncate": "END",
    }
    assert [r.index for r in reply.results] == expected_order()
    for result in reply.results:
        logit = overlap(QUERY, DOCUMENTS[result.index]) - 2.5
        assert result.logit == pytest.approx(logit)
        assert result.relevance_score == pytest.approx(1 / (1 + math.exp(-logit)), rel=1e-5)
    assert reply.model == NIM_MODEL


async def test_rerank_shape_maps_relevance_scores(upstream: RerankUpstream, monkeypatch: pytest.MonkeyPatch) -> None:
    async with inference(rerank_backends_yaml(upstream.url), monkeypatch) as stub:
        reply = await stub.Rerank(request(COHERE_MODEL), timeout=10)
        models = await stub.ListModels(common_pb2.ListModelsRequest(), timeout=10)
    (sent,) = upstream.faults.seen
    assert sent["path"] == "/v1/rerank" and sent["headers"]["authorization"] == f"Bearer {RERANK_KEY}"
    assert sent["body"]["query"] == QUERY and sent["body"]["documents"] == DOCUMENTS
    assert [r.index for r in reply.results] == expected_order()
    words = 1 + len(QUERY.split())
    for result in reply.results:
        relevance = overlap(QUERY, DOCUMENTS[result.index]) / words
        assert result.relevance_score == pytest.approx(relevance, rel=1e-5)
        assert 1 / (1 + math.exp(-result.logit)) == pytest.approx(relevance, rel=1e-4)
    assert reply.prompt_tokens > 0
    cards = {c.id: c for c in models.models}
    assert list(cards[NIM_MODEL].capabilities) == ["rerank"] and cards[NIM_MODEL].owned_by == "nim-rerank"
    assert list(cards[COHERE_MODEL].capabilities) == ["rerank"]


async def test_a_failure_that_may_pass_is_retried(upstream: RerankUpstream, monkeypatch: pytest.MonkeyPatch) -> None:
    upstream.faults.fail = [503]
    async with inference(rerank_backends_yaml(upstream.url), monkeypatch) as stub:
        reply = await stub.Rerank(request(NIM_MODEL), timeout=10)
    assert len(upstream.faults.seen) == 2 and [r.index for r in reply.results] == expected_order()


async def test_a_slow_upstream_times_out(upstream: RerankUpstream, monkeypatch: pytest.MonkeyPatch) -> None:
    upstream.faults.hang = True
    async with inference(rerank_backends_yaml(upstream.url, timeout=0.3), monkeypatch) as stub:
        with pytest.raises(grpc.aio.AioRpcError) as slow:
            await stub.Rerank(request(COHERE_MODEL), timeout=20)
    assert slow.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert from_rpc_error(slow.value).http_status == 504
    assert len(upstream.faults.seen) == 2  # each attempt timed out


async def test_a_caller_deadline_bounds_a_hung_upstream(
    upstream: RerankUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    upstream.faults.hang = True
    async with inference(rerank_backends_yaml(upstream.url), monkeypatch) as stub:
        with pytest.raises(grpc.aio.AioRpcError) as slow:
            await stub.Rerank(request(NIM_MODEL), timeout=0.5)
    assert slow.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


async def test_a_down_upstream_opens_the_breaker_then_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    with RerankUpstream() as down, RerankUpstream() as spare:
        down.stop()
        yaml = rerank_backends_yaml(down.url, attempts=1, failures=2, fallback_url=spare.url)
        async with inference(yaml, monkeypatch) as stub:
            for _ in range(3):
                # Down: connection refused, so each call falls back to the other model and answers.
                reply = await stub.Rerank(request(NIM_MODEL), timeout=10)
                assert reply.model == COHERE_MODEL and [r.index for r in reply.results] == expected_order()
    assert len(spare.faults.seen) == 3 and all(s["path"] == "/v1/rerank" for s in spare.faults.seen)


async def test_a_down_upstream_without_fallback_is_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    with RerankUpstream() as down:
        down.stop()
        async with inference(rerank_backends_yaml(down.url, attempts=1, failures=1), monkeypatch) as stub:
            for _ in range(2):  # refused, then the breaker is open: no attempt at all
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await stub.Rerank(request(NIM_MODEL), timeout=10)
                assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
                assert from_rpc_error(refused.value).http_status == 503


@pytest.mark.parametrize("fault", ["garbage", "missing"])
async def test_answers_that_are_not_the_apis_shape_are_bad_gateway(
    upstream: RerankUpstream, monkeypatch: pytest.MonkeyPatch, fault: str
) -> None:
    setattr(upstream.faults, fault, True)
    async with inference(rerank_backends_yaml(upstream.url), monkeypatch) as stub:
        for model in (NIM_MODEL, COHERE_MODEL):
            with pytest.raises(grpc.aio.AioRpcError) as bad:
                await stub.Rerank(request(model), timeout=10)
            assert from_rpc_error(bad.value).http_status == 502


async def test_a_wrong_server_key_is_the_operators_problem(
    upstream: RerankUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    upstream.key = "another-key"
    async with inference(rerank_backends_yaml(upstream.url, attempts=1), monkeypatch) as stub:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.Rerank(request(NIM_MODEL), timeout=10)
    assert from_rpc_error(refused.value).http_status == 502


async def test_unknown_models_and_empty_requests(upstream: RerankUpstream, monkeypatch: pytest.MonkeyPatch) -> None:
    async with inference(rerank_backends_yaml(upstream.url), monkeypatch) as stub:
        with pytest.raises(grpc.aio.AioRpcError) as unknown:
            await stub.Rerank(common_pb2.RerankRequest(model="nope", query="q", documents=["d"]), timeout=10)
        assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.aio.AioRpcError) as empty:
            await stub.Rerank(common_pb2.RerankRequest(model=NIM_MODEL, query="q"), timeout=10)
        assert empty.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert not upstream.faults.seen


def test_rerank_only_backends_need_no_chat_models(tmp_path: Path) -> None:
    config = parse_backends(rerank_backends_yaml("http://127.0.0.1:1/v1"))
    assert [b.name for b in config.backends] == ["nim-rerank", "cohere-rerank"]
