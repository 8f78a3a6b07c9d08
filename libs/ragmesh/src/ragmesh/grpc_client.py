"""gRPC client helpers: balanced, health-checked channels with safe retries; request-id metadata; health probes.

Every channel to a mesh peer spreads its calls over all the peer's replicas
(`round_robin`), skips a replica whose health service says NOT_SERVING (one that
is starting or draining), and retries a call that failed before the server sent
anything back. Targets:

- `dns:///inference-headless:50051`: a Kubernetes headless Service (every ready
  pod's address; resolved again when a connection ends, so new pods are found
  once the servers' max_connection_age closes the old connections);
- `127.0.0.1:50051,127.0.0.1:50151`: a static list (what `make up` passes);
- `host:port`: one name, every address it resolves to.
"""

from __future__ import annotations

import ipaddress
import json
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ragmesh.context import REQUEST_ID_HEADER, SERVICE_TOKEN_HEADER, current_request_id
from ragmesh.grpc_server import MAX_MESSAGE_BYTES
from ragmesh.tracing import traced_metadata

# Retries that are safe by construction. gRPC retries a call only while it is not
# committed, that is before the server sent its response headers or a message, so
# a call that already gave the client a token is never run again. UNAVAILABLE is
# what a refused connection, a reset before any reply, or a GOAWAY from a draining
# server give; a ragmesh server that answers UNAVAILABLE itself (a dependency down)
# asks not to be retried (grpc-retry-pushback-ms, see grpc_server.abort_with).
RETRY_POLICY: dict[str, Any] = {
    "maxAttempts": 4,
    "initialBackoff": "0.05s",
    "maxBackoff": "1s",
    "backoffMultiplier": 2,
    "retryableStatusCodes": ["UNAVAILABLE"],
}


def service_config(health_checked: bool = True) -> dict[str, Any]:
    """round_robin over every address, retries (RETRY_POLICY) and, unless told otherwise,
    health checking: a replica that is starting or draining (NOT_SERVING) gets no new calls."""
    config: dict[str, Any] = {
        "loadBalancingConfig": [{"round_robin": {}}],
        "methodConfig": [{"name": [{}], "retryPolicy": RETRY_POLICY}],
        # Retries stop when most recent calls failed (a whole peer down), so a retry
        # storm never doubles the load on what is left.
        "retryThrottling": {"maxTokens": 100, "tokenRatio": 0.1},
    }
    if health_checked:
        config["healthCheckConfig"] = {"serviceName": ""}  # the server as a whole
    return config


def channel_options(health_checked: bool = True) -> tuple[tuple[str, Any], ...]:
    """Options of a mesh channel (see service_config)."""
    return (
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        # Keep idle loopback/cluster connections alive so the first request after a
        # quiet period does not pay a reconnect.
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.enable_retries", 1),
        ("grpc.service_config", json.dumps(service_config(health_checked))),
        # A replica that restarts (a rollout) is reconnected within about a second of
        # listening again; gRPC's default backoff grows to two minutes.
        ("grpc.initial_reconnect_backoff_ms", 200),
        ("grpc.max_reconnect_backoff_ms", 1_000),
        # dns:/// targets: look again at most every 5 s (default 30 s) when a
        # connection ends, so pods a scale-out added are picked up quickly.
        ("grpc.dns_min_time_between_resolutions_ms", 5_000),
    )


CHANNEL_OPTIONS = channel_options()


def channel_target(address: str) -> str:
    """The gRPC target for a peer address: a URI as is, a comma list of IP:port as a static list."""
    address = address.strip()
    if not address:
        raise ValueError("empty peer address")
    if ":///" in address or address.split(":", 1)[0] in ("dns", "ipv4", "ipv6", "unix", "unix-abstract"):
        return address
    parts = [part.strip() for part in address.split(",") if part.strip()]
    if len(parts) == 1:
        return parts[0]
    hosts = [_host_of(part) for part in parts]
    versions = set()
    for part, host in zip(parts, hosts, strict=True):
        try:
            versions.add(ipaddress.ip_address(host).version)
        except ValueError:
            raise ValueError(
                f"{part!r}: a list of peer addresses takes IP literals (for names, use one "
                "dns:/// target that resolves to every replica)"
            ) from None
    if len(versions) != 1:
        raise ValueError(f"{address!r}: mix of IPv4 and IPv6 addresses")
    return f"ipv{versions.pop()}:{','.join(parts)}"


def _host_of(part: str) -> str:
    if part.startswith("["):  # [::1]:50051
        return part[1 : part.index("]")]
    return part.rsplit(":", 1)[0]


def create_channel(address: str, health_checked: bool = True) -> grpc.aio.Channel:
    """An insecure, balanced channel to a mesh peer (see the module docstring for the targets)."""
    return grpc.aio.insecure_channel(channel_target(address), options=channel_options(health_checked))


# The service credential this process sends (set once at start, from its settings).
_credential: tuple[tuple[str, str], ...] = ()


def use_service_token(token: str) -> None:
    """Every call this process makes from now on carries `token` (empty: none)."""
    global _credential
    _credential = ((SERVICE_TOKEN_HEADER, token),) if token else ()


def call_metadata() -> tuple[tuple[str, str], ...]:
    """Metadata every outgoing call carries: the service credential, the current request id
    (and trace context, when on)."""
    return traced_metadata((*_credential, (REQUEST_ID_HEADER, current_request_id())))


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
