"""Chat through nginx with the official openai client, as a user would."""

from __future__ import annotations

from typing import Any

import httpx
import openai
import orjson
import pytest
from openai.types.chat import ChatCompletionMessageParam

from .conftest import MODEL, Mesh

pytestmark = pytest.mark.e2e

PROMPT: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Tell me a story about a robot."}]


def test_models_list_and_detail(mesh: Mesh) -> None:
    client = mesh.openai()
    assert MODEL in [m.id for m in client.models.list()]
    assert client.models.retrieve(MODEL).owned_by == "embedded"  # the backend serving it
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")


def test_non_stream_chat_with_max_tokens(mesh: Mesh) -> None:
    reply = mesh.openai().chat.completions.create(model=MODEL, messages=PROMPT, max_tokens=9, temperature=0)
    choice = reply.choices[0]
    assert choice.finish_reason == "length"
    assert reply.usage is not None and reply.usage.completion_tokens == 9
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + 9
    assert choice.message.role == "assistant" and choice.message.content


def test_stream_with_usage_chunk_before_done(mesh: Mesh, http: httpx.Client) -> None:
    stream = mesh.openai().chat.completions.create(
        model=MODEL,
        messages=PROMPT,
        max_tokens=8,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 8
    assert chunks[-2].choices[0].finish_reason == "length"
    assert all(c.usage is None for c in chunks[:-1])
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text

    body = {"model": MODEL, "messages": PROMPT, "max_tokens": 4, "stream": True}
    with http.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    assert orjson.loads(lines[-2][6:])["choices"][0]["finish_reason"] == "length"


def test_responses_match_the_openai_schema(http: httpx.Client, validate: Any) -> None:
    validate(http.get("/v1/models").json(), "ListModelsResponse")
    validate(http.get(f"/v1/models/{MODEL}").json(), "Model")
    whole = http.post("/v1/chat/completions", json={"model": MODEL, "messages": PROMPT, "max_tokens": 3})
    assert whole.status_code == 200
    validate(whole.json(), "CreateChatCompletionResponse")
    body = {
        "model": MODEL,
        "messages": PROMPT,
        "max_tokens": 4,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    with http.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line[len("data: ") :] for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    for event in events[:-1]:
        validate(orjson.loads(event), "CreateChatCompletionStreamResponse")


def test_stream_and_non_stream_give_the_same_greedy_text(mesh: Mesh) -> None:
    client = mesh.openai()
    whole = client.chat.completions.create(model=MODEL, messages=PROMPT, max_tokens=16, temperature=0)
    streamed = "".join(
        c.choices[0].delta.content or ""
        for c in client.chat.completions.create(model=MODEL, messages=PROMPT, max_tokens=16, temperature=0, stream=True)
        if c.choices
    )
    assert whole.choices[0].message.content == streamed


def test_stop_sequence_is_honoured(mesh: Mesh) -> None:
    client = mesh.openai()
    free = client.chat.completions.create(model=MODEL, messages=PROMPT, max_tokens=30, temperature=0)
    text = free.choices[0].message.content or ""
    words = text.split(" ")
    assert len(words) > 3, text
    stop = f" {words[2]}"
    cut = client.chat.completions.create(model=MODEL, messages=PROMPT, max_tokens=30, temperature=0, stop=[stop])
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].message.content == text[: text.index(stop)]
    streamed = "".join(
        c.choices[0].delta.content or ""
        for c in client.chat.completions.create(
            model=MODEL,
            messages=PROMPT,
            max_tokens=30,
            temperature=0,
            stop=stop,
            stream=True,
        )
        if c.choices
    )
    assert streamed == text[: text.index(stop)]


def test_seed_temperature_and_top_p_are_honoured(mesh: Mesh) -> None:
    client = mesh.openai()

    def answer(**kw: Any) -> str:
        reply = client.chat.completions.create(model=MODEL, messages=PROMPT, max_tokens=20, **kw)
        return reply.choices[0].message.content or ""

    greedy = answer(temperature=0)
    assert answer(temperature=1.5, seed=7) == answer(temperature=1.5, seed=7)
    hot = {answer(temperature=2.0, seed=s) for s in (1, 2, 3)}
    assert len(hot) > 1, "temperature 2 with different seeds should vary"
    # A vanishing top_p keeps only the most likely token: sampling becomes greedy.
    assert answer(temperature=1.5, top_p=1e-6, seed=3) == greedy


def test_request_id_is_passed_through(http: httpx.Client) -> None:
    reply = http.get("/v1/models", headers={"X-Request-ID": "test-rid-123"})
    assert reply.headers["x-request-id"] == "test-rid-123"
    assert len(http.get("/v1/models").headers["x-request-id"]) >= 16


def test_health_endpoints(http: httpx.Client, mesh: Mesh) -> None:
    assert http.get("/health").json() == {"status": "ok"}
    ready = http.get("/v1/health/ready")
    assert ready.status_code == 200
    assert ready.json()["dependencies"] == {
        "inference": "ok",
        "postprocess": "ok",
        "retrieval": "ok",
        "redis": "ok",
        "rabbitmq": "ok",
        "batch_workers": "ok",
    }
    assert http.get("/v1/health/live").status_code == 200
    # Metrics are for the scraper inside, on each service's own port, not through the gateway.
    assert http.get("/metrics").status_code == 404
    assert (
        "ragmesh:requests_total"
        in httpx.get(f"http://127.0.0.1:{mesh.env['RAGMESH_PREPROCESS_HTTP_PORT']}/metrics").text
    )
