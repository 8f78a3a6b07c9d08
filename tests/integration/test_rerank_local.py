"""Retrieval's local rerankers over real gRPC: a CrossEncoder made in the test, the built-in stage,
and collections that name a default reranker (real Redis, RabbitMQ and embedding model)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from sentence_transformers import CrossEncoder

from ragmesh.v1 import common_pb2, retrieval_pb2

from ..conftest import delete_topology, unique_namespace
from ..rerank_models import TINY_MAX_LENGTH, build_tiny_cross_encoder
from .retrieval_harness import Replica, run_replica

BUILTIN = "ragmesh/sentence-rerank"
QUERY = "what moves the sea"
DOCUMENTS = [
    "Cats are small domesticated carnivorous mammals that purr.",
    "Bread is baked from flour, water and yeast. It rises in the oven.",
    "Rockets burn propellant. Ocean tides come from the pull of the moon on the sea.",
    "A rocket engine ejects exhaust to make thrust.",
]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_cross_encoder(tmp_path_factory.mktemp("local-rerank") / "tiny")


@pytest.fixture(scope="module")
async def replica(
    tmp_path_factory: pytest.TempPathFactory, tiny_model: Path, redis_url: str, amqp_url: str
) -> AsyncIterator[Replica]:
    namespace = unique_namespace()
    rerankers = {"tiny": {"path": str(tiny_model), "batch_size": 2}}
    try:
        async with run_replica(
            tmp_path_factory.mktemp("rerank-replica"), "r", namespace, redis_url, amqp_url, rerankers=rerankers
        ) as running:
            yield running
    finally:
        await delete_topology(amqp_url, namespace)


async def test_the_cross_encoder_orders_by_its_own_scores(replica: Replica, tiny_model: Path) -> None:
    reply = await replica.stub.Rerank(
        common_pb2.RerankRequest(model="tiny", query=QUERY, documents=DOCUMENTS), timeout=30
    )
    reference = CrossEncoder(str(tiny_model), device="cpu", local_files_only=True).predict(
        [(QUERY, d) for d in DOCUMENTS], activation_fn=torch.nn.Identity()
    )
    assert [r.index for r in reply.results] == [int(i) for i in np.argsort(-reference, kind="stable")]
    for result in reply.results:
        assert result.logit == pytest.approx(float(reference[result.index]), abs=1e-4)
        assert result.relevance_score == pytest.approx(1 / (1 + np.exp(-reference[result.index])), abs=1e-4)
    assert reply.model == "tiny" and reply.prompt_tokens > 0


async def test_models_are_listed_with_the_rerank_capability(replica: Replica) -> None:
    listed = await replica.stub.ListModels(common_pb2.ListModelsRequest(), timeout=30)
    cards = {c.id: c for c in listed.models}
    assert list(cards["tiny"].capabilities) == ["rerank"] and cards["tiny"].max_context == TINY_MAX_LENGTH
    assert list(cards[BUILTIN].capabilities) == ["rerank"]
    assert list(cards["all-MiniLM-L6-v2"].capabilities) == ["embedding"]


async def test_the_builtin_stage_moves_the_passage_with_the_answer_up(replica: Replica) -> None:
    documents = [
        "Cats are small domesticated carnivorous mammals that purr.",
        "Rockets burn propellant. Ocean tides come from the pull of the moon on the sea.",
        "Bread is baked from flour, water and yeast.",
        "A rocket engine ejects exhaust to make thrust.",
    ]
    reply = await replica.stub.Rerank(
        common_pb2.RerankRequest(model=BUILTIN, query="what causes ocean tides", documents=documents), timeout=30
    )
    # Second in the order it was given, first by its best sentence: first once both are fused.
    assert reply.results[0].index == 1
    assert all(0.0 < r.relevance_score <= 1.0 for r in reply.results)
    assert [r.relevance_score for r in reply.results] == sorted(
        (r.relevance_score for r in reply.results), reverse=True
    )
    assert reply.prompt_tokens > 0


@pytest.mark.parametrize(
    ("request_", "code", "words"),
    [
        (common_pb2.RerankRequest(model="nope", query="q", documents=["d"]), grpc.StatusCode.NOT_FOUND, "nope"),
        (common_pb2.RerankRequest(model="tiny", query="q"), grpc.StatusCode.INVALID_ARGUMENT, "documents"),
        (common_pb2.RerankRequest(model="tiny", query=" ", documents=["d"]), grpc.StatusCode.INVALID_ARGUMENT, "query"),
        (
            common_pb2.RerankRequest(model="tiny", query="q", documents=["the sea " * 40]),
            grpc.StatusCode.INVALID_ARGUMENT,
            "at most 48",
        ),
    ],
)
async def test_bad_requests(replica: Replica, request_: common_pb2.RerankRequest, code: object, words: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await replica.stub.Rerank(request_, timeout=30)
    assert refused.value.code() == code and words in (refused.value.details() or "")


async def test_a_collection_names_its_default_reranker(replica: Replica) -> None:
    created = await replica.stub.CreateCollection(retrieval_pb2.CollectionRequest(name="reranked", reranker="tiny"))
    assert created.reranker == "tiny"
    got = await replica.stub.GetCollection(retrieval_pb2.CollectionRequest(name="reranked"))
    assert got.reranker == "tiny"
    found = await replica.search("reranked", "anything")
    assert found.reranker == "tiny"
    changed = await replica.stub.UpdateCollection(
        retrieval_pb2.UpdateCollectionRequest(name="reranked", reranker=BUILTIN)
    )
    assert changed.reranker == BUILTIN
    listed = await replica.stub.ListCollections(retrieval_pb2.ListCollectionsRequest())
    assert {c.name: c.reranker for c in listed.collections}["reranked"] == BUILTIN
    cleared = await replica.stub.UpdateCollection(retrieval_pb2.UpdateCollectionRequest(name="reranked", reranker=""))
    assert cleared.reranker == ""
    untouched = await replica.stub.UpdateCollection(retrieval_pb2.UpdateCollectionRequest(name="reranked"))
    assert untouched.reranker == ""
    await replica.stub.DeleteCollection(retrieval_pb2.CollectionRequest(name="reranked"))
    with pytest.raises(grpc.aio.AioRpcError) as gone:
        await replica.stub.UpdateCollection(retrieval_pb2.UpdateCollectionRequest(name="reranked", reranker="tiny"))
    assert gone.value.code() == grpc.StatusCode.NOT_FOUND
