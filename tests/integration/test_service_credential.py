"""The gRPC plane's service credential, on a real grpc.aio server built by the shared helpers."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from ragmesh import grpc_client, grpc_server

TOKEN = "svc-" + "ab" * 16


async def _unary(request: bytes, context: object) -> bytes:
    return request


async def _stream(request: bytes, context: object) -> AsyncIterator[bytes]:
    for _ in range(3):
        yield request


@pytest.fixture
async def server() -> AsyncIterator[int]:
    handler = grpc.method_handlers_generic_handler(
        "test.Echo",
        {
            "Unary": grpc.unary_unary_rpc_method_handler(_unary),
            "Stream": grpc.unary_stream_rpc_method_handler(_stream),
        },
    )
    srv = grpc_server.create_server(service_token=TOKEN)
    srv.add_generic_rpc_handlers((handler,))
    await grpc_server.add_health(srv, ["test.Echo"])
    port = srv.add_insecure_port("127.0.0.1:0")
    await srv.start()
    try:
        yield port
    finally:
        grpc_client.use_service_token("")
        await srv.stop(None)


async def test_calls_without_the_credential_are_refused_and_with_it_served(server: int) -> None:
    async with grpc_client.create_channel(f"127.0.0.1:{server}", health_checked=False) as channel:
        unary: Any = channel.unary_unary("/test.Echo/Unary")
        stream: Any = channel.unary_stream("/test.Echo/Stream")
        for metadata in ((), (("ragmesh-service-token", "wrong"),), (("ragmesh-service-token", TOKEN[:-1]),)):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await unary(b"x", metadata=metadata)
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                async for _ in stream(b"x", metadata=metadata):
                    pass
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
        # The shared client helper sends it once the process was told its token.
        grpc_client.use_service_token(TOKEN)
        assert await unary(b"x", metadata=grpc_client.call_metadata()) == b"x"
        assert [m async for m in stream(b"y", metadata=grpc_client.call_metadata())] == [b"y"] * 3
    # Health stays open: balanced channels probe it with no call metadata.
    async with grpc_client.create_channel(f"127.0.0.1:{server}", health_checked=False) as channel:
        assert await grpc_client.check_health(channel) == "ok"
