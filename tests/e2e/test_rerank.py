"""Reranking through nginx: /v1/rerank and /v1/ranking, search and RAG with a rerank step.

The shared mesh serves a tiny CrossEncoder made by the tests (local, in
retrieval), the built-in stage, and upstream rerankers written in the tests:
one in NIM's shape and one in the /v1/rerank shape (the same server), one
that never answers and one that is down.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from sentence_transformers import CrossEncoder

from ..rerank_upstream import COHERE_MODEL, NIM_MODEL, RERANK_KEY, overlap
from .conftest import BUILTIN_RERANKER, DOWN_RERANKER, MODEL, SLOW_RERANKER, TINY_RERANKER, Mesh
from .test_retrieval_api import DOCS, wait_job

pytestmark = pytest.mark.e2e

QUERY = "what moves the sea"
DOCUMENTS = [
    "Cats are small domesticated carnivorous mammals that purr.",
    "Ocean tides come from the gravitational pull of the moon and the sun.",
    "Bread is baked from flour, water and yeast.",
    "Why does the sea rise and fall? The moon moves it.",
    "A rocket engine burns propellant.",
]
COLLECTION = "e2e-rerank"


@pytest.fixture(scope="module")
def collection(mesh: Mesh) -> Iterator[str]:
    with httpx.Client(base_url=mesh.gateway, timeout=60) as http:
        http.delete(f"/v1/collections/{COLLECTION}")
        assert http.post("/v1/collections", json={"name": COLLECTION}).status_code == 201
        accepted = http.post(f"/v1/collections/{COLLECTION}/documents", json={"documents": DOCS}).json()
        job, _ = wait_job(http, accepted["job_id"])
        assert job["status"] == "succeeded"
    yield COLLECTION


def tiny_logits(mesh: Mesh, query: str, documents: list[str]) -> np.ndarray:
    """The tiny model's own scores, computed here by sentence-transformers, not by the mesh."""
    assert mesh.tiny_reranker is not None
    model = CrossEncoder(str(mesh.tiny_reranker), device="cpu", local_files_only=True)
    return np.asarray(model.predict([(query, d) for d in documents], activation_fn=torch.nn.Identity()))


def error_of(reply: httpx.Response) -> dict[str, Any]:
    body = reply.json()
    assert set(body) == {"error"}, body
    error: dict[str, Any] = body["error"]
    assert {"message", "type", "param", "code"} <= set(error) and error["message"]
    return error


# --- /v1/rerank and /v1/ranking ------------------------------------------------------------


def test_rerank_with_the_local_cross_encoder(mesh: Mesh, http: httpx.Client) -> None:
    documents: list[Any] = [*DOCUMENTS[:3], {"text": DOCUMENTS[3]}, DOCUMENTS[4]]  # strings or objects
    reply = http.post("/v1/rerank", json={"model": TINY_RERANKER, "query": QUERY, "documents": documents, "top_n": 3})
    assert reply.status_code == 200, reply.text
    body = reply.json()
    expected = tiny_logits(mesh, QUERY, DOCUMENTS)
    order = [int(i) for i in np.argsort(-expected, kind="stable")]
    assert [r["index"] for r in body["results"]] == order[:3]
    for result in body["results"]:
        assert result["relevance_score"] == pytest.approx(1 / (1 + math.exp(-expected[result["index"]])), abs=1e-4)
        assert result["document"] == {"text": DOCUMENTS[result["index"]]}
    assert body["model"] == TINY_RERANKER and body["id"].startswith("rerank-")
    assert body["usage"]["total_tokens"] > 0


def test_ranking_nim_shape_with_the_local_cross_encoder(mesh: Mesh, http: httpx.Client) -> None:
    reply = http.post(
        "/v1/ranking",
        json={"model": TINY_RERANKER, "query": {"text": QUERY}, "passages": [{"text": d} for d in DOCUMENTS]},
    )
    assert reply.status_code == 200, reply.text
    rankings = reply.json()["rankings"]
    expected = tiny_logits(mesh, QUERY, DOCUMENTS)
    assert [r["index"] for r in rankings] == [int(i) for i in np.argsort(-expected, kind="stable")]
    assert [r["logit"] for r in rankings] == pytest.approx(sorted(expected, reverse=True), abs=1e-4)


