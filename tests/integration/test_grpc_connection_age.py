"""Streams across a server's max_connection_age, on real gRPC servers and the mesh's channels.

A server closes each connection after its age (GOAWAY): new calls open another
connection, calls in flight go on for the grace, and the server closes the old
connection once its last stream ended. Each test here makes a stream span the
GOAWAY and end as the last stream of its connection, the moment the server
closes the connection. Driven by events: the stream is held at a gate until a
new call arrives on another connection (the GOAWAY came), then released.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc

from ragmesh.grpc_client import create_channel
from ragmesh.grpc_server import ServicerContext, add_health, create_server, server_options
from ragmesh.v1 import common_pb2, postprocess_pb2, postprocess_pb2_grpc

ROUNDS = 20
AGE = 0.2  # seconds: a GOAWAY every round
GRACE = 600.0  # as the mesh's default: far longer than any stream here


class Gated(postprocess_pb2_grpc.PostprocessServicer):
    """Process as postprocess answers it (a reply per chunk, the last ones big, generation_done,
    then it takes chunks until the caller half-closes or cancels), held at a gate before the end;
    Replay answers the connection (peer) it came on."""

    def __init__(self, refuse: bool = False) -> None:
        self.gate = asyncio.Event()
        self.peer = ""
        self.calls = 0
        self.refuse = refuse

    async def ProcessWhole(  # noqa: N802 - gRPC method name
        self, request: postprocess_pb2.ProcessWholeRequest, context: ServicerContext
    ) -> postprocess_pb2.ProcessResponse:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "streams only here")

    async def Process(  # noqa: N802 - gRPC method name
        self, requests: AsyncIterator[postprocess_pb2.ProcessRequest], context: ServicerContext
    ) -> AsyncIterator[postprocess_pb2.ProcessResponse]:
        self.calls += 1
        self.peer = context.peer()
        first = await anext(aiter(requests))
        if self.refuse:  # as a replica that goes away before any reply
            await context.abort(grpc.StatusCode.UNAVAILABLE, "connection refused")
        yield postprocess_pb2.ProcessResponse(chunk_json=f"start {first.start.id}")
        async for message in requests:
            if not message.chunk.finish_reason:
                yield postprocess_pb2.ProcessResponse(chunk_json=message.chunk.text)
                continue
            await self.gate.wait()
            for _ in range(4):
                yield postprocess_pb2.ProcessResponse(chunk_json="y" * 100_000)
            yield postprocess_pb2.ProcessResponse(chunk_json="done", generation_done=True)
            async for _ in requests:
                pass
            return

    async def Replay(  # noqa: N802
        self, request: postprocess_pb2.ProcessStart, context: ServicerContext
    ) -> AsyncIterator[postprocess_pb2.ProcessResponse]:
        yield postprocess_pb2.ProcessResponse(chunk_json=context.peer())


async def serve(servicer: Gated, options: tuple[tuple[str, Any], ...]) -> tuple[grpc.aio.Server, int]:
    server = create_server(options)
    postprocess_pb2_grpc.add_PostprocessServicer_to_server(servicer, server)
    await add_health(server, [])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, port


async def until_goaway(stub: postprocess_pb2_grpc.PostprocessAsyncStub, servicer: Gated) -> None:
    """Until a new call arrives on another connection than the held stream's (one GOAWAY later)."""
    while True:
        reply = await stub.Replay(postprocess_pb2.ProcessStart(), timeout=5).read()
        assert isinstance(reply, postprocess_pb2.ProcessResponse)
        if reply.chunk_json != servicer.peer:
            return


def chunk(text: str, done: bool = False) -> postprocess_pb2.ProcessRequest:
    finish = common_pb2.FINISH_REASON_STOP if done else common_pb2.FINISH_REASON_UNSPECIFIED
    return postprocess_pb2.ProcessRequest(chunk=common_pb2.GenerationChunk(text=text, finish_reason=finish))


async def test_a_stream_that_spans_a_goaway_ends_whole_as_its_connection_closes() -> None:
    servicer = Gated()
    server, port = await serve(servicer, server_options(AGE, GRACE))
    channel = create_channel(f"127.0.0.1:{port}")
    stub = postprocess_pb2_grpc.PostprocessStub(channel)
    try:
        for round_ in range(ROUNDS):
            servicer.gate.clear()
            call = stub.Process(timeout=30)
            await call.write(postprocess_pb2.ProcessRequest(start=postprocess_pb2.ProcessStart(id=str(round_))))
            await call.write(chunk("a"))
            first = [await call.read() for _ in range(2)]
            assert [r.chunk_json for r in first if isinstance(r, postprocess_pb2.ProcessResponse)] == [
                f"start {round_}",
                "a",
            ]
            await until_goaway(stub, servicer)
            # The end of the answer as preprocess sends it: the last chunk, a half-close; the
            # server answers, ends the call, and closes the connection (its last stream).
            await call.write(chunk("z", done=True))
            await call.done_writing()
            servicer.gate.set()
            replies = []
            while (reply := await call.read()) is not grpc.aio.EOF:
                assert isinstance(reply, postprocess_pb2.ProcessResponse)
                replies.append(reply)
                if reply.generation_done:
                    call.cancel()  # as preprocess does once it has the whole answer
                    break
            assert len(replies) == 5 and replies[-1].generation_done, round_
    finally:
        await channel.close()
        await server.stop(None)


async def test_a_bidi_call_refused_before_any_reply_is_retried_with_what_it_sent() -> None:
    # A replica gone before it answered: the call runs on another one, the messages written
    # so far replayed there (gRPC keeps them until the call commits).
    refusing, answering = Gated(refuse=True), Gated()
    answering.gate.set()
    servers = [await serve(s, server_options(30.0, GRACE)) for s in (refusing, answering)]
    channel = create_channel(",".join(f"127.0.0.1:{port}" for _, port in servers))
    stub = postprocess_pb2_grpc.PostprocessStub(channel)
    try:
        for round_ in range(6):
            call = stub.Process(timeout=10)
            await call.write(postprocess_pb2.ProcessRequest(start=postprocess_pb2.ProcessStart(id=str(round_))))
            await call.write(chunk("a"))
            await call.write(chunk("z", done=True))
            await call.done_writing()
            texts = [r.chunk_json[:5] async for r in call]
            assert texts == [f"start {round_}"[:5], "a", "yyyyy", "yyyyy", "yyyyy", "yyyyy", "done"]
        assert refusing.calls >= 1  # refused calls were really sent there first
    finally:
        await channel.close()
        for server, _ in servers:
            await server.stop(None)
