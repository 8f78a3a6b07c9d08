"""Non-streamed requests, answered whole: the upstream asked without streaming, one chunk per choice,
and one unary ProcessWhole call to postprocess with the same checks and output as Process."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from inference.config import parse_backends
from inference.router import Router
from postprocess.servicer import PostprocessServicer
from postprocess.session import GuardConfig, ProcessSession
from preprocess.clients import MeshClients
from preprocess.pipeline import GenerationPipeline
from ragmesh.errors import ErrorKind, RagmeshError
from ragmesh.v1 import common_pb2, inference_pb2, postprocess_pb2

# ProcessWhole reads nothing from its context.
NO_CONTEXT: Any = None

# --- inference: a whole request asks the upstream for the whole answer ------------------------


@pytest.fixture
async def upstream() -> AsyncIterator[tuple[str, list[Any]]]:
    """A loopback upstream answering as asked: SSE for a stream, one JSON body otherwise."""
    bodies: list[Any] = []

    async def answer(request: web.Request) -> web.StreamResponse:
        body = json.loads(await request.read())
        bodies.append(body)
        usage = {"prompt_tokens": 7, "completion_tokens": 2, "total_tokens": 9}
        if not body.get("stream") and body.get("model") != "always-streams":
            message = {"role": "assistant", "content": "Hi there", "refusal": None}
            return web.json_response(
                {"choices": [{"index": 0, "message": message, "finish_reason": "stop"}], "usage": usage}
            )
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for event in (
            {"choices": [{"index": 0, "delta": {"role": "assistant", "content": "Hi"}, "finish_reason": None}]},
            {"choices": [{"index": 0, "delta": {"content": " there"}, "finish_reason": "stop"}]},
            {"choices": [], "usage": usage},
        ):
            await response.write(b"data: " + json.dumps(event).encode() + b"\n\n")
        await response.write(b"data: [DONE]\n\n")
        return response

    app = web.Application()
    app.router.add_post("/v1/chat/completions", answer)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        yield f"http://127.0.0.1:{server.port}/v1", bodies
    finally:
        await server.close()


def _generate(whole: bool) -> inference_pb2.GenerateRequest:
    request = inference_pb2.GenerateRequest(
        model="m",
        chat=inference_pb2.ChatInput(messages=[common_pb2.ChatMessage(role="user", content="hi")]),
        sampling=inference_pb2.SamplingParams(n=1, max_tokens=4),
        openai_json='{"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "stop": ["x"]}',
        whole=whole,
    )
    return request


async def test_a_whole_request_asks_the_upstream_for_the_whole_answer_and_sends_one_chunk(
    upstream: tuple[str, list[Any]],
) -> None:
    base, bodies = upstream
    router = Router(None)
    backends = f"backends:\n  - name: up\n    type: openai\n    base_url: {base}\n    models: [m]\n"
    await router.load(parse_backends(backends))
    try:
        whole = [chunk async for chunk in router.generate(_generate(whole=True))]
        streamed = [chunk async for chunk in router.generate(_generate(whole=False))]
    finally:
        await router.aclose()
    asked_whole, asked_stream = bodies
    assert "stream" not in asked_whole and "stream_options" not in asked_whole
    assert asked_whole["stop"] == ["x"] and asked_whole["max_tokens"] == 4  # the client's parameters, as before
    assert asked_stream["stream"] is True and asked_stream["stream_options"] == {"include_usage": True}
    assert len(whole) == 1
    (chunk,) = whole
    assert chunk.text == "Hi there" and chunk.finish_reason == common_pb2.FINISH_REASON_STOP
    assert (chunk.prompt_tokens, chunk.completion_tokens) == (7, 2)
    # What the stream's chunks add up to.
    assert "".join(c.text for c in streamed) == chunk.text
    assert streamed[-1].finish_reason == chunk.finish_reason
    assert (streamed[-1].prompt_tokens, streamed[-1].completion_tokens) == (7, 2)


async def test_an_upstream_that_streams_a_whole_request_anyway_is_read_as_a_stream(
    upstream: tuple[str, list[Any]],
) -> None:
    base, bodies = upstream
    router = Router(None)
    backends = f"backends:\n  - name: up\n    type: openai\n    base_url: {base}\n    models: [always-streams]\n"
    await router.load(parse_backends(backends))
    request = _generate(whole=True)
    request.model = "always-streams"
    try:
        chunks = [chunk async for chunk in router.generate(request)]
    finally:
        await router.aclose()
    assert "stream" not in bodies[-1]
    assert "".join(c.text for c in chunks) == "Hi there" and chunks[-1].completion_tokens == 2


# --- postprocess: ProcessWhole is Process fed the same chunks -----------------------------------


def _start(**fields: Any) -> postprocess_pb2.ProcessStart:
    return postprocess_pb2.ProcessStart(id="chatcmpl-w", model="m", created=1, n=1, **fields)


def _chunk(text: str, finish: bool = True) -> common_pb2.GenerationChunk:
    return common_pb2.GenerationChunk(
        text=text,
        prompt_tokens=5,
        completion_tokens=3,
        finish_reason=common_pb2.FINISH_REASON_LENGTH if finish else common_pb2.FINISH_REASON_UNSPECIFIED,
    )


def _through_session(start: postprocess_pb2.ProcessStart, chunks: list[common_pb2.GenerationChunk]) -> str:
    session = ProcessSession(start, GuardConfig())
    out: list[postprocess_pb2.ProcessResponse] = []
    for chunk in chunks:
        out = session.feed(chunk)
        if session.done:
            break
    return out[-1].response_json


@pytest.mark.parametrize(
    ("start", "text"),
    [
        (_start(), "plain answer"),
        (_start(stop=["STOP"]), "before STOP after"),  # the stop sequence is cut, finish_reason stop
        (_start(), "mail me at jane.doe@example.com"),  # the guardrails redact
    ],
)
async def test_process_whole_answers_as_process_does(start: postprocess_pb2.ProcessStart, text: str) -> None:
    servicer = PostprocessServicer(GuardConfig(), None)
    request = postprocess_pb2.ProcessWholeRequest(start=start, chunks=[_chunk(text)])
    response = await servicer.ProcessWhole(request, None)  # type: ignore[arg-type]
    assert response.generation_done and response.usage.total_tokens == 8
    assert response.response_json == _through_session(start, [_chunk(text)])
    body = json.loads(response.response_json)
    assert "STOP" not in body["choices"][0]["message"]["content"]
    assert "jane.doe@example.com" not in body["choices"][0]["message"]["content"]


async def test_process_whole_refuses_a_stream_and_an_unfinished_generation() -> None:
    servicer = PostprocessServicer(GuardConfig(), None)
    with pytest.raises(RagmeshError) as stream:
        await servicer.ProcessWhole(
            postprocess_pb2.ProcessWholeRequest(start=_start(stream=True), chunks=[_chunk("x")]), NO_CONTEXT
        )
    assert stream.value.kind is ErrorKind.INVALID_REQUEST
    with pytest.raises(RagmeshError) as unfinished:
        await servicer.ProcessWhole(
            postprocess_pb2.ProcessWholeRequest(start=_start(), chunks=[_chunk("x", finish=False)]), NO_CONTEXT
        )
    assert unfinished.value.kind is ErrorKind.INTERNAL


# --- preprocess: the pipeline picks the unary call when the first chunk is the whole answer ----


class FakeGenerate:
    """A Generate call that gives the listed chunks, then EOF."""

    def __init__(self, chunks: list[common_pb2.GenerationChunk]) -> None:
        self._chunks = list(chunks)
        self.cancelled = False

    async def read(self) -> object:
        return self._chunks.pop(0) if self._chunks else grpc.aio.EOF

    def cancel(self) -> bool:
        self.cancelled = True
        return True


class FakeProcess:
    """A Process call backed by a real ProcessSession, recording what it was sent."""

    def __init__(self) -> None:
        self.sent: list[postprocess_pb2.ProcessRequest] = []
        self._session: ProcessSession | None = None
        self._out: asyncio.Queue[object] = asyncio.Queue()

    async def write(self, request: postprocess_pb2.ProcessRequest) -> None:
        self.sent.append(request)
        if request.WhichOneof("msg") == "start":
            self._session = ProcessSession(request.start, GuardConfig())
        else:
            assert self._session is not None
            for response in self._session.feed(request.chunk):
                self._out.put_nowait(response)

    async def done_writing(self) -> None:
        self._out.put_nowait(grpc.aio.EOF)

    async def read(self) -> object:
        return await self._out.get()

    def cancel(self) -> bool:
        return True


class FakeInference:
    def __init__(self, chunks: list[common_pb2.GenerationChunk]) -> None:
        self.call = FakeGenerate(chunks)

    def Generate(self, request: Any, **kw: Any) -> FakeGenerate:  # noqa: N802 - the stub's name
        return self.call


class FakePostprocess:
    def __init__(self) -> None:
        self.process_calls: list[FakeProcess] = []
        self.whole_requests: list[postprocess_pb2.ProcessWholeRequest] = []

    def Process(self, **kw: Any) -> FakeProcess:  # noqa: N802
        call = FakeProcess()
        self.process_calls.append(call)
        return call

    async def ProcessWhole(  # noqa: N802
        self, request: postprocess_pb2.ProcessWholeRequest, **kw: Any
    ) -> postprocess_pb2.ProcessResponse:
        self.whole_requests.append(request)
        return await PostprocessServicer(GuardConfig(), None).ProcessWhole(request, None)  # type: ignore[arg-type]


def _pipeline(
    chunks: list[common_pb2.GenerationChunk], stream: bool = False, n: int = 1
) -> tuple[GenerationPipeline, FakeInference, FakePostprocess]:
    inference, postprocess = FakeInference(chunks), FakePostprocess()
    clients = MeshClients(inference=inference, postprocess=postprocess, retrieval=None, channels={})  # type: ignore[arg-type]
    start = postprocess_pb2.ProcessStart(id="chatcmpl-p", model="m", created=1, stream=stream, n=n)
    pipeline = GenerationPipeline(clients, inference_pb2.GenerateRequest(model="m"), start, timeout=10)
    return pipeline, inference, postprocess


async def test_a_whole_first_chunk_goes_to_postprocess_in_one_unary_call() -> None:
    p, inference, postprocess = _pipeline([_chunk("all of it")])
    await p.open()
    body = json.loads(await p.collect())
    assert body["choices"][0]["message"]["content"] == "all of it"
    assert [r.chunks[0].text for r in postprocess.whole_requests] == ["all of it"]
    assert not postprocess.process_calls, "no bidi stream for a whole answer"
    assert p.usage is not None and p.usage.completion_tokens == 3
    assert inference.call.cancelled, "the generation call is released"


async def test_a_generation_in_pieces_still_streams_through_process() -> None:
    p, _, postprocess = _pipeline([_chunk("Hello", finish=False), _chunk(" world")])
    await p.open()
    assert not postprocess.process_calls, "a non-streamed request opens Process once its first chunk is in"
    body = json.loads(await p.collect())
    assert body["choices"][0]["message"]["content"] == "Hello world"
    assert not postprocess.whole_requests
    (call,) = postprocess.process_calls
    assert [r.WhichOneof("msg") for r in call.sent] == ["start", "chunk", "chunk"]


@pytest.mark.parametrize(("stream", "n"), [(True, 1), (False, 2)])
async def test_streams_and_several_choices_keep_the_bidi_process(stream: bool, n: int) -> None:
    p, _, postprocess = _pipeline([_chunk("x")], stream=stream, n=n)
    await p.open()
    assert not p._whole()
    assert len(postprocess.process_calls) == (1 if stream else 0)  # a stream's start goes at once
