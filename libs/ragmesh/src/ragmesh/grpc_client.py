"""gRPC client helpers: channels with sane options, request-id metadata, health probes."""

from __future__ import annotations

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ragmesh.context import REQUEST_ID_HEADER, current_request_id
from ragmesh.grpc_server import MAX_MESSAGE_BYTES
from ragmesh.tracing import traced_metadata

CHANNEL_OPTIONS = (
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    # Keep idle loopback/cluster connections alive so the first request after a
    # quiet period does not pay a reconnect.
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.enable_retries", 1),
)


def create_channel(address: str) -> grpc.aio.Channel:
    """An insecure channel to a mesh peer ("host:port"); the mesh runs on a trusted network."""
    return grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)


def call_metadata() -> tuple[tuple[str, str], ...]:
    """Metadata every outgoing call carries: the current request id (and trace context, when on)."""
    return traced_metadata(((REQUEST_ID_HEADER, current_request_id()),))


async def check_health(channel: grpc.aio.Channel, service: str = "", deadline: float = 2.0) -> str:
    """Ask a peer's gRPC health service; returns "ok" or a short reason."""
    stub = health_pb2_grpc.HealthStub(channel)
    try:
        reply = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=deadline)
    except grpc.aio.AioRpcError as exc:
        return f"{exc.code().name}: {exc.details()}"
    if reply.status == health_pb2.HealthCheckResponse.SERVING:
        return "ok"
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))
