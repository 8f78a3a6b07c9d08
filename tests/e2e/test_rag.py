"""RAG through nginx: citations, aliases, conversations, the response cache, failures, LangChain."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from .conftest import MODEL, Mesh
from .test_retrieval_api import DOCS, wait_job

pytestmark = pytest.mark.e2e

TIDES: list[ChatCompletionMessageParam] = [{"role": "user", "content": "What causes ocean tides?"}]


@pytest.fixture(scope="module")
def rag_collection(mesh: Mesh) -> Iterator[str]:
    with httpx.Client(base_url=mesh.gateway, timeout=60) as http:
        http.post("/v1/collections", json={"name": "e2e-rag"})
        accepted = http.post("/v1/collections/e2e-rag/documents", json={"documents": DOCS}).json()
        job, _ = wait_job(http, accepted["job_id"])
        assert job["status"] == "succeeded"
    yield "e2e-rag"


def chat(http: httpx.Client, **body: Any) -> httpx.Response:
    return http.post("/v1/chat/completions", json={"model": MODEL, "max_tokens": 24, **body})


def test_rag_answer_with_citations(mesh: Mesh, rag_collection: str) -> None:
    reply = mesh.openai().chat.completions.create(
        model=MODEL, messages=TIDES, max_tokens=32, extra_body={"rag": {"collection": rag_collection, "top_k": 2}}
    )
    body = reply.model_dump()
    assert body["rag"]["status"] == "ok" and body["rag"]["collection"] == rag_collection
    assert body["rag"]["passages_retrieved"] == 2 and 1 <= body["rag"]["passages_used"] <= 2
    citations = body["citations"]
    assert [c["index"] for c in citations] == list(range(1, len(citations) + 1))
    assert citations[0]["document_id"] == "tides" and citations[0]["chunk_id"] == "tides#0"
    assert set(citations[0]) == {"index", "document_id", "chunk_id", "title", "score", "snippet", "cited"}
    assert body["usage"]["prompt_tokens_details"]["retrieval_tokens"] == body["rag"]["context_tokens"] > 0


def test_rag_stream_carries_citations_on_the_last_chunk(mesh: Mesh, rag_collection: str, http: httpx.Client) -> None:
    body = {
        "model": MODEL,
        "messages": TIDES,
        "max_tokens": 16,
        "stream": True,
        "stream_options": {"include_usage": True},
        "rag": {"collection": rag_collection, "top_k": 2},
    }
    with http.stream("POST", "/v1/chat/completions", json=body) as response:
        events = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: {")]
    with_choices = [e for e in events if e["choices"]]
    assert "citations" in with_choices[-1] and all("citations" not in e for e in with_choices[:-1])
    assert with_choices[-1]["citations"][0]["document_id"] == "tides"
    assert events[-1]["usage"]["prompt_tokens_details"]["retrieval_tokens"] > 0


def test_alias_binds_a_collection_and_is_listed(mesh: Mesh, rag_collection: str) -> None:
    client = mesh.openai()
    card = client.models.retrieve("facts-rag").model_dump()
    assert card["root"] == MODEL and card["rag"]["collection"] == rag_collection
    reply = client.chat.completions.create(model="facts-rag", messages=TIDES, max_tokens=16)
    assert reply.model == "facts-rag"
    assert reply.model_dump()["citations"][0]["document_id"] == "tides"


def test_retrieval_query_comes_from_the_conversation_not_the_system_prompt(mesh: Mesh, rag_collection: str) -> None:
    messages: list[ChatCompletionMessageParam] = [
        {"role": "system", "content": "You are an expert on rocket engines and propellant."},
        {"role": "user", "content": "Tell me about the ocean tides."},
        {"role": "assistant", "content": "They rise and fall twice a day."},
        {"role": "user", "content": "What causes them?"},
    ]
    reply = mesh.openai().chat.completions.create(
        model=MODEL, messages=messages, max_tokens=8, extra_body={"rag": {"collection": rag_collection, "top_k": 1}}
    )
    assert reply.model_dump()["citations"][0]["document_id"] == "tides"


def test_deterministic_request_is_answered_from_the_cache(http: httpx.Client, rag_collection: str) -> None:
    question = {"messages": [{"role": "user", "content": "Why does bread rise?"}], "temperature": 0}
    rag = {"rag": {"collection": rag_collection, "top_k": 2}}
    first = chat(http, **question, **rag)
    second = chat(http, **question, **rag)
    assert first.headers["x-ragmesh-cache"] == "miss" and second.headers["x-ragmesh-cache"] == "hit"
    assert first.json()["cached"] is False and second.json()["cached"] is True
    for field in ("choices", "citations", "usage"):
        assert second.json()[field] == first.json()[field]
    assert second.json()["id"] != first.json()["id"]
    # The stream of the same request comes from the cache too.
    with http.stream(
        "POST", "/v1/chat/completions", json={"model": MODEL, "max_tokens": 24, "stream": True, **question, **rag}
    ) as streamed:
        assert streamed.headers["x-ragmesh-cache"] == "hit"
        text = "".join(
            e["choices"][0]["delta"].get("content", "")
            for e in (json.loads(line[6:]) for line in streamed.iter_lines() if line.startswith("data: {"))
            if e["choices"]
        )
    assert text == first.json()["choices"][0]["message"]["content"]
    # Per request off, and off for sampled requests.
    assert chat(http, **question, **rag, cache=False).headers["x-ragmesh-cache"] == "off"
    assert chat(http, messages=question["messages"], temperature=0.9, **rag).headers["x-ragmesh-cache"] == "off"
    # New documents change the collection's version: the cached answer is not reused.
    accepted = http.post(
        f"/v1/collections/{rag_collection}/documents",
        json={"documents": [{"id": "yeast", "title": "Yeast", "text": "Yeast makes dough rise by fermenting sugar."}]},
    ).json()
    wait_job(http, accepted["job_id"])
    third = chat(http, **question, **rag)
    assert third.headers["x-ragmesh-cache"] == "miss"
    assert third.json()["rag"]["index_version"] > first.json()["rag"]["index_version"]


def test_no_cache_header_turns_the_cache_off(http: httpx.Client) -> None:
    body = {"model": MODEL, "max_tokens": 4, "temperature": 0, "messages": [{"role": "user", "content": "hi"}]}
    assert (
        http.post("/v1/chat/completions", json=body, headers={"Cache-Control": "no-cache"}).headers["x-ragmesh-cache"]
        == "off"
    )


def test_empty_collection_says_no_sources(http: httpx.Client) -> None:
    http.post("/v1/collections", json={"name": "e2e-empty"})
    reply = chat(http, messages=TIDES, rag={"collection": "e2e-empty"})
    body = reply.json()
    assert reply.status_code == 200 and body["citations"] == []
    assert body["rag"]["status"] == "no_sources"
    assert "No sources were found" in body["choices"][0]["message"]["content"]


@pytest.mark.parametrize(
    ("rag", "status", "param"),
    [
        ({"collection": "e2e-no-such"}, 404, "collection"),
        ("e2e-rag", 400, "rag"),
        ({"collection": "e2e-rag", "top_k": 0}, 400, "rag.top_k"),
        ({"collection": "e2e-rag", "top_k": 500}, 400, "rag.top_k"),
        ({"collection": "e2e-rag", "mode": "fuzzy"}, 400, "rag.mode"),
        ({"top_k": 2}, 400, "rag.collection"),
    ],
)
def test_bad_rag_requests(http: httpx.Client, rag: Any, status: int, param: str) -> None:
    reply = chat(http, messages=TIDES, rag=rag)
    assert reply.status_code == status, reply.text
    assert reply.json()["error"]["param"] == param


def test_json_response_format_is_valid_json(mesh: Mesh) -> None:
    client = mesh.openai()
    reply = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Give me a JSON object with a field named color."}],
        max_tokens=48,
        temperature=0,
        response_format={"type": "json_object"},
    )
    if reply.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(reply.choices[0].message.content or ""), dict)
    schema = {"type": "object", "properties": {"answer": {"type": "string"}}, "required": ["answer"]}
    reply = client.chat.completions.create(  # type: ignore[call-overload]
        model=MODEL,
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=48,
        temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": schema}},
    )
    assert reply.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(reply.choices[0].message.content or "")["answer"], str)


def test_retrieval_down_fails_or_answers_without_context_per_alias(
    mesh: Mesh, http: httpx.Client, rag_collection: str
) -> None:
    assert "retrieval: stopped" in mesh.supervisorctl("stop", "retrieval")
    try:
        strict = http.post("/v1/chat/completions", json={"model": "facts-rag", "messages": TIDES, "max_tokens": 8})
        assert strict.status_code == 503 and strict.json()["error"]["type"] == "server_error"
        lenient = http.post(
            "/v1/chat/completions", json={"model": "facts-rag-lenient", "messages": TIDES, "max_tokens": 8}
        )
        assert lenient.status_code == 200, lenient.text
        assert lenient.json()["rag"]["status"] == "no_context" and lenient.json()["rag"]["error"]
        assert lenient.json()["citations"] == []
    finally:
        mesh.supervisorctl("start", "retrieval")
        deadline = time.monotonic() + 120
        while http.get("/v1/health/ready").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.5)


def test_langchain_chat_openai_and_chat_nvidia(mesh: Mesh, rag_collection: str) -> None:
    from langchain_nvidia_ai_endpoints import ChatNVIDIA
    from langchain_openai import ChatOpenAI
    from pydantic import SecretStr

    plain = ChatOpenAI(base_url=mesh.v1, api_key=SecretStr("unused"), model=MODEL, max_tokens=8, temperature=0)  # type: ignore[call-arg]
    assert plain.invoke("Say hello.").content
    rag = ChatOpenAI(base_url=mesh.v1, api_key=SecretStr("unused"), model="facts-rag", max_tokens=8)  # type: ignore[call-arg]
    assert rag.invoke("What causes tides?").content
    assert "".join(str(c.content) for c in rag.stream("What causes tides?"))
    nvidia = ChatNVIDIA(base_url=mesh.v1, model=MODEL, api_key="nvapi-unused", max_completion_tokens=8)
    assert nvidia.invoke("Say hello.").content
    nvidia_rag = ChatNVIDIA(base_url=mesh.v1, model="facts-rag", api_key="nvapi-unused", max_completion_tokens=8)
    assert "".join(str(c.content) for c in nvidia_rag.stream("What causes tides?"))


def test_openai_client_raises_on_unknown_collection(mesh: Mesh) -> None:
    with pytest.raises(openai.NotFoundError):
        mesh.openai().chat.completions.create(
            model=MODEL, messages=TIDES, max_tokens=4, extra_body={"rag": {"collection": "e2e-missing"}}
        )
