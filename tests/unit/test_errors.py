"""The error table round-trips through gRPC metadata and renders OpenAI bodies."""

from __future__ import annotations

import grpc
import pytest
import redis.exceptions

from ragmesh.errors import ERROR_TABLE, ErrorKind, RagmeshError, from_exception, from_grpc, from_rpc_error
from ragmesh.grpc_server import create_server


@pytest.mark.parametrize("kind", list(ErrorKind))
def test_every_kind_round_trips_through_grpc_metadata(kind: ErrorKind) -> None:
    err = RagmeshError(kind, "boom", param="messages", code="c1", retry_after=3)
    back = from_grpc(err.row.grpc_status, err.message, err.grpc_trailing_metadata())
    assert (back.kind, back.message, back.param, back.code, back.retry_after) == (kind, "boom", "messages", "c1", 3)


def test_openai_body_shape() -> None:
    body = RagmeshError(ErrorKind.NOT_FOUND, "no such model", param="model").to_openai()
    assert body == {
        "error": {"message": "no such model", "type": "invalid_request_error", "param": "model", "code": "not_found"}
    }


def test_foreign_status_without_metadata_is_classified() -> None:
    err = from_grpc(grpc.StatusCode.UNAVAILABLE, "connection refused", None)
    assert err.kind is ErrorKind.UNAVAILABLE and err.http_status == 503
    assert from_grpc(grpc.StatusCode.DEADLINE_EXCEEDED, None, ()).http_status == 504
    assert from_grpc(grpc.StatusCode.UNKNOWN, "x", ()).http_status == 500


def test_no_kind_maps_to_422() -> None:
    assert all(row.http_status != 422 for row in ERROR_TABLE.values())


# --- Redis errors: a dependency down, 503 everywhere ------------------------------------------

REDIS_FAULTS = [
    redis.exceptions.ConnectionError("Error 111 connecting to 10.0.0.7:6379. Connection refused."),
    redis.exceptions.TimeoutError("Timeout reading from 10.0.0.7:6379"),
    redis.exceptions.BusyLoadingError("Redis is loading the dataset in memory"),
    redis.exceptions.ReadOnlyError("You can't write against a read only replica."),
    redis.exceptions.ResponseError("NOSCRIPT No matching script"),
]


@pytest.mark.parametrize("fault", REDIS_FAULTS, ids=lambda e: type(e).__name__)
def test_the_table_reads_any_redis_error_as_unavailable_with_an_openai_body(fault: Exception) -> None:
    err = from_exception(fault)
    assert err.kind is ErrorKind.UNAVAILABLE and err.http_status == 503 and err.retry_after
    body = err.to_openai()["error"]
    assert body["type"] == "server_error" and body["code"] == "service_unavailable" and "Redis" in body["message"]
    assert "10.0.0.7" not in body["message"]  # never Redis's own text (hosts, ports)
    assert err.row.grpc_status is grpc.StatusCode.UNAVAILABLE


def test_the_table_keeps_domain_errors_and_reads_the_rest_as_internal() -> None:
    domain = RagmeshError(ErrorKind.NOT_FOUND, "no such batch")
    assert from_exception(domain) is domain
    assert from_exception(KeyError("x")).http_status == 500


@pytest.mark.parametrize(
    "fault",
    [redis.exceptions.ConnectionError("refused"), redis.exceptions.TimeoutError("slow")],
    ids=lambda e: type(e).__name__,
)
async def test_a_redis_error_a_servicer_lets_through_leaves_as_unavailable_not_internal(fault: Exception) -> None:
    """Through a real gRPC hop (the mesh's server helper): the caller reads UNAVAILABLE (its
    client a 503, a queue a retry), where it used to read INTERNAL (a 500)."""

    async def failing(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        raise fault

    server = create_server()
    handler = grpc.method_handlers_generic_handler("test.Store", {"Get": grpc.unary_unary_rpc_method_handler(failing)})
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            call: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary("/test.Store/Get")
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await call(b"x", timeout=10)
    finally:
        await server.stop(None)
    assert raised.value.code() is grpc.StatusCode.UNAVAILABLE
    err = from_rpc_error(raised.value)
    assert err.kind is ErrorKind.UNAVAILABLE and err.http_status == 503
