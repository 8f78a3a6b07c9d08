"""gRPC server helpers: request-id propagation, domain error mapping, metrics, health."""

from __future__ import annotations

import contextlib
import hmac
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeAlias

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from opentelemetry.trace import SpanKind
from prometheus_client import Counter, Gauge, Histogram

from ragmesh.context import REQUEST_ID_HEADER, SERVICE_TOKEN_HEADER, accept_request_id, request_id_var
from ragmesh.errors import ErrorKind, RagmeshError, from_exception
from ragmesh.tracing import span

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    # Servicers here take any request/response type: one alias instead of repeating generics.
    ServicerContext: TypeAlias = grpc.aio.ServicerContext[Any, Any]
    MethodHandler: TypeAlias = grpc.RpcMethodHandler[Any, Any]
else:
    ServicerContext = grpc.aio.ServicerContext
    MethodHandler = grpc.RpcMethodHandler

GRPC_REQUESTS = Counter("ragmesh_grpc_server_requests_total", "gRPC calls handled", ["method", "code"])
GRPC_LATENCY = Histogram(
    "ragmesh_grpc_server_duration_seconds",
    "gRPC call duration (whole stream for streaming calls)",
    ["method"],
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
)

# Every balanced client channel watches the health of each replica it is connected
# to: this counts the channels that can send calls here (`make rollout` waits for
# them to come back before it restarts the next replica).
HEALTH_WATCHERS = Gauge("ragmesh_grpc_health_watchers", "Client channels watching this server's gRPC health")

# Large enough for embedding batches and long prompts; nginx limits the public body size.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
GRPC_OPTIONS = (
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.so_reuseport", 0),
    # Accept the clients' pings: keepalives every 30 s with or without calls (see
    # grpc_client.CHANNEL_OPTIONS), and the BDP probes a client sends while it
    # receives a lot. By default a server takes pings closer than 5 min apart as
    # abuse and drops the connection after 2 (GOAWAY too_many_pings), so the next
    # call paid a reconnect. Peers are the mesh's own services: no strike limit.
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 20_000),
    ("grpc.http2.max_ping_strikes", 0),
    # The server's own pings find clients that vanished (a killed pod) and free their calls.
    ("grpc.keepalive_time_ms", 60_000),
    ("grpc.keepalive_timeout_ms", 20_000),
)

# Told to a client that must not retry a call elsewhere: the server did the work
# and answered with a domain error (see grpc_client.RETRY_POLICY).
NO_RETRY = ("grpc-retry-pushback-ms", "-1")


def server_options(max_connection_age: float, max_connection_age_grace: float) -> tuple[tuple[str, Any], ...]:
    """GRPC_OPTIONS plus a bounded connection age.

    After `max_connection_age` seconds (gRPC adds +-10% jitter) a connection gets
    a GOAWAY: its calls in flight go on for up to `max_connection_age_grace`, new
    calls open a new connection, and the client resolves its target again. That is
    how clients spread to replicas added since they connected. 0 turns it off.
    """
    if max_connection_age <= 0:
        return GRPC_OPTIONS
    return (
        *GRPC_OPTIONS,
        ("grpc.max_connection_age_ms", int(max_connection_age * 1000)),
        ("grpc.max_connection_age_grace_ms", int(max_connection_age_grace * 1000)),
    )


async def abort_with(context: ServicerContext, err: RagmeshError) -> None:
    """End the call with the status and metadata of a domain error."""
    context.set_trailing_metadata((*err.grpc_trailing_metadata(), NO_RETRY))
    await context.abort(err.row.grpc_status, err.message)


def _metadata(details: grpc.HandlerCallDetails) -> dict[str, str]:
    return {key: value for key, value in details.invocation_metadata or () if isinstance(value, str)}


class _CallScope:
    """What every call does on entry and exit: request id, metrics, error mapping."""

    def __init__(self, method: str, request_id: str) -> None:
        self.method = method
        self.request_id = request_id
        self.start = time.perf_counter()
        self.code = "OK"

    async def fail(self, context: ServicerContext, exc: BaseException) -> None:
        # The error table reads it: a Redis error a servicer let through is UNAVAILABLE (the
        # caller retries, its client sees a 503), not a bug.
        err = from_exception(exc)
        if err.kind is ErrorKind.INTERNAL:
            log.exception("unhandled error in %s", self.method)
        elif err is not exc:
            log.warning("dependency failed in %s", self.method, extra={"error": repr(exc)})
        self.code = err.row.grpc_status.name
        await abort_with(context, err)

    def done(self) -> None:
        seconds = time.perf_counter() - self.start
        GRPC_REQUESTS.labels(self.method, self.code).inc()
        GRPC_LATENCY.labels(self.method).observe(seconds)
        # One line per call, under the caller's request id (set while this runs).
        log.info("call finished", extra={"method": self.method, "code": self.code, "seconds": round(seconds, 4)})


