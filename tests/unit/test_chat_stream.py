"""The SSE tail of a chat stream: idle timeout, metrics, cleanup (a fake answer stands in for the mesh)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from typing import Any

import orjson
from prometheus_client import REGISTRY

from preprocess.metrics import RequestClock
from preprocess.serving.chat import ChatServing
from preprocess.settings import PreprocessSettings
from ragmesh.v1 import common_pb2, postprocess_pb2


class FakeAnswer:
    """Sends `chunks` content chunks, then goes silent (stall) or finishes."""

    def __init__(self, chunks: int, stall: bool) -> None:
        self.chunks = chunks
        self.stall = stall
        self.closed = False
        self.usage: common_pb2.Usage | None = common_pb2.Usage(prompt_tokens=7, completion_tokens=chunks)

    async def responses(self) -> AsyncGenerator[postprocess_pb2.ProcessResponse, None]:
        try:
            for i in range(self.chunks):
                yield postprocess_pb2.ProcessResponse(
                    chunk_json=orjson.dumps({"choices": [{"index": 0, "n": i}]}).decode()
                )
            if self.stall:
                await asyncio.sleep(3600)
        finally:
            self.closed = True

    async def collect(self) -> str:
        return ""


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def drain(chat: ChatServing, answer: Any, model: str) -> list[bytes]:
    return [event async for event in chat.events(answer, RequestClock(model, "chat", True))]


async def test_a_silent_stream_ends_with_an_error_event_and_is_cancelled() -> None:
    chat = ChatServing(None, PreprocessSettings(stream_idle_timeout=0.2))  # type: ignore[arg-type]
    answer = FakeAnswer(chunks=2, stall=True)
    before = sample("ragmesh:requests_total", model="m-idle", endpoint="chat", stream="true", status="deadline")
    events = await asyncio.wait_for(drain(chat, answer, "m-idle"), 10)
    assert len(events) == 3 and events[-1].endswith(b"data: [DONE]\n\n")
    error = orjson.loads(events[-1].split(b"\n\n")[0].removeprefix(b"data: "))["error"]
    assert error["code"] == "stream_idle_timeout" and "0.2 seconds" in error["message"]
    assert answer.closed, "the stalled generation was closed (its gRPC calls cancelled)"
    after = sample("ragmesh:requests_total", model="m-idle", endpoint="chat", stream="true", status="deadline")
    assert after == before + 1


async def test_a_flowing_stream_is_not_cut_and_counts_its_tokens() -> None:
    chat = ChatServing(None, PreprocessSettings(stream_idle_timeout=0.2))  # type: ignore[arg-type]
    before = sample("ragmesh:generation_tokens_total", model="m-flow")
    events = await drain(chat, FakeAnswer(chunks=5, stall=False), "m-flow")
    assert events[-1] == b"data: [DONE]\n\n" and len(events) == 6
    assert sample("ragmesh:generation_tokens_total", model="m-flow") == before + 5
    assert sample("ragmesh:time_to_first_token_seconds_count", model="m-flow") >= 1


def test_refused_requests_do_not_grow_the_model_label_set() -> None:
    RequestClock("client-invented-model-name", "chat", False).finished("not_found")
    assert (
        sample(
            "ragmesh:requests_total",
            model="client-invented-model-name",
            endpoint="chat",
            stream="false",
            status="not_found",
        )
        == 0
    )
    assert sample("ragmesh:requests_total", model="(refused)", endpoint="chat", stream="false", status="not_found") >= 1