@pytest.mark.parametrize(("path", "model"), [("/v1/ranking", NIM_MODEL), ("/v1/rerank", COHERE_MODEL)])
def test_upstream_rerankers_get_the_server_side_key(mesh: Mesh, path: str, model: str) -> None:
    assert mesh.rerank_upstream is not None
    seen = len(mesh.rerank_upstream.faults.seen)
    if path == "/v1/ranking":
        body: dict[str, Any] = {"model": model, "query": {"text": QUERY}, "passages": [{"text": d} for d in DOCUMENTS]}
    else:
        body = {"model": model, "query": QUERY, "documents": DOCUMENTS, "return_documents": False}
    # The client's own key never goes upstream (auth is off on this mesh: any key passes the gateway).
    reply = httpx.post(f"{mesh.v1}{path[3:]}", json=body, headers={"Authorization": "Bearer client-key"}, timeout=30)
    assert reply.status_code == 200, reply.text
    (sent,) = mesh.rerank_upstream.faults.seen[seen:]
    assert sent["headers"]["authorization"] == f"Bearer {RERANK_KEY}" and sent["path"] == path
    scores = [overlap(QUERY, d) for d in DOCUMENTS]
    order = sorted(range(len(DOCUMENTS)), key=lambda i: (-scores[i], i))
    items = reply.json()["rankings" if path == "/v1/ranking" else "results"]
    assert [r["index"] for r in items] == order
    if path == "/v1/rerank":
        assert all("document" not in r for r in items)


def test_either_shape_answers_from_either_kind_of_upstream(http: httpx.Client) -> None:
    """The NIM-shaped endpoint over a /v1/rerank upstream: its relevance scores come back as logits."""
    reply = http.post(
        "/v1/ranking",
        json={"model": COHERE_MODEL, "query": {"text": QUERY}, "passages": [{"text": d} for d in DOCUMENTS]},
    )
    assert reply.status_code == 200, reply.text
    words = 1 + len(QUERY.split())
    for ranking in reply.json()["rankings"]:
        relevance = overlap(QUERY, DOCUMENTS[ranking["index"]]) / words
        assert 1 / (1 + math.exp(-ranking["logit"])) == pytest.approx(relevance, abs=1e-4)


def test_rerank_models_are_listed_with_their_capability(http: httpx.Client) -> None:
    cards = {m["id"]: m for m in http.get("/v1/models").json()["data"]}
    for model in (TINY_RERANKER, BUILTIN_RERANKER, NIM_MODEL, COHERE_MODEL):
        assert cards[model]["capabilities"] == ["rerank"], cards[model]
    assert cards["all-MiniLM-L6-v2"]["capabilities"] == ["embedding"]
    assert cards[NIM_MODEL]["owned_by"] == "nim-rerank" and cards[TINY_RERANKER]["max_model_len"] == 48


LONG = " ".join(["the moon pulls the sea"] * 20)  # over the tiny model's 48 tokens
BAD: list[tuple[str, str, dict[str, Any], int, str | None, str | None]] = [
    ("empty documents", "/v1/rerank", {"model": TINY_RERANKER, "query": "q", "documents": []}, 400, "documents", None),
    (
        "empty passages",
        "/v1/ranking",
        {"model": TINY_RERANKER, "query": {"text": "q"}, "passages": []},
        400,
        "passages",
        None,
    ),
    (
        "an empty document",
        "/v1/rerank",
        {"model": TINY_RERANKER, "query": "q", "documents": ["a", " "]},
        400,
        "documents[1]",
        None,
    ),
    (
        "too many documents",
        "/v1/rerank",
        {"model": TINY_RERANKER, "query": "q", "documents": ["x"] * 1001},
        400,
        "documents",
        "too_many_documents",
    ),
    (
        "a document over the model's length cap",
        "/v1/rerank",
        {"model": TINY_RERANKER, "query": QUERY, "documents": ["the sea", LONG]},
        400,
        "documents",
        "context_length_exceeded",
    ),
    (
        "a passage over the model's length cap",
        "/v1/ranking",
        {"model": TINY_RERANKER, "query": {"text": QUERY}, "passages": [{"text": LONG}]},
        400,
        "passages",
        "context_length_exceeded",
    ),
    (
        "a document over the character cap",
        "/v1/rerank",
        {"model": COHERE_MODEL, "query": "q", "documents": ["a" * 100_001]},
        400,
        "documents[0]",
        "context_length_exceeded",
    ),
    (
        "unknown model",
        "/v1/rerank",
        {"model": "no-such-reranker", "query": "q", "documents": ["a"]},
        404,
        "model",
        "model_not_found",
    ),
    (
        "unknown model, NIM shape",
        "/v1/ranking",
        {"model": "no-such-reranker", "query": {"text": "q"}, "passages": [{"text": "a"}]},
        404,
        "model",
        "model_not_found",
    ),
    ("a chat model", "/v1/rerank", {"model": MODEL, "query": "q", "documents": ["a"]}, 400, "model", None),
    ("no query", "/v1/rerank", {"model": TINY_RERANKER, "documents": ["a"]}, 400, "query", None),
    ("empty query", "/v1/rerank", {"model": TINY_RERANKER, "query": "", "documents": ["a"]}, 400, "query", None),
    (
        "bad truncate",
        "/v1/ranking",
        {"model": TINY_RERANKER, "query": {"text": "q"}, "passages": [{"text": "a"}], "truncate": "START"},
        400,
        "truncate",
        None,
    ),
    (
        "top_n zero",
        "/v1/rerank",
        {"model": TINY_RERANKER, "query": "q", "documents": ["a"], "top_n": 0},
        400,
        "top_n",
        None,
    ),
]


