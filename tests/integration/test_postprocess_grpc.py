"""The postprocess service over real gRPC: the bidi Process stream."""

from __future__ import annotations

import json

import grpc
import pytest

from ragmesh.v1 import common_pb2, postprocess_pb2, postprocess_pb2_grpc


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
