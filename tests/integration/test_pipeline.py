"""preprocess's pipeline against the real inference and postprocess gRPC servers."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time

import grpc
import pytest

from inference.engine import LlamaCppEngine
from preprocess.clients import MeshClients
from preprocess.pipeline import GenerationPipeline
from ragmesh.errors import RagmeshError
from ragmesh.v1 import (
    common_pb2,
    inference_pb2,
    inference_pb2_grpc,
    postprocess_pb2,
    postprocess_pb2_grpc,
    retrieval_pb2_grpc,
)

from .conftest import MODEL


@pytest.fixture
def clients(inference_channel: grpc.aio.Channel, postprocess_channel: grpc.aio.Channel) -> MeshClients:
    return MeshClients(
        inference=inference_pb2_grpc.InferenceStub(inference_channel),
        postprocess=postprocess_pb2_grpc.PostprocessStub(postprocess_channel),
        retrieval=retrieval_pb2_grpc.RetrievalStub(inference_channel),  # unused here
        channels={},
    )


def pipeline(
    clients: MeshClients, text: str, *, stream: bool, stop: list[str] | None = None, **sampling: float
) -> GenerationPipeline:
    generate = inference_pb2.GenerateRequest(
        model=MODEL,
        chat=inference_pb2.ChatInput(messages=[common_pb2.ChatMessage(role="user", content=text)]),
        sampling=inference_pb2.SamplingParams(n=1, **sampling),  # type: ignore[arg-type]
    )
    start = postprocess_pb2.ProcessStart(id="chatcmpl-p", model=MODEL, created=1, stream=stream, n=1, stop=stop or [])
    return GenerationPipeline(clients, generate, start, timeout=60)


async def test_non_stream_answer_with_usage(clients: MeshClients) -> None:
    p = pipeline(clients, "Say hello.", stream=False, max_tokens=5, temperature=0)
    await p.open()
    body = json.loads(await p.collect())
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 5
    assert body["usage"]["prompt_tokens"] > 0


async def until_idle(engine: LlamaCppEngine) -> None:
    """Wait until the engine holds no request. The deadline only bounds a hang (a slot never freed):
    on 2 busy cores how soon a cancelled choice leaves its slot is not this test's business."""
    deadline = time.monotonic() + 60
    while engine.active_requests and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    assert engine.active_requests == 0, "the engine's slot was never freed"


async def test_stop_sequence_cancels_generation_and_frees_the_slot(
    clients: MeshClients, engine: LlamaCppEngine
) -> None:
    # Greedy decoding of this prompt yields several spaces within 400 tokens; the
    # first space ends the answer long before max_tokens.
    p = pipeline(clients, "Write a long story about a fox.", stream=False, stop=[" "], max_tokens=400, temperature=0)
    await p.open()
    body = json.loads(await p.collect())
    assert body["choices"][0]["finish_reason"] == "stop"
    assert " " not in body["choices"][0]["message"]["content"]
    assert body["usage"]["completion_tokens"] < 400
    await until_idle(engine)


async def test_engine_error_surfaces_at_open(clients: MeshClients) -> None:
    p = pipeline(clients, "word " * 3000, stream=True)
    with pytest.raises(RagmeshError) as info:
        await p.open()
    assert info.value.http_status == 400


async def test_closing_a_stream_midway_frees_the_slot(clients: MeshClients, engine: LlamaCppEngine) -> None:
    p = pipeline(clients, "Write a long story about a fox.", stream=True, max_tokens=1500, temperature=0)
    await p.open()
    responses = p.responses()
    for _ in range(4):
        await anext(responses)
    await responses.aclose()  # what Starlette does when the client disconnects
    await until_idle(engine)


class BrokenGeneration:
    """A generation stream whose next read fails with something other than a gRPC error (a bug)."""

    def __init__(self, call: object) -> None:
        self._call = call

    async def read(self) -> object:
        raise RuntimeError("injected: reading the generation failed")

    def cancel(self) -> bool:
        return bool(self._call.cancel())  # type: ignore[attr-defined]


async def test_a_failure_forwarding_the_generation_ends_the_answer_at_once(
    clients: MeshClients, engine: LlamaCppEngine
) -> None:
    """Not a wait for the request's deadline: the error reaches the caller as soon as it happens."""
    p = pipeline(clients, "Write a long story about a fox.", stream=False, max_tokens=200, temperature=0)
    await p.open()
    p._gen = BrokenGeneration(p._gen)  # type: ignore[assignment]
    with pytest.raises(RagmeshError) as info:
        await asyncio.wait_for(p.collect(), timeout=20)  # the pipeline's own deadline is 60 s
    assert info.value.http_status == 500 and "forwarding" in info.value.message
    await until_idle(engine)  # the generation was cancelled


class EndedProcess:
    """A Process call the postprocess server has already ended (e.g. its replica stopped past the
    drain grace): grpc.aio refuses further writes with InvalidStateError, and reading gives the
    call's status, UNAVAILABLE."""

    def __init__(self, call: object) -> None:
        self._call = call
        self._refused = asyncio.Event()

    async def write(self, request: object) -> None:
        self._refused.set()
        raise asyncio.InvalidStateError("RPC already finished.")

    async def done_writing(self) -> None:
        raise asyncio.InvalidStateError("RPC already finished.")

    async def read(self) -> object:
        await self._refused.wait()  # the reader learns the status once the writer met the ended call
        raise grpc.aio.AioRpcError(
            grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(), details="injected: server went away"
        )

    def cancel(self) -> bool:
        return bool(self._call.cancel())  # type: ignore[attr-defined]


async def test_a_postprocess_call_the_server_ended_is_a_503_not_a_500(
    clients: MeshClients, engine: LlamaCppEngine
) -> None:
    p = pipeline(clients, "Write a long story about a fox.", stream=False, max_tokens=200, temperature=0)
    await p.open()
    # A non-streamed request opens its Process call once the first chunk is in: the ended call is
    # the one the stub gives then.
    real = clients.postprocess

    class EndedStub:
        def Process(self, **kw: object) -> EndedProcess:  # noqa: N802 - the stub's method
            return EndedProcess(real.Process(**kw))  # type: ignore[arg-type]

    p._clients = dataclasses.replace(clients, postprocess=EndedStub())  # type: ignore[arg-type]
    with pytest.raises(RagmeshError) as info:
        await asyncio.wait_for(p.collect(), timeout=20)
    assert info.value.http_status == 503, info.value.message
    deadline = time.monotonic() + 5.0  # bounds a broken cancel; the assertion is on the engine's state
    while engine.active_requests and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    assert engine.active_requests == 0, "the generation was cancelled"
