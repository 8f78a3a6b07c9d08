"""OpenTelemetry tracing across HTTP, gRPC and AMQP, on only when an OTLP endpoint is set.

`setup_tracing` turns it on when OTEL_EXPORTER_OTLP_ENDPOINT (or
OTEL_EXPORTER_OTLP_TRACES_ENDPOINT) is set, exporting spans over OTLP/HTTP
(protobuf) in batches; the standard OTEL_* variables (service name, headers,
sampler, batch delay) apply. Otherwise nothing is imported from the SDK and
every helper here returns at its first line: no span objects, no headers.

The W3C `traceparent` travels in gRPC metadata and AMQP message headers next to
the request id, so one trace covers gateway -> preprocess -> inference and
postprocess, and preprocess -> RabbitMQ -> retrieval or the batch workers.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Mapping, MutableMapping
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind, Status, StatusCode

log = logging.getLogger(__name__)

_enabled = False


def tracing_enabled() -> bool:
    return _enabled


def setup_tracing(service: str, environ: Mapping[str, str] | None = None) -> bool:
    """Install an OTLP exporter when an endpoint is configured; returns whether tracing is on."""
    global _enabled
    env = os.environ if environ is None else environ
    if not (env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")):
        return False
    if env.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return False
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    resource = Resource.create({"service.name": env.get("OTEL_SERVICE_NAME") or f"ragmesh-{service}"})
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    _enabled = True
    log.info("tracing on", extra={"exporter": "otlp/http"})
    return True


def enable_for_tests(provider: Any) -> None:
    """Use this tracer provider (an in-memory one in unit tests)."""
    global _enabled
    trace.set_tracer_provider(provider)
    _enabled = True


def inject(carrier: MutableMapping[str, Any]) -> None:
    """Add the current trace context (traceparent, tracestate) to outgoing headers or metadata."""
    if _enabled:
        propagate.inject(carrier)


def traced_metadata(pairs: tuple[tuple[str, str], ...]) -> tuple[tuple[str, str], ...]:
    """gRPC call metadata plus the trace context, when tracing is on."""
    if not _enabled:
        return pairs
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return pairs + tuple(carrier.items())


@contextlib.contextmanager
def span(
    name: str,
    kind: SpanKind = SpanKind.INTERNAL,
    parent: Mapping[str, Any] | None = None,
    attributes: Mapping[str, str | int | float | bool] | None = None,
    current: bool = True,
) -> Iterator[Any]:
    """A span around a block (nothing when tracing is off). `parent`: incoming headers or
    metadata to continue a trace from; without it the span is a child of the current one.

    `current=False` for a block that yields (an async generator): such a block may be
    closed from another task, where a context attached here cannot be detached, so the
    span is recorded without becoming the current one."""
    if not _enabled:
        yield None
        return
    ctx = propagate.extract({k: v for k, v in parent.items() if isinstance(v, str)}) if parent else None
    tracer = trace.get_tracer("ragmesh")
    opened = tracer.start_span(name, context=ctx, kind=kind, attributes=dict(attributes or {}))
    token = otel_context.attach(trace.set_span_in_context(opened, ctx)) if current else None
    try:
        yield opened
    except BaseException as exc:
        opened.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"[:200]))
        raise
    finally:
        if token is not None:
            otel_context.detach(token)
        opened.end()


def set_error(current: Any, description: str) -> None:
    """Mark a span failed (a handled error, such as an HTTP 4xx/5xx answer)."""
    if current is not None:
        current.set_status(Status(StatusCode.ERROR, description[:200]))
