"""Services running in this process behind real gRPC servers on loopback ports."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import grpc
import pytest

from inference.config import DEFAULT
from inference.engine import LlamaCppEngine
from inference.router import Router
from inference.servicer import InferenceServicer
from inference.settings import InferenceSettings
from postprocess.servicer import PostprocessServicer
from postprocess.session import GuardConfig
from ragmesh.grpc_client import create_channel
from ragmesh.grpc_server import add_health, create_server
from ragmesh.v1 import inference_pb2_grpc, postprocess_pb2_grpc

MODEL = "SmolLM2-135M-Instruct"


@pytest.fixture(scope="session")
async def engine() -> AsyncIterator[LlamaCppEngine]:
    # 2 slots, 2048 tokens each; one thread so the e2e mesh beside it is not starved.
    settings = InferenceSettings(n_parallel=2, n_ctx=4096, n_threads=1, n_threads_batch=1, max_concurrent_requests=4)
    engine = LlamaCppEngine(settings)
    await asyncio.to_thread(engine.load)
    yield engine
    await engine.aclose()


@asynccontextmanager
async def serving(register: Callable[[grpc.aio.Server], None], port: int = 0) -> AsyncIterator[grpc.aio.Channel]:
    """A real gRPC server on a loopback port (free unless given; with the mesh's interceptor and
    health), and a channel to it."""
    server = create_server()
    register(server)
    await add_health(server, [])
    port = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    channel = create_channel(f"127.0.0.1:{port}")
    try:
        yield channel
    finally:
        await channel.close()
        await server.stop(0)


@pytest.fixture(scope="session")
async def inference_channel(engine: LlamaCppEngine) -> AsyncIterator[grpc.aio.Channel]:
    """The embedded engine behind the router, as with no backends file."""
    router = Router(engine)
    await router.load(DEFAULT)
    servicer = InferenceServicer(router, engine, lambda: router.load(DEFAULT))
    async with serving(lambda s: inference_pb2_grpc.add_InferenceServicer_to_server(servicer, s)) as ch:
        yield ch


@pytest.fixture(scope="session")
async def postprocess_channel() -> AsyncIterator[grpc.aio.Channel]:
    servicer = PostprocessServicer(GuardConfig(), None)
    async with serving(lambda s: postprocess_pb2_grpc.add_PostprocessServicer_to_server(servicer, s)) as ch:
        yield ch
