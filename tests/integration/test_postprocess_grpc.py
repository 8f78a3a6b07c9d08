"""The postprocess service over real gRPC: the bidi Process stream."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from postprocess.server import postprocess_service
from postprocess.settings import PostprocessSettings
from ragmesh.v1 import common_pb2, postprocess_pb2, postprocess_pb2_grpc

from ..conftest import unique_namespace
from .conftest import serving


def start_msg(**kw: object) -> postprocess_pb2.ProcessRequest:
    return postprocess_pb2.ProcessRequest(
        start=postprocess_pb2.ProcessStart(id="chatcmpl-t", model="m", created=1, n=1, **kw)  # type: ignore[arg-type]
    )


def chunk_msg(
    text: str, tokens: int, finish: common_pb2.FinishReason.ValueType = common_pb2.FINISH_REASON_UNSPECIFIED
) -> postprocess_pb2.ProcessRequest:
    return postprocess_pb2.ProcessRequest(
        chunk=common_pb2.GenerationChunk(text=text, completion_tokens=tokens, prompt_tokens=3, finish_reason=finish)
    )


async def test_stop_split_across_chunks_over_grpc(postprocess_channel: grpc.aio.Channel) -> None:
    stub = postprocess_pb2_grpc.PostprocessStub(postprocess_channel)
    call = stub.Process(timeout=10)
    await call.write(start_msg(stream=True, stop=["###"], include_usage=True))
    for i, piece in enumerate(["Hi", " there#", "#", "# never"]):
        await call.write(chunk_msg(piece, i + 1))
    replies = []
    async for reply in call:
        replies.append(reply)
        if reply.generation_done:
            break
    await call.done_writing()
    bodies = [json.loads(r.chunk_json) for r in replies if r.chunk_json]
    text = "".join(b["choices"][0]["delta"].get("content", "") for b in bodies if b["choices"])
    assert text == "Hi there"
    assert bodies[-2]["choices"][0]["finish_reason"] == "stop"
    # The stop completed in the 4th chunk: its tokens were generated, so they count.
    assert bodies[-1]["usage"]["completion_tokens"] == 4


async def test_first_message_must_be_start(postprocess_channel: grpc.aio.Channel) -> None:
    stub = postprocess_pb2_grpc.PostprocessStub(postprocess_channel)
    call = stub.Process(timeout=10)
    await call.write(chunk_msg("x", 1))
    await call.done_writing()
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call.read()
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_generation_that_ends_unfinished_is_an_error(postprocess_channel: grpc.aio.Channel) -> None:
    stub = postprocess_pb2_grpc.PostprocessStub(postprocess_channel)
    call = stub.Process(timeout=10)
    await call.write(start_msg(stream=False))
    await call.write(chunk_msg("partial", 1))
    await call.done_writing()
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for _ in call:
            pass
    assert info.value.code() == grpc.StatusCode.INTERNAL


@pytest.fixture
async def guarded_postprocess(redis_url: str) -> AsyncIterator[postprocess_pb2_grpc.PostprocessAsyncStub]:
    """The postprocess service as `python -m postprocess` wires it: guardrails on, cache in Redis."""
    settings = PostprocessSettings(redis_url=redis_url, namespace=unique_namespace(), blocklist=["launch codes"])
    async with postprocess_service(settings) as service, serving(service.register) as channel:
        yield postprocess_pb2_grpc.PostprocessStub(channel)


async def run(
    stub: postprocess_pb2_grpc.PostprocessAsyncStub, start: postprocess_pb2.ProcessRequest, pieces: list[str]
) -> dict[str, Any]:
    call = stub.Process(timeout=10)
    await call.write(start)
    for i, piece in enumerate(pieces):
        last = i == len(pieces) - 1
        finish = common_pb2.FINISH_REASON_STOP if last else common_pb2.FINISH_REASON_UNSPECIFIED
        await call.write(chunk_msg(piece, i + 1, finish))
    async for reply in call:
        if reply.generation_done:
            call.cancel()
            return dict(json.loads(reply.response_json))
    raise AssertionError("no final response")


async def test_guardrails_over_grpc_redact_split_pii_and_stop_on_blocklist(
    guarded_postprocess: postprocess_pb2_grpc.PostprocessAsyncStub,
) -> None:
    body = await run(
        guarded_postprocess, start_msg(stream=False), ["Mail ann@", "example.org or call 555-", "867-5309."]
    )
    assert body["choices"][0]["message"]["content"] == "Mail [email redacted] or call [phone redacted]."
    # A card followed by more digit groups (the greedy card match fails Luhn): the card still goes.
    body = await run(guarded_postprocess, start_msg(stream=False), ["card 4111 1111 1111 1111 5", "55 123 4567."])
    assert body["choices"][0]["message"]["content"] == "card [card number redacted] 555 [phone redacted]."
    body = await run(guarded_postprocess, start_msg(stream=False), ["The launch", " codes are 0000"])
    assert body["choices"][0]["finish_reason"] == "content_filter"
    assert "codes" not in body["choices"][0]["message"]["content"]


async def test_response_cache_store_and_replay_over_grpc(
    guarded_postprocess: postprocess_pb2_grpc.PostprocessAsyncStub,
) -> None:
    start = start_msg(stream=False, cache_key="key-1")
    with pytest.raises(grpc.aio.AioRpcError) as miss:
        async for _ in guarded_postprocess.Replay(start.start):
            pass
    assert miss.value.code() == grpc.StatusCode.NOT_FOUND
    first = await run(guarded_postprocess, start, ["Cached ", "answer."])
    assert first["cached"] is False
    replies = [r async for r in guarded_postprocess.Replay(start_msg(stream=False, cache_key="key-1").start)]
    replayed = json.loads(replies[-1].response_json)
    assert (
        replayed["cached"] is True and replayed["choices"] == first["choices"] and replayed["usage"] == first["usage"]
    )


async def test_a_digits_only_answer_streams_digit_by_digit_under_the_guardrails(
    postprocess_channel: grpc.aio.Channel,
) -> None:
    # PII guardrails on (the default): a run of digits is held only while it could still be a
    # card, a phone number or an email's local part (64 characters), not until the answer ends.
    stub = postprocess_pb2_grpc.PostprocessStub(postprocess_channel)
    digits = "31415926535897932384" * 10
    call = stub.Process(timeout=30)
    await call.write(start_msg(stream=True))
    for i, digit in enumerate(digits):
        last = common_pb2.FINISH_REASON_STOP if i == len(digits) - 1 else common_pb2.FINISH_REASON_UNSPECIFIED
        await call.write(chunk_msg(digit, i + 1, last))
    deltas = []
    async for reply in call:
        if reply.chunk_json:
            body = json.loads(reply.chunk_json)
            content = body["choices"][0]["delta"].get("content") if body["choices"] else None
            if content:
                deltas.append(content)
        if reply.generation_done:
            break
    await call.done_writing()
    assert "".join(deltas) == digits
    assert len(deltas) == len(digits) - 64 and all(len(d) == 1 for d in deltas[1:]), deltas[:3]