@pytest.mark.parametrize(("name", "path", "body", "status", "param", "code"), BAD, ids=[b[0] for b in BAD])
def test_bad_input_through_nginx_is_an_openai_shaped_4xx(
    http: httpx.Client, name: str, path: str, body: dict[str, Any], status: int, param: str | None, code: str | None
) -> None:
    reply = http.post(path, json=body)
    assert reply.status_code == status, reply.text
    error = error_of(reply)
    assert error["type"] == "invalid_request_error" and error["param"] == param
    if code is not None:
        assert error["code"] == code


def test_truncation_allowed_scores_an_over_long_document(http: httpx.Client) -> None:
    cohere = http.post(
        "/v1/rerank", json={"model": TINY_RERANKER, "query": QUERY, "documents": [LONG], "truncation": True}
    )
    nim = http.post(
        "/v1/ranking",
        json={"model": TINY_RERANKER, "query": {"text": QUERY}, "passages": [{"text": LONG}], "truncate": "END"},
    )
    assert cohere.status_code == nim.status_code == 200, (cohere.text, nim.text)
    assert nim.json()["rankings"][0]["logit"] == pytest.approx(
        math.log(cohere.json()["results"][0]["relevance_score"] / (1 - cohere.json()["results"][0]["relevance_score"])),
        abs=1e-3,
    )


def test_the_rerank_routes_are_counted(mesh: Mesh, http: httpx.Client) -> None:
    http.post("/v1/rerank", json={"model": TINY_RERANKER, "query": QUERY, "documents": DOCUMENTS})
    metrics = httpx.get(f"http://127.0.0.1:{mesh.env['RAGMESH_PREPROCESS_HTTP_PORT']}/metrics").text
    assert f'ragmesh:requests_total{{endpoint="rerank",model="{TINY_RERANKER}",status="ok",stream="false"}}' in metrics


# --- search and RAG with a rerank step ----------------------------------------------------------


def search(http: httpx.Client, **body: Any) -> dict[str, Any]:
    reply = http.post("/v1/search", json={"collection": COLLECTION, "query": "why does the sea rise", **body})
    assert reply.status_code == 200, reply.text
    result: dict[str, Any] = reply.json()
    return result


def test_search_reranked_by_the_local_model(mesh: Mesh, http: httpx.Client, collection: str) -> None:
    plain = search(http, top_k=4, rerank=False)
    assert plain["rerank"] == "off" and all("rerank_score" not in r for r in plain["results"])
    reranked = search(http, top_k=2, rerank=TINY_RERANKER, rerank_candidates=4)
    assert reranked["rerank"] == "ok" and reranked["rerank_model"] == TINY_RERANKER
    assert reranked["rerank_candidates"] == 4
    passages = [f"{r['title']}\n{r['text']}" for r in plain["results"]]
    expected = tiny_logits(mesh, "why does the sea rise", passages)
    best = [plain["results"][int(i)]["chunk_id"] for i in np.argsort(-expected, kind="stable")[:2]]
    assert [r["chunk_id"] for r in reranked["results"]] == best
    for result in reranked["results"]:
        fused = next(p for p in plain["results"] if p["chunk_id"] == result["chunk_id"])
        assert result["score"] == pytest.approx(fused["score"])  # the retrieval score stays
        assert 0 <= result["rerank_score"] <= 1
    assert reranked["results"][0]["rerank_score"] >= reranked["results"][1]["rerank_score"]


def test_search_reranked_upstream_in_the_upstreams_order(http: httpx.Client, collection: str) -> None:
    query = "flour water yeast bread dough"
    body = search(http, query=query, top_k=4, rerank=NIM_MODEL, rerank_candidates=4)
    assert body["rerank"] == "ok"
    scores = [overlap(query, f"{r['title']}\n{r['text']}") for r in body["results"]]
    assert scores == sorted(scores, reverse=True) and body["results"][0]["document_id"] == "bread"


