"""The circuit breaker matrix: the router and a real HTTP upstream (an OpenAI-compatible endpoint
on loopback whose answers the test decides), time moved by hand.

- a 4xx storm leaves the circuit closed (the client is wrong, not the backend);
- a 5xx storm opens it; after reset_after one trial closes it again;
- a trial cancelled midway (client gone) gives the trial back: the next good call closes it;
- ten long streams against `max_concurrency: 2`: the queued calls wait for a slot, or get a 503
  with Retry-After once `queue_timeout` passed; no circuit opens;
- the circuit-open gauge follows every transition;
- a backends file that cannot be loaded is a 400 naming the problem, and a log line on SIGHUP.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from prometheus_client import REGISTRY

from inference.config import parse_backends
from inference.router import Router
from inference.server import inference_service
from inference.settings import InferenceSettings
from inference.upstream import UpstreamError
from ragmesh.errors import ErrorKind, RagmeshError
from ragmesh.v1 import common_pb2, inference_pb2, inference_pb2_grpc

from .conftest import serving


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Upstream:
    """Answers `status` (an error body) or a two-part stream that waits for `hold` in between."""

    def __init__(self) -> None:
        self.status = 200
        self.hold: asyncio.Event | None = None
        self.requests = 0
        self.streaming = 0

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.requests += 1
        if self.status != 200:
            return web.json_response({"error": {"message": f"injected {self.status}"}}, status=self.status)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        self.streaming += 1
        try:
            await response.write(_sse({"choices": [{"index": 0, "delta": {"content": "Hel"}}]}))
            if self.hold is not None:
                await self.hold.wait()
            await response.write(_sse({"choices": [{"index": 0, "delta": {"content": "lo"}, "finish_reason": "stop"}]}))
            await response.write(_sse({"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2}}))
            await response.write(b"data: [DONE]\n\n")
        finally:
            self.streaming -= 1
        return response


def _sse(event: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(event).encode() + b"\n\n"


@pytest.fixture
async def upstream() -> AsyncIterator[tuple[Upstream, str]]:
    fake = Upstream()
    app = web.Application()
    app.router.add_post("/v1/chat/completions", fake.handle)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    yield fake, str(server.make_url("/v1"))
    await server.close()


async def router_for(base_url: str, clock: Clock, *, max_concurrency: int = 8, queue_timeout: float = 30) -> Router:
    config = parse_backends(
        "backends:\n"
        "  - name: up\n"
        "    type: openai\n"
        f"    base_url: {base_url}\n"
        "    models: [m]\n"
        f"    max_concurrency: {max_concurrency}\n"
        f"    queue_timeout: {queue_timeout}\n"
        "    connect_timeout: 0.5\n"
        "retry: {attempts: 1}\n"
        "circuit_breaker: {failures: 3, reset_after: 10}\n"
    )
    router = Router(None, clock=clock)
    await router.load(config)
    return router


def ask() -> inference_pb2.GenerateRequest:
    return inference_pb2.GenerateRequest(
        model="m", chat=inference_pb2.ChatInput(messages=[common_pb2.ChatMessage(role="user", content="hi")])
    )


async def answer(router: Router) -> str:
    return "".join([chunk.text async for chunk in router.generate(ask())])


def gauge() -> float | None:
    return REGISTRY.get_sample_value("ragmesh_inference_circuit_open", {"backend": "up"})


async def test_a_storm_of_client_errors_leaves_the_circuit_closed(upstream: tuple[Upstream, str]) -> None:
    fake, url = upstream
    router = await router_for(url, Clock())
    try:
        fake.status = 400
        for _ in range(10):
            with pytest.raises(UpstreamError) as info:
                await answer(router)
            assert info.value.http_status == 400
        assert fake.requests == 10, "every call reached the upstream: nothing was shut out"
        assert router.registry.breakers["up"].state == "closed" and gauge() == 0
        fake.status = 404
        with pytest.raises(UpstreamError):
            await answer(router)
        fake.status = 200
        assert await answer(router) == "Hello"
    finally:
        await router.aclose()


async def test_a_storm_of_server_errors_opens_the_circuit_then_one_trial_closes_it(
    upstream: tuple[Upstream, str],
) -> None:
    fake, url = upstream
    clock = Clock()
    router = await router_for(url, clock)
    try:
        assert gauge() == 0
        fake.status = 500
        for _ in range(3):
            with pytest.raises(UpstreamError):
                await answer(router)
        assert router.registry.breakers["up"].state == "open" and gauge() == 1
        with pytest.raises(RagmeshError) as shut:
            await answer(router)
        assert shut.value.http_status == 503 and fake.requests == 3, "open: the upstream is not even called"
        clock.now += 10
        assert router.registry.breakers["up"].state == "half-open" and gauge() == 1
        fake.status = 200
        assert await answer(router) == "Hello"  # the trial
        assert router.registry.breakers["up"].state == "closed" and gauge() == 0
    finally:
        await router.aclose()


async def test_a_cancelled_trial_lets_the_next_good_call_close_the_circuit(upstream: tuple[Upstream, str]) -> None:
    fake, url = upstream
    clock = Clock()
    router = await router_for(url, clock)
    try:
        fake.status = 500
        for _ in range(3):
            with pytest.raises(UpstreamError):
                await answer(router)
        clock.now += 10
        fake.status, fake.hold = 200, asyncio.Event()
        trial = router.generate(ask())
        first = await anext(trial)
        assert first.text == "Hel"
        await trial.aclose()  # the client went away (or a stop sequence was hit) mid-trial
        assert gauge() == 1
        fake.hold = None
        assert await answer(router) == "Hello"
        assert router.registry.breakers["up"].state == "closed" and gauge() == 0
    finally:
        await router.aclose()


async def test_calls_beyond_max_concurrency_are_refused_as_overload_not_counted_as_failures(
    upstream: tuple[Upstream, str],
) -> None:
    fake, url = upstream
    router = await router_for(url, Clock(), max_concurrency=2, queue_timeout=0.2)
    fake.hold = asyncio.Event()
    try:
        calls = [asyncio.ensure_future(answer(router)) for _ in range(10)]
        while sum(c.done() for c in calls) < 8:  # the two holding a slot cannot end before the hold is released
            await asyncio.sleep(0.01)
        assert fake.streaming == 2
        # Refused while the two streams still run: nothing counted, no circuit opened meanwhile
        # (the two good answers at the end would hide it).
        breaker = router.registry.breakers["up"]
        assert (breaker.state, breaker.failures, gauge()) == ("closed", 0, 0)
        fake.hold.set()
        await asyncio.wait(calls)
        errors = [c.exception() for c in calls if c.exception() is not None]
        assert len(errors) == 8 and [c.result() for c in calls if c.exception() is None] == ["Hello", "Hello"]
        for err in errors:
            assert isinstance(err, RagmeshError)
            assert (err.http_status, err.code, err.retry_after) == (503, "overloaded", 1)
        breaker = router.registry.breakers["up"]
        assert breaker.state == "closed" and breaker.failures == 0 and gauge() == 0
        assert fake.requests == 2, "the refused calls never reached the upstream"
    finally:
        await router.aclose()


async def test_calls_beyond_max_concurrency_wait_for_a_slot(upstream: tuple[Upstream, str]) -> None:
    fake, url = upstream
    router = await router_for(url, Clock(), max_concurrency=2)
    fake.hold = asyncio.Event()
    try:
        calls = [asyncio.ensure_future(answer(router)) for _ in range(10)]
        while fake.streaming < 2:
            await asyncio.sleep(0.01)
        assert fake.requests == 2, "two in flight, eight waiting for a slot"
        fake.hold.set()
        assert await asyncio.gather(*calls) == ["Hello"] * 10
        assert router.registry.breakers["up"].failures == 0
    finally:
        await router.aclose()


async def test_a_backends_file_that_cannot_load_is_a_400_and_a_log_line_on_sighup(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    good = "backends:\n  - {name: up, type: openai, base_url: 'http://127.0.0.1:9/v1', models: [m]}\n"
    backends = tmp_path / "backends.yaml"
    backends.write_text(good)
    monkeypatch.delenv("NO_SUCH_KEY_VARIABLE", raising=False)
    settings = InferenceSettings(backends_file=str(backends))
    async with inference_service(settings) as service, serving(service.register) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        backends.write_text(good.replace("models: [m]", "models: [m], api_key_env: NO_SUCH_KEY_VARIABLE"))
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.ReloadBackends(inference_pb2.ReloadBackendsRequest())
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "NO_SUCH_KEY_VARIABLE" in (info.value.details() or "")
        models = await stub.ListModels(common_pb2.ListModelsRequest())
        assert [m.id for m in models.models] == ["m"], "the running configuration stays"

        caplog.clear()
        with caplog.at_level(logging.ERROR, logger="inference.server"):
            os.kill(os.getpid(), signal.SIGHUP)
            for _ in range(200):
                if any("NO_SUCH_KEY_VARIABLE" in str(getattr(r, "error", "")) for r in caplog.records):
                    break
                await asyncio.sleep(0.02)
        refused = [r for r in caplog.records if "NO_SUCH_KEY_VARIABLE" in str(getattr(r, "error", ""))]
        assert refused and refused[0].levelno == logging.ERROR
    assert ErrorKind.INVALID_REQUEST.value == "invalid_request"
