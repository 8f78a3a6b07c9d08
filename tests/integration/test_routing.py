"""Routing against a real OpenAI-compatible upstream: llama.cpp's own server, behind a fault-injecting proxy.

The inference service runs in this process (real gRPC), with a backends file
naming the embedded engine and the upstream.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest

from inference.server import inference_service
from inference.settings import InferenceSettings
from ragmesh.errors import ErrorKind, from_rpc_error
from ragmesh.v1 import common_pb2, inference_pb2, inference_pb2_grpc

from ..upstream_harness import (
    UPSTREAM_KEY,
    UPSTREAM_MODEL,
    FaultProxy,
    LlamaUpstream,
    backends_yaml,
    llama_upstream,
)
from .conftest import MODEL, serving


@pytest.fixture(scope="module")
def upstream() -> Iterator[LlamaUpstream]:
    with llama_upstream() as server:
        yield server


@pytest.fixture
def proxy(upstream: LlamaUpstream) -> Iterator[FaultProxy]:
    with FaultProxy(upstream.url) as running:
        yield running


@pytest.fixture
async def stub(
    proxy: FaultProxy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[inference_pb2_grpc.InferenceAsyncStub]:
    monkeypatch.setenv("TEST_UPSTREAM_KEY", UPSTREAM_KEY)
    backends = tmp_path / "backends.yaml"
    backends.write_text(backends_yaml(proxy.url, failures=2, reset_after=1.5))
    settings = InferenceSettings(backends_file=str(backends), n_parallel=2, n_ctx=4096, n_threads=1, n_threads_batch=1)
    async with inference_service(settings) as service, serving(service.register) as channel:
        yield inference_pb2_grpc.InferenceStub(channel)


def ask(model: str, text: str = "Say hello.", max_tokens: int = 8, **extra: object) -> inference_pb2.GenerateRequest:
    body = {"model": model, "messages": [{"role": "user", "content": text}], **extra}
    return inference_pb2.GenerateRequest(
        model=model,
        chat=inference_pb2.ChatInput(messages=[common_pb2.ChatMessage(role="user", content=text)]),
        sampling=inference_pb2.SamplingParams(max_tokens=max_tokens, temperature=0, n=1),
        openai_json=json.dumps(body),
    )


async def generate(
    stub: inference_pb2_grpc.InferenceAsyncStub, request: inference_pb2.GenerateRequest
) -> list[common_pb2.GenerationChunk]:
    return [chunk async for chunk in stub.Generate(request, timeout=60)]


async def test_discovered_upstream_model_with_a_slash_is_listed_and_served(
    stub: inference_pb2_grpc.InferenceAsyncStub, proxy: FaultProxy
) -> None:
    models = {m.id: m for m in (await stub.ListModels(common_pb2.ListModelsRequest())).models}
    assert models[UPSTREAM_MODEL].owned_by == "llama-upstream" and models[MODEL].owned_by == "embedded"
    chunks = await generate(stub, ask(UPSTREAM_MODEL, max_tokens=6))
    text = "".join(c.text for c in chunks)
    assert text and chunks[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH
    assert chunks[-1].completion_tokens == 6 and chunks[-1].prompt_tokens > 0
    assert chunks[-1].model == UPSTREAM_MODEL
    # The upstream got the server-side key (it refuses anything else) and the full request.
    sent = [r for r in proxy.faults.seen if r["path"].endswith("/chat/completions")][-1]
    assert sent["headers"]["authorization"] == f"Bearer {UPSTREAM_KEY}"


async def test_unknown_model_is_a_404_naming_it(stub: inference_pb2_grpc.InferenceAsyncStub) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await generate(stub, ask("nobody/serves-this"))
    err = from_rpc_error(info.value)
    assert err.http_status == 404 and "nobody/serves-this" in err.message


async def test_429_is_retried_then_succeeds(stub: inference_pb2_grpc.InferenceAsyncStub, proxy: FaultProxy) -> None:
    proxy.faults.fail = [(429, 0.2)]
    chunks = await generate(stub, ask(UPSTREAM_MODEL))
    assert chunks[-1].model == UPSTREAM_MODEL and not proxy.faults.fail


async def test_429_that_persists_reaches_the_client_with_retry_after(
    stub: inference_pb2_grpc.InferenceAsyncStub, proxy: FaultProxy, tmp_path: Path
) -> None:
    proxy.faults.fail = [(429, 1.0)] * 10
    request = ask(UPSTREAM_MODEL)
    started = time.monotonic()
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await generate(stub, request)
    err = from_rpc_error(info.value)
    # Not the fallback: a rate limit says "slow down", it is not an outage.
    assert err.kind is ErrorKind.RATE_LIMITED and err.http_status == 429 and err.retry_after == 1
    assert time.monotonic() - started >= 1.0  # Retry-After was honoured between attempts


async def test_upstream_errors_fall_back_to_the_embedded_model(
    stub: inference_pb2_grpc.InferenceAsyncStub, proxy: FaultProxy
) -> None:
    proxy.faults.fail = [(500, None)] * 2
    chunks = await generate(stub, ask(UPSTREAM_MODEL))
    assert chunks[-1].model == MODEL and chunks[-1].finish_reason


async def test_circuit_opens_then_half_opens(stub: inference_pb2_grpc.InferenceAsyncStub, proxy: FaultProxy) -> None:
    proxy.faults.fail = [(500, None)] * 2
    await generate(stub, ask(UPSTREAM_MODEL))  # two failures: the circuit opens; fallback answers
    calls = len(proxy.faults.seen)
    chunks = await generate(stub, ask(UPSTREAM_MODEL))
    assert chunks[-1].model == MODEL and len(proxy.faults.seen) == calls  # open: the upstream is not even tried
    await asyncio.sleep(1.6)
    chunks = await generate(stub, ask(UPSTREAM_MODEL))  # half-open: one trial, it works, the circuit closes
    assert chunks[-1].model == UPSTREAM_MODEL and len(proxy.faults.seen) == calls + 1
    chunks = await generate(stub, ask(UPSTREAM_MODEL))
    assert chunks[-1].model == UPSTREAM_MODEL


async def test_upstream_dying_mid_stream_ends_with_a_clean_error(
    stub: inference_pb2_grpc.InferenceAsyncStub, proxy: FaultProxy
) -> None:
    proxy.faults.drop_after_events = 3
    received: list[common_pb2.GenerationChunk] = []
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for chunk in stub.Generate(ask(UPSTREAM_MODEL, max_tokens=64), timeout=30):
            received.append(chunk)
    assert received, "the answer had started: no retry, no fallback"
    assert from_rpc_error(info.value).http_status in (502, 503)


async def test_garbage_from_upstream_is_a_502(stub: inference_pb2_grpc.InferenceAsyncStub, proxy: FaultProxy) -> None:
    proxy.faults.garbage = True
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await generate(stub, ask(UPSTREAM_MODEL))
    err = from_rpc_error(info.value)
    assert err.http_status == 502 and "not JSON" in err.message


async def test_full_parameter_surface_passes_through(
    stub: inference_pb2_grpc.InferenceAsyncStub, proxy: FaultProxy
) -> None:
    request = ask(UPSTREAM_MODEL, logprobs=True, top_logprobs=2, user="u-1", n=1, seed=5, custom_field={"x": 1})
    chunks = await generate(stub, request)
    sent = [r for r in proxy.faults.seen if r["path"].endswith("/chat/completions")]
    assert sent  # and llama.cpp answered logprobs, which come back as extras
    assert any("logprobs" in json.loads(c.extra_json) for c in chunks if c.extra_json)


async def test_reload_applies_a_good_file_and_refuses_a_bad_one(
    stub: inference_pb2_grpc.InferenceAsyncStub, tmp_path: Path
) -> None:
    backends = tmp_path / "backends.yaml"
    backends.write_text("backends:\n  - name: embedded\n    type: embedded\n")
    reply = await stub.ReloadBackends(inference_pb2.ReloadBackendsRequest())
    assert list(reply.models) == [MODEL]
    backends.write_text("backends:\n  - name: embedded\n    type: embedded\n    oops: true\n")
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.ReloadBackends(inference_pb2.ReloadBackendsRequest())
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "line 4" in (info.value.details() or "")
    models = [m.id for m in (await stub.ListModels(common_pb2.ListModelsRequest())).models]
    assert models == [MODEL]  # the configuration that was running stays