@pytest.mark.parametrize(
    ("model", "words", "status"), [(SLOW_RERANKER, "did not answer within 3 s", 504), (DOWN_RERANKER, "failed", 503)]
)
def test_a_slow_or_down_reranker_gives_the_fused_order(
    http: httpx.Client, collection: str, model: str, words: str, status: int
) -> None:
    plain = search(http, top_k=3, rerank=False)
    skipped = search(http, top_k=3, rerank=model)
    assert skipped["rerank"] == "skipped" and skipped["rerank_model"] == model
    assert words in skipped["rerank_reason"]
    assert [r["chunk_id"] for r in skipped["results"]] == [r["chunk_id"] for r in plain["results"]]
    assert all("rerank_score" not in r for r in skipped["results"])
    required = http.post(
        "/v1/search",
        json={"collection": COLLECTION, "query": "why does the sea rise", "rerank": model, "rerank_required": True},
    )
    assert required.status_code == status, required.text
    assert "required" in error_of(required)["message"]


def test_a_collections_default_reranker(http: httpx.Client) -> None:
    http.delete("/v1/collections/e2e-rerank-default")
    created = http.post("/v1/collections", json={"name": "e2e-rerank-default", "reranker": TINY_RERANKER})
    assert created.status_code == 201 and created.json()["reranker"] == TINY_RERANKER
    job, _ = wait_job(
        http, http.post("/v1/collections/e2e-rerank-default/documents", json={"documents": DOCS}).json()["job_id"]
    )
    assert job["status"] == "succeeded"

    def ask(**body: Any) -> dict[str, Any]:
        return search(http, collection="e2e-rerank-default", top_k=2, **body)

    assert ask()["rerank"] == "ok" and ask()["rerank_model"] == TINY_RERANKER  # unasked: the default
    assert ask(rerank=True)["rerank_model"] == TINY_RERANKER
    assert ask(rerank=False)["rerank"] == "off"
    assert ask(rerank=NIM_MODEL)["rerank_model"] == NIM_MODEL
    patched = http.patch("/v1/collections/e2e-rerank-default", json={"reranker": None})
    assert patched.status_code == 200 and patched.json()["reranker"] is None
    assert ask()["rerank"] == "off"
    refused = http.post("/v1/search", json={"collection": "e2e-rerank-default", "query": "q", "rerank": True})
    assert refused.status_code == 400 and error_of(refused)["param"] == "rerank"
    unknown = http.post("/v1/collections", json={"name": "e2e-rerank-x", "reranker": "no-such-reranker"})
    assert unknown.status_code == 404 and error_of(unknown)["code"] == "model_not_found"
    bad_patch = http.patch("/v1/collections/e2e-rerank-default", json={"reranker": MODEL})
    assert bad_patch.status_code == 400


def test_rag_citations_carry_both_scores(mesh: Mesh, collection: str) -> None:
    reply = mesh.openai().chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "What makes bread rise?"}],
        max_tokens=16,
        extra_body={"rag": {"collection": collection, "top_k": 2, "rerank": NIM_MODEL, "rerank_candidates": 4}},
    )
    body = reply.model_dump()
    assert body["rag"]["rerank"] == "ok" and body["rag"]["rerank_model"] == NIM_MODEL
    assert body["rag"]["rerank_candidates"] == 4
    assert body["citations"][0]["document_id"] == "bread"
    for citation in body["citations"]:
        assert citation["score"] > 0 and 0 <= citation["rerank_score"] <= 1


def test_rag_with_a_slow_reranker_answers_from_the_fused_order(mesh: Mesh, collection: str) -> None:
    reply = mesh.openai().chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "What makes bread rise?"}],
        max_tokens=8,
        extra_body={"rag": {"collection": collection, "top_k": 2, "rerank": SLOW_RERANKER}},
    )
    body = reply.model_dump()
    assert body["rag"]["status"] == "ok" and body["rag"]["rerank"] == "skipped"
    assert "did not answer" in body["rag"]["rerank_reason"]
    assert body["citations"] and all("rerank_score" not in c for c in body["citations"])


def test_langchain_nvidia_rerank_through_the_gateway(mesh: Mesh) -> None:
    from langchain_core.documents import Document
    from langchain_nvidia_ai_endpoints import NVIDIARerank

    ranker = NVIDIARerank(base_url=mesh.v1, model=TINY_RERANKER, api_key="unused", top_n=2)
    ranked = ranker.compress_documents([Document(page_content=d) for d in DOCUMENTS], QUERY)
    expected = tiny_logits(mesh, QUERY, DOCUMENTS)
    order = [int(i) for i in np.argsort(-expected, kind="stable")]
    assert [d.page_content for d in ranked] == [DOCUMENTS[i] for i in order[:2]]
    assert ranked[0].metadata["relevance_score"] == pytest.approx(float(expected[order[0]]), abs=1e-4)
