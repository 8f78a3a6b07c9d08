"""Routing pieces on their own: the circuit breaker, backoff, and the upstream stream parser."""

from __future__ import annotations

import json
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from inference.config import UpstreamBackend
from inference.router import Breaker, _backoff
from inference.upstream import UpstreamEngine, UpstreamError
from ragmesh.errors import ErrorKind
from ragmesh.v1 import common_pb2, inference_pb2


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_breaker_opens_after_failures_then_half_opens_for_one_trial() -> None:
    clock = Clock()
    breaker = Breaker(failures_to_open=2, reset_after=10, clock=clock)
    assert breaker.allows()
    breaker.failed()
    clock.now = 1
    assert breaker.allows() and breaker.state == "closed"
    breaker.failed()
    clock.now = 5
    assert not breaker.allows() and breaker.open_value() == 1  # open
    clock.now = 11
    assert breaker.allows() and breaker.state == "half-open"  # one trial
    assert breaker.started() is True
    assert not breaker.allows()  # the trial is running: nobody else
    clock.now = 12
    breaker.failed()
    clock.now = 13
    assert not breaker.allows()  # the trial failed: open again
    clock.now = 22.5
    assert breaker.allows()
    breaker.started()
    breaker.succeeded()
    assert breaker.allows() and breaker.state == "closed" and breaker.open_value() == 0


def test_a_trial_that_ends_without_a_verdict_leaves_the_next_request_to_be_the_trial() -> None:
    clock = Clock()
    breaker = Breaker(failures_to_open=1, reset_after=10, clock=clock)
    breaker.failed()
    clock.now = 10
    trial = breaker.started()
    assert trial and not breaker.allows()
    breaker.released(trial)
    assert breaker.allows() and breaker.state == "half-open"


def test_backoff_is_jittered_capped_and_honours_retry_after() -> None:
    for attempt in range(6):
        assert 0 <= _backoff(attempt, 0.2, 5.0, None) <= min(5.0, 0.2 * 2**attempt)
    assert _backoff(0, 0.2, 5.0, 3.0) >= 3.0
    assert _backoff(0, 0.2, 5.0, 60.0) == 5.0


def sse(*events: Any) -> bytes:
    return b"".join(b"data: " + (e if isinstance(e, bytes) else json.dumps(e).encode()) + b"\n\n" for e in events)


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def engine_at(base_url: str) -> UpstreamEngine:
    return UpstreamEngine(UpstreamBackend(name="u", type="openai", base_url=base_url, models=["m"]))


@pytest.fixture
async def engine_with() -> AsyncIterator[Callable[[Handler], Awaitable[UpstreamEngine]]]:
    """An engine whose upstream is a loopback HTTP server answering with `handler`."""
    servers: list[TestServer] = []
    engines: list[UpstreamEngine] = []

    async def start(handler: Handler) -> UpstreamEngine:
        app = web.Application()
        app.router.add_route("*", "/v1/{path:.*}", handler)
        server = TestServer(app, host="127.0.0.1")
        await server.start_server()
        servers.append(server)
        engines.append(engine_at(str(server.make_url("/v1"))))
        return engines[-1]

    yield start
    for engine in engines:
        await engine.aclose()
    for server in servers:
        await server.close()


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


async def test_stream_is_parsed_and_the_request_passes_through(engine_with: Any) -> None:
    seen: dict[str, Any] = {}

    async def handler(req: web.Request) -> web.Response:
        seen.update(await req.json())
        seen["path"] = req.path
        body = sse(
            {"choices": [{"index": 0, "delta": {"role": "assistant", "content": "Hel"}}]},
            {"choices": [{"index": 0, "delta": {"content": "lo", "tool_calls": [{"index": 0, "id": "c1"}]}}]},
            {"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]},
            {"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 2}},
            b"[DONE]",
        )
        return web.Response(body=body, content_type="text/event-stream")

    chunks = await collect(await engine_with(handler))
    assert seen["path"] == "/v1/chat/completions"
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
async def test_error_statuses_are_classified(status: int, kind: ErrorKind, retryable: bool, engine_with: Any) -> None:
    async def handler(req: web.Request) -> web.Response:
        return web.json_response({"error": {"message": "nope"}}, status=status, headers={"Retry-After": "2"})

    with pytest.raises(UpstreamError) as info:
        await collect(await engine_with(handler))
    assert info.value.kind is kind and info.value.retryable is retryable
    if status == 429:
        assert info.value.retry_after_seconds == 2.0


@pytest.mark.parametrize("body", [b"data: not json\n\n", b"data: [1, 2]\n\n", b'data: {"choices": 3}\n\n'])
async def test_non_json_or_wrong_shape_is_a_bad_gateway(body: bytes, engine_with: Any) -> None:
    async def handler(req: web.Request) -> web.Response:
        return web.Response(body=body)

    with pytest.raises(UpstreamError) as info:
        await collect(await engine_with(handler))
    assert info.value.kind is ErrorKind.BAD_GATEWAY and info.value.http_status == 502


async def test_connection_refused_is_retryable_unavailable() -> None:
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    engine = engine_at(f"http://127.0.0.1:{port}/v1")
    with pytest.raises(UpstreamError) as info:
        await collect(engine)
    await engine.aclose()
    assert info.value.kind is ErrorKind.UNAVAILABLE and info.value.retryable


async def test_an_event_longer_than_the_read_buffer_is_read_whole(engine_with: Any) -> None:
    text = "x" * 300_000  # one SSE line past aiohttp's default 64 KiB buffer

    async def handler(req: web.Request) -> web.Response:
        body = sse(
            {"choices": [{"index": 0, "delta": {"content": text}, "finish_reason": "stop"}]},
            {"choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 1}},
            b"[DONE]",
        )
        return web.Response(body=body, content_type="text/event-stream")

    chunks = await collect(await engine_with(handler))
    assert chunks[0].text == text and chunks[-1].finish_reason == common_pb2.FINISH_REASON_STOP
