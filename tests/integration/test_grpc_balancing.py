"""The mesh's gRPC channels over real servers: balanced, health-checked, retried only when safe."""

from __future__ import annotations

import asyncio
import collections
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import grpc
import pytest
from grpc_health.v1._async import HealthServicer

from ragmesh.errors import ErrorKind, RagmeshError
from ragmesh.grpc_client import channel_target, create_channel
from ragmesh.grpc_server import ServicerContext, add_health, create_server, server_options, set_serving
from ragmesh.v1 import common_pb2, inference_pb2, inference_pb2_grpc


class Replica:
    """An inference replica whose behaviour a test sets: counts the calls it got.
    (Only the two methods the tests call are registered, see `register`.)"""

    def __init__(self, name: str) -> None:
        self.name = name
        self.calls = 0
        # What Generate does: "ok", "refuse" (UNAVAILABLE before any message, as a
        # transport failure gives it), "domain" (a ragmesh server's own UNAVAILABLE),
        # "fail_after_first" (one chunk, then UNAVAILABLE).
        self.mode = "ok"
        self.chunks = 3
        self.chunk_pause = 0.0

    async def ListModels(  # noqa: N802 - gRPC method name
        self, request: common_pb2.ListModelsRequest, context: ServicerContext
    ) -> common_pb2.ListModelsResponse:
        self.calls += 1
        return common_pb2.ListModelsResponse(models=[common_pb2.ModelCard(id=self.name)])

    async def Generate(  # noqa: N802
        self, request: inference_pb2.GenerateRequest, context: ServicerContext
    ) -> AsyncIterator[common_pb2.GenerationChunk]:
        self.calls += 1
        if self.mode == "refuse":
            await context.abort(grpc.StatusCode.UNAVAILABLE, "connection refused")
        if self.mode == "domain":
            raise RagmeshError(ErrorKind.UNAVAILABLE, "the engine's dependency is down")
        for index in range(self.chunks):
            yield common_pb2.GenerationChunk(text=f"{self.name}:{index}", model=self.name)
            if self.mode == "fail_after_first":
                await context.abort(grpc.StatusCode.UNAVAILABLE, "died mid-stream")
            await asyncio.sleep(self.chunk_pause)

    def register(self, server: grpc.aio.Server) -> None:
        handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {
            "ListModels": grpc.unary_unary_rpc_method_handler(
                self.ListModels,
                request_deserializer=common_pb2.ListModelsRequest.FromString,
                response_serializer=common_pb2.ListModelsResponse.SerializeToString,
            ),
            "Generate": grpc.unary_stream_rpc_method_handler(
                self.Generate,
                request_deserializer=inference_pb2.GenerateRequest.FromString,
                response_serializer=common_pb2.GenerationChunk.SerializeToString,
            ),
        }
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("ragmesh.v1.Inference", handlers),))


class Running:
    def __init__(self, replica: Replica, server: grpc.aio.Server, health: HealthServicer, port: int) -> None:
        self.replica, self.server, self.health, self.port = replica, server, health, port


@asynccontextmanager
async def replicas(
    count: int, options: tuple[tuple[str, Any], ...] | None = None
) -> AsyncIterator[tuple[list[Running], grpc.aio.Channel]]:
    """`count` replicas on free ports and one balanced channel over their address list."""
    async with AsyncExitStack() as stack:
        running = []
        for index in range(count):
            replica = Replica(f"r{index}")
            server = create_server(options) if options is not None else create_server()
            replica.register(server)
            health = await add_health(server, [])
            port = server.add_insecure_port("127.0.0.1:0")
            await server.start()
            stack.push_async_callback(server.stop, None)
            running.append(Running(replica, server, health, port))
        channel = create_channel(",".join(f"127.0.0.1:{r.port}" for r in running))
        stack.push_async_callback(channel.close)
        yield running, channel


async def models_of(stub: inference_pb2_grpc.InferenceAsyncStub, calls: int) -> collections.Counter[str]:
    seen: collections.Counter[str] = collections.Counter()
    for _ in range(calls):
        reply = await stub.ListModels(common_pb2.ListModelsRequest(), timeout=5)
        seen[reply.models[0].id] += 1
    return seen


async def generate(stub: inference_pb2_grpc.InferenceAsyncStub) -> list[str]:
    call = stub.Generate(inference_pb2.GenerateRequest(model="m"), timeout=10)
    return [chunk.text async for chunk in call]


def test_address_lists_become_static_targets_and_uris_pass_through() -> None:
    assert channel_target("127.0.0.1:50051") == "127.0.0.1:50051"
    assert channel_target("127.0.0.1:50051, 127.0.0.1:50151") == "ipv4:127.0.0.1:50051,127.0.0.1:50151"
    assert channel_target("[::1]:1,[::1]:2") == "ipv6:[::1]:1,[::1]:2"
    assert channel_target("dns:///inference-headless:50051") == "dns:///inference-headless:50051"
    with pytest.raises(ValueError, match="IP literals"):
        channel_target("inference-0:50051,inference-1:50051")


