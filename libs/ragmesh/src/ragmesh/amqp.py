"""RabbitMQ helpers: the mesh's queue topology, connections and confirmed publishing.

Every name is prefixed with the mesh's namespace (empty by default), so test
runs and several meshes can share one broker.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import aio_pika
from aio_pika.abc import (
    AbstractChannel,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustConnection,
    DeliveryMode,
)
from opentelemetry.trace import SpanKind

from ragmesh.context import REQUEST_ID_HEADER, accept_request_id, current_request_id, request_id_var
from ragmesh.tracing import inject, span

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Topology:
    """Names of the durable queues and exchanges (see proto/ragmesh/v1/ingest.proto)."""

    namespace: str = ""

    def _name(self, base: str) -> str:
        return f"{self.namespace}.{base}" if self.namespace else base

    @property
    def ingest_queue(self) -> str:
        return self._name("ingest")

    @property
    def ingest_dead_exchange(self) -> str:
        return self._name("ingest.dlx")

    @property
    def ingest_dead_queue(self) -> str:
        return self._name("ingest.dead")

    @property
    def index_events_exchange(self) -> str:
        return self._name("index.events")

    def index_events_queue(self, replica_id: str) -> str:
        return self._name(f"index.events.{replica_id}")

    @property
    def requests_exchange(self) -> str:
        """Where batch lines and direct-protocol requests are published (direct exchange)."""
        return self._name("requests")

    @property
    def requests_queue(self) -> str:
        return self._name("batch.requests")

    @property
    def retry_queue(self) -> str:
        """Requests waiting out a backoff: each expires back into the requests queue."""
        return self._name("batch.retry")

    @property
    def requests_dead_queue(self) -> str:
        return self._name("batch.dead")


# Routing key of the requests exchange that reaches the batch workers.
REQUEST_ROUTING_KEY = "request"


async def declare_requests(channel: AbstractChannel, topology: Topology) -> AbstractQueue:
    """The requests exchange and queue, the retry (delay) queue and the dead-letter queue."""
    exchange = await channel.declare_exchange(topology.requests_exchange, aio_pika.ExchangeType.DIRECT, durable=True)
    dead = await channel.declare_queue(topology.requests_dead_queue, durable=True)
    queue = await channel.declare_queue(topology.requests_queue, durable=True)
    await queue.bind(exchange, REQUEST_ROUTING_KEY)
    await channel.declare_queue(
        topology.retry_queue,
        durable=True,
        arguments={
            "x-dead-letter-exchange": topology.requests_exchange,
            "x-dead-letter-routing-key": REQUEST_ROUTING_KEY,
        },
    )
    del dead  # declared so that it exists: failed messages are published to it by name
    return queue


async def connect(url: str) -> AbstractRobustConnection:
    """A robust connection: it reconnects by itself and restores its consumers."""
    return await aio_pika.connect_robust(url, timeout=10, client_properties={"connection_name": "ragmesh"})


async def declare_ingest(channel: AbstractChannel, topology: Topology) -> AbstractQueue:
    """The durable ingest queue; rejected messages go to its dead-letter queue."""
    dlx = await channel.declare_exchange(topology.ingest_dead_exchange, aio_pika.ExchangeType.FANOUT, durable=True)
    dead = await channel.declare_queue(topology.ingest_dead_queue, durable=True)
    await dead.bind(dlx)
    return await channel.declare_queue(
        topology.ingest_queue,
        durable=True,
        arguments={"x-dead-letter-exchange": topology.ingest_dead_exchange},
    )


async def declare_index_events(channel: AbstractChannel, topology: Topology) -> AbstractExchange:
    return await channel.declare_exchange(topology.index_events_exchange, aio_pika.ExchangeType.FANOUT, durable=True)


def message_headers() -> dict[str, Any]:
    """Headers every published message carries: the request id and, when tracing is on, the trace context."""
    headers: dict[str, Any] = {REQUEST_ID_HEADER: current_request_id()}
    inject(headers)
    return headers


def persistent_message(body: bytes, *, message_id: str, type_: str) -> aio_pika.Message:
    """A message that survives a broker restart (once confirmed)."""
    return aio_pika.Message(
        body,
        delivery_mode=DeliveryMode.PERSISTENT,
        content_type="application/x-protobuf",
        message_id=message_id,
        type=type_,
        headers=message_headers(),
    )


@contextlib.contextmanager
def consuming(message: AbstractIncomingMessage, name: str) -> Iterator[None]:
    """Handle a delivery under its publisher's request id and inside its trace."""
    headers = message.headers or {}
    token = request_id_var.set(accept_request_id(headers.get(REQUEST_ID_HEADER)))
    try:
        with span(name, SpanKind.CONSUMER, parent=headers, attributes={"messaging.system": "rabbitmq"}):
            yield
    finally:
        request_id_var.reset(token)
