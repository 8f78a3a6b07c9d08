"""Trace context across a real gRPC hop and an AMQP message, with an in-memory exporter."""

from __future__ import annotations

from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import grpc
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from ragmesh import tracing
from ragmesh.amqp import consuming, message_headers
from ragmesh.context import REQUEST_ID_HEADER, accept_request_id, current_request_id, request_id_var
from ragmesh.grpc_client import call_metadata
from ragmesh.grpc_server import create_server

_EXPORTER = InMemorySpanExporter()
_PROVIDER = TracerProvider()
_PROVIDER.add_span_processor(SimpleSpanProcessor(_EXPORTER))


@pytest.fixture
def traced() -> Iterator[InMemorySpanExporter]:
    tracing.enable_for_tests(_PROVIDER)
    _EXPORTER.clear()
    yield _EXPORTER
    tracing._enabled = False


def test_off_by_default_costs_nothing() -> None:
    assert not tracing.setup_tracing("x", environ={})
    assert not tracing.tracing_enabled()
    token = request_id_var.set("rid-1")
    try:
        assert call_metadata() == ((REQUEST_ID_HEADER, "rid-1"),)
        assert message_headers() == {REQUEST_ID_HEADER: "rid-1"}
    finally:
        request_id_var.reset(token)
    with tracing.span("nothing") as current:
        assert current is None


async def test_grpc_server_span_continues_the_callers_trace(traced: InMemorySpanExporter) -> None:
    seen: dict[str, Any] = {}

    async def echo(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        seen["rid"] = current_request_id()
        return request

    server = create_server()
    handler = grpc.method_handlers_generic_handler("test.Echo", {"Call": grpc.unary_unary_rpc_method_handler(echo)})
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            call: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary("/test.Echo/Call")
            token = request_id_var.set("rid-grpc")
            try:
                with tracing.span("caller") as caller:
                    assert await call(b"hi", metadata=call_metadata()) == b"hi"
            finally:
                request_id_var.reset(token)
    finally:
        await server.stop(None)
    assert seen["rid"] == "rid-grpc"
    spans = {s.name: s for s in traced.get_finished_spans()}
    server_span = spans["/test.Echo/Call"]
    assert server_span.context.trace_id == caller.get_span_context().trace_id
    assert server_span.parent is not None and server_span.parent.span_id == caller.get_span_context().span_id


def test_amqp_consumer_span_and_request_id_follow_the_message(traced: InMemorySpanExporter) -> None:
    token = request_id_var.set("rid-amqp")
    try:
        with tracing.span("publisher") as publisher:
            headers = message_headers()
    finally:
        request_id_var.reset(token)
    assert headers[REQUEST_ID_HEADER] == "rid-amqp" and "traceparent" in headers
    with consuming(SimpleNamespace(headers=headers), "ingest job"):  # type: ignore[arg-type]
        assert current_request_id() == "rid-amqp"
    consumer = next(s for s in traced.get_finished_spans() if s.name == "ingest job")
    assert consumer.context.trace_id == publisher.get_span_context().trace_id
    assert consumer.parent is not None and consumer.parent.span_id == publisher.get_span_context().span_id


def test_a_failing_block_marks_its_span(traced: InMemorySpanExporter) -> None:
    with pytest.raises(ValueError), tracing.span("boom"):
        raise ValueError("bad")
    (boom,) = traced.get_finished_spans()
    assert not boom.status.is_ok and "ValueError" in (boom.status.description or "")


@pytest.mark.parametrize(
    ("given", "kept"),
    [
        ("abc-123_X.y:z", True),
        ("a" * 128, True),
        ("a" * 129, False),
        ("", False),
        (None, False),
        ("two words", False),
        ('quote"', False),
        ("line\r\nX-Injected: 1", False),
        ("ünïcode", False),
    ],
)
def test_request_ids_from_outside_are_plain_tokens(given: str | None, kept: bool) -> None:
    rid = accept_request_id(given)
    assert (rid == given) is kept
    if not kept:
        assert len(rid) == 32 and all(c in "0123456789abcdef" for c in rid)
