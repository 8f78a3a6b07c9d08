"""Routing pieces on their own: the circuit breaker, backoff, and the upstream stream parser."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from inference.config import UpstreamBackend
from inference.router import Breaker, _backoff
from inference.upstream import UpstreamEngine, UpstreamError
from ragmesh.errors import ErrorKind
from ragmesh.v1 import common_pb2, inference_pb2


def test_breaker_opens_after_failures_then_half_opens_for_one_trial() -> None:
    breaker = Breaker(failures_to_open=2, reset_after=10)
    assert breaker.allows(0)
    breaker.failed(0)
    assert breaker.allows(1) and breaker.state == "closed"
    breaker.failed(1)
    assert not breaker.allows(5)  # open
    assert breaker.allows(11)  # half-open: one trial
    breaker.started(11)
    assert not breaker.allows(11.5)  # the trial is running: nobody else
    breaker.failed(12)
    assert not breaker.allows(13)  # the trial failed: open again
    assert breaker.allows(22.5)
    breaker.started(22.5)
    breaker.succeeded()
    assert breaker.allows(22.6) and breaker.state == "closed"


def test_backoff_is_jittered_capped_and_honours_retry_after() -> None:
    for attempt in range(6):
        assert 0 <= _backoff(attempt, 0.2, 5.0, None) <= min(5.0, 0.2 * 2**attempt)
    assert _backoff(0, 0.2, 5.0, 3.0) >= 3.0
    assert _backoff(0, 0.2, 5.0, 60.0) == 5.0


def sse(*events: Any) -> bytes:
    return b"".join(b"data: " + (e if isinstance(e, bytes) else json.dumps(e).encode()) + b"\n\n" for e in events)


def engine_with(handler: Any) -> UpstreamEngine:
    engine = UpstreamEngine(UpstreamBackend(name="u", type="openai", base_url="http://upstream/v1", models=["m"]))
    engine._client = httpx.AsyncClient(base_url="http://upstream/v1", transport=httpx.MockTransport(handler))
    return engine


def request() -> inference_pb2.GenerateRequest:
    return inference_pb2.GenerateRequest(
        model="m",
        chat=inference_pb2.ChatInput(messages=[common_pb2.ChatMessage(role="user", content="hi")]),
        openai_json=json.dumps(
            {"model": "alias", "messages": [{"role": "user", "content": "hi"}], "tools": [{"t": 1}]}
        ),
    )


async def collect(engine: UpstreamEngine) -> list[common_pb2.GenerationChunk]:
    return [c async for c in engine.generate(request(), "m")]


async def test_stream_is_parsed_and_the_request_passes_through() -> None:
    seen: dict[str, Any] = {}

    def handler(req: httpx.Request) -> httpx.Response:
        seen.update(json.loads(req.content))
        body = sse(
            {"choices": [{"index": 0, "delta": {"role": "assistant", "content": "Hel"}}]},
            {"choices": [{"index": 0, "delta": {"content": "lo", "tool_calls": [{"index": 0, "id": "c1"}]}}]},
            {"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]},
            {"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 2}},
            b"[DONE]",
        )
        return httpx.Response(200, content=body, headers={"content-type": "text/event-stream"})

    chunks = await collect(engine_with(handler))
    assert seen["tools"] == [{"t": 1}] and seen["model"] == "m" and seen["stream"] is True
    assert seen["stream_options"] == {"include_usage": True}
    assert [c.text for c in chunks] == ["Hel", "lo", ""]
    assert json.loads(chunks[1].extra_json) == {"tool_calls": [{"index": 0, "id": "c1"}]}
    last = chunks[-1]
    assert last.finish_reason == common_pb2.FINISH_REASON_TOOL_CALLS
    assert (last.prompt_tokens, last.completion_tokens) == (5, 2)


@pytest.mark.parametrize(
    ("status", "kind", "retryable"),
    [
        (429, ErrorKind.RATE_LIMITED, True),
        (503, ErrorKind.BAD_GATEWAY, True),
        (400, ErrorKind.INVALID_REQUEST, False),
        (401, ErrorKind.BAD_GATEWAY, True),
        (404, ErrorKind.NOT_FOUND, False),
    ],
)
async def test_error_statuses_are_classified(status: int, kind: ErrorKind, retryable: bool) -> None:
    def handler(req: httpx.Request) -> httpx.Response:
        return httpx.Response(status, json={"error": {"message": "nope"}}, headers={"retry-after": "2"})

    with pytest.raises(UpstreamError) as info:
        await collect(engine_with(handler))
    assert info.value.kind is kind and info.value.retryable is retryable
    if status == 429:
        assert info.value.retry_after_seconds == 2.0


@pytest.mark.parametrize("body", [b"data: not json\n\n", b"data: [1, 2]\n\n", b'data: {"choices": 3}\n\n'])
async def test_non_json_or_wrong_shape_is_a_bad_gateway(body: bytes) -> None:
    def handler(req: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=body)

    with pytest.raises(UpstreamError) as info:
        await collect(engine_with(handler))
    assert info.value.kind is ErrorKind.BAD_GATEWAY and info.value.http_status == 502


async def test_connection_refused_is_retryable_unavailable() -> None:
    def handler(req: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused")

    with pytest.raises(UpstreamError) as info:
        await collect(engine_with(handler))
    assert info.value.kind is ErrorKind.UNAVAILABLE and info.value.retryable