async def connected(stub: inference_pb2_grpc.InferenceAsyncStub, replicas: int) -> None:
    """Until the channel reached every replica (the first calls go to whichever connected first)."""
    seen: set[str] = set()
    for _ in range(100):
        seen |= set(await models_of(stub, 1))
        if len(seen) == replicas:
            return
    raise AssertionError(f"only {seen} reached")


async def test_calls_are_spread_evenly_over_every_replica() -> None:
    async with replicas(2) as (running, channel):
        stub = inference_pb2_grpc.InferenceStub(channel)
        await connected(stub, 2)
        before = [r.replica.calls for r in running]
        seen = await models_of(stub, 40)
        assert seen == {"r0": 20, "r1": 20}
        assert [r.replica.calls - b for r, b in zip(running, before, strict=True)] == [20, 20]


async def test_a_replica_reporting_not_serving_gets_no_new_calls() -> None:
    async with replicas(2) as (running, channel):
        stub = inference_pb2_grpc.InferenceStub(channel)
        await connected(stub, 2)
        await set_serving(running[1].health, [], False)
        await asyncio.sleep(0.2)  # the health watch delivers NOT_SERVING
        assert await models_of(stub, 20) == {"r0": 20}
        await set_serving(running[1].health, [], True)
        await asyncio.sleep(0.2)
        assert (await models_of(stub, 20))["r1"] == 10


async def test_a_call_refused_before_any_reply_is_retried_on_another_replica() -> None:
    async with replicas(2) as (running, channel):
        running[0].replica.mode = "refuse"
        stub = inference_pb2_grpc.InferenceStub(channel)
        for _ in range(6):
            assert await generate(stub) == ["r1:0", "r1:1", "r1:2"]
        assert running[0].replica.calls >= 1  # refused ones were really sent there first


async def test_a_domain_error_is_not_retried() -> None:
    # The server did its work and answered: running it elsewhere could double its effects.
    async with replicas(2) as (running, channel):
        for r in running:
            r.replica.mode = "domain"
        stub = inference_pb2_grpc.InferenceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await generate(stub)
        assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
        assert sum(r.replica.calls for r in running) == 1


async def test_a_stream_that_sent_a_chunk_is_never_retried() -> None:
    async with replicas(2) as (running, channel):
        for r in running:
            r.replica.mode = "fail_after_first"
        stub = inference_pb2_grpc.InferenceStub(channel)
        call = stub.Generate(inference_pb2.GenerateRequest(model="m"), timeout=10)
        first = await call.read()
        assert isinstance(first, common_pb2.GenerationChunk)
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await call.read()
        assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
        assert sum(r.replica.calls for r in running) == 1


async def test_connections_past_their_max_age_let_streams_finish_and_calls_go_on() -> None:
    # Connections are closed (GOAWAY) every ~0.5 s: a 2 s stream still finishes (the
    # grace), and calls made across many reconnections all succeed.
    async with replicas(2, server_options(0.5, 10.0)) as (running, channel):
        for r in running:
            r.replica.chunk_pause = 0.25
            r.replica.chunks = 8
        stub = inference_pb2_grpc.InferenceStub(channel)
        streams = [asyncio.create_task(generate(stub)) for _ in range(4)]
        seen = collections.Counter[str]()
        for _ in range(20):
            seen += await models_of(stub, 2)
            await asyncio.sleep(0.1)
        for chunks in await asyncio.gather(*streams):
            assert len(chunks) == 8
        assert sum(seen.values()) == 40 and set(seen) == {"r0", "r1"}


async def test_a_draining_server_finishes_its_streams_while_new_calls_go_elsewhere() -> None:
    async with replicas(2) as (running, channel):
        for r in running:
            r.replica.chunk_pause = 0.2
            r.replica.chunks = 10
        stub = inference_pb2_grpc.InferenceStub(channel)
        streams = [asyncio.create_task(generate(stub)) for _ in range(4)]
        await asyncio.sleep(0.3)  # every stream has started, two on each replica
        draining = running[0]
        await draining.health.enter_graceful_shutdown()
        stopping = asyncio.create_task(draining.server.stop(10.0))
        await asyncio.sleep(0.1)
        before = draining.replica.calls
        seen = await models_of(stub, 10)
        assert seen == {"r1": 10} and draining.replica.calls == before
        for chunks in await asyncio.gather(*streams):
            assert len(chunks) == 10  # the draining replica's streams ended whole
        await stopping