def _wrap_unary(method: str, md: dict[str, str], behavior: Callable[..., Any]) -> Callable[..., Awaitable[Any]]:
    rid = accept_request_id(md.get(REQUEST_ID_HEADER))

    async def handler(request_or_iterator: Any, context: ServicerContext) -> Any:
        scope = _CallScope(method, rid)
        token = request_id_var.set(rid)
        try:
            with span(method, SpanKind.SERVER, parent=md, attributes={"rpc.system": "grpc", "rpc.method": method}):
                return await behavior(request_or_iterator, context)
        except grpc.aio.AbortError:
            scope.code = context.code().name if context.code() else "ABORTED"
            raise
        except Exception as exc:  # noqa: BLE001 - every error leaves as a status
            await scope.fail(context, exc)
        finally:
            scope.done()
            request_id_var.reset(token)

    return handler


def _wrap_streaming(method: str, md: dict[str, str], behavior: Callable[..., Any]) -> Callable[..., AsyncIterator[Any]]:
    rid = accept_request_id(md.get(REQUEST_ID_HEADER))

    async def handler(request_or_iterator: Any, context: ServicerContext) -> AsyncIterator[Any]:
        scope = _CallScope(method, rid)
        token = request_id_var.set(rid)
        try:
            attributes = {"rpc.system": "grpc", "rpc.method": method}
            with span(method, SpanKind.SERVER, parent=md, attributes=attributes, current=False):
                async for item in behavior(request_or_iterator, context):
                    yield item
        except grpc.aio.AbortError:
            raise
        except Exception as exc:  # noqa: BLE001 - every error leaves as a status
            await scope.fail(context, exc)
        except BaseException:
            scope.code = "CANCELLED"
            raise
        finally:
            scope.done()
            # The generator may be closed from another task (the call was cancelled):
            # this context is then not the one the id was set in, and there is nothing to undo.
            with contextlib.suppress(ValueError):
                request_id_var.reset(token)

    return handler


def _refuse(method: str, handler: MethodHandler) -> MethodHandler:
    """A handler of the same shape that ends the call UNAUTHENTICATED (no servicer code runs)."""

    async def refuse(request_or_iterator: Any, context: ServicerContext) -> None:
        GRPC_REQUESTS.labels(method, "UNAUTHENTICATED").inc()
        log.warning("call without the service credential refused", extra={"method": method})
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong service credential")

    async def refuse_stream(request_or_iterator: Any, context: ServicerContext) -> AsyncIterator[Any]:
        await refuse(request_or_iterator, context)
        yield  # pragma: no cover - abort raised

    deser, ser = handler.request_deserializer, handler.response_serializer
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(refuse, deser, ser)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(refuse, deser, ser)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(refuse_stream, deser, ser)
    return grpc.stream_stream_rpc_method_handler(refuse_stream, deser, ser)


class ContextInterceptor(grpc.aio.ServerInterceptor):
    """Checks the service credential, sets the request id for logs, maps RagmeshError to a
    status, counts calls. One interceptor: each layer of wrapping costs every call."""

    def __init__(self, service_token: str = "") -> None:
        self._token = service_token.encode()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[MethodHandler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> MethodHandler | None:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        # Health stays open: channels probe it themselves (with no call metadata) and it tells nothing.
        if handler is None or method.startswith("/grpc.health."):
            return handler
        md = _metadata(handler_call_details)
        if self._token and not hmac.compare_digest(md.get(SERVICE_TOKEN_HEADER, "").encode(), self._token):
            return _refuse(method, handler)
        deser, ser = handler.request_deserializer, handler.response_serializer
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(_wrap_unary(method, md, handler.unary_unary), deser, ser)
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(_wrap_unary(method, md, handler.stream_unary), deser, ser)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(_wrap_streaming(method, md, handler.unary_stream), deser, ser)
        assert handler.stream_stream is not None
        return grpc.stream_stream_rpc_method_handler(_wrap_streaming(method, md, handler.stream_stream), deser, ser)


def create_server(options: tuple[tuple[str, Any], ...] = GRPC_OPTIONS, service_token: str = "") -> grpc.aio.Server:
    """A grpc.aio server with the ragmesh interceptor and message limits; with a service token,
    every call but health checks must carry it (UNAUTHENTICATED otherwise)."""
    return grpc.aio.server(interceptors=[ContextInterceptor(service_token)], options=options)


class WatchedHealth(HealthServicer):  # type: ignore[misc]  # grpc_health ships no types
    """The standard health service, counting the clients that watch it."""

    async def Watch(self, request: health_pb2.HealthCheckRequest, context: Any) -> None:  # noqa: N802
        HEALTH_WATCHERS.inc()
        try:
            await super().Watch(request, context)
        finally:
            HEALTH_WATCHERS.dec()


async def add_health(server: grpc.aio.Server, service_names: list[str], serving: bool = True) -> HealthServicer:
    """Register the standard gRPC health service; every listed service (and "") starts
    SERVING, or NOT_SERVING when the caller will say when it is ready (`set_serving`)."""
    health = WatchedHealth()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    await set_serving(health, service_names, serving)
    return health


async def set_serving(health: HealthServicer, service_names: list[str], serving: bool) -> None:
    """Set the server's health ("" and every listed service): clients balance only over SERVING replicas."""
    status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
    for name in ["", *service_names]:
        await health.set(name, status)
