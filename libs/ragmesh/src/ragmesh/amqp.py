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

    def index_events_retry_queue(self, replica_id: str) -> str:
        """A replica's events waiting out a backoff before they are tried again."""
        return self._name(f"index.events.{replica_id}.retry")

    @property
    def index_events_dead_exchange(self) -> str:
        return self._name("index.events.dlx")

    @property
    def index_events_dead_queue(self) -> str:
        """Events a replica gave up on (every replica's), kept for inspection."""
        return self._name("index.events.dead")

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
    def requests_dead_exchange(self) -> str:
        return self._name("batch.dlx")

    @property
    def requests_dead_queue(self) -> str:
        return self._name("batch.dead")

    def queues(self, replica_ids: tuple[str, ...] = ()) -> list[str]:
        """Every queue of the mesh's topology (index.events queues for these replicas)."""
        names = [
            self.ingest_queue,
            self.ingest_dead_queue,
            self.requests_queue,
            self.retry_queue,
            self.requests_dead_queue,
            self.index_events_dead_queue,
        ]
        for replica in replica_ids:
            names += [self.index_events_queue(replica), self.index_events_retry_queue(replica)]
        return names

    def exchanges(self) -> list[str]:
        """Every exchange of the mesh's topology."""
        return [
            self.ingest_dead_exchange,
            self.index_events_exchange,
            self.index_events_dead_exchange,
            self.requests_exchange,
            self.requests_dead_exchange,
        ]


# Routing key of the requests exchange that reaches the batch workers.
REQUEST_ROUTING_KEY = "request"


async def declare_requests(channel: AbstractChannel, topology: Topology) -> AbstractQueue:
    """The requests exchange and queue, the retry (delay) queue, and the dead-letter exchange and
    queue: a message rejected without requeue (poison, or out of retries) is moved to
    `batch.dead` by the broker itself, so no republish can fail and lose it."""
    exchange = await channel.declare_exchange(topology.requests_exchange, aio_pika.ExchangeType.DIRECT, durable=True)
    dlx = await channel.declare_exchange(topology.requests_dead_exchange, aio_pika.ExchangeType.FANOUT, durable=True)
    dead = await channel.declare_queue(topology.requests_dead_queue, durable=True)
    await dead.bind(dlx)
    queue = await channel.declare_queue(
        topology.requests_queue, durable=True, arguments={"x-dead-letter-exchange": topology.requests_dead_exchange}
    )
    await queue.bind(exchange, REQUEST_ROUTING_KEY)
    await channel.declare_queue(
        topology.retry_queue,
        durable=True,
        arguments={
            "x-dead-letter-exchange": topology.requests_exchange,
            "x-dead-letter-routing-key": REQUEST_ROUTING_KEY,
        },
    )
    return queue


async def connect(url: str, name: str = "ragmesh") -> AbstractRobustConnection:
    """A robust connection: it reconnects by itself and restores its consumers. `name` shows in
    the broker's connection list (and lets an operator, or a test, close that one connection)."""
    return await aio_pika.connect_robust(url, timeout=10, client_properties={"connection_name": name})


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


# A replica gone for a week is gone for good: its queues go too.
REPLICA_QUEUE_EXPIRES_MS = 7 * 24 * 3600 * 1000


async def declare_replica_events(channel: AbstractChannel, topology: Topology, replica_id: str) -> AbstractQueue:
    """A replica's own durable queue on the index.events fanout, its retry (delay) queue, and the
    dead-letter exchange and queue shared by every replica (events a replica gave up on)."""
    events = await declare_index_events(channel, topology)
    dlx = await channel.declare_exchange(
        topology.index_events_dead_exchange, aio_pika.ExchangeType.FANOUT, durable=True
    )
    dead = await channel.declare_queue(topology.index_events_dead_queue, durable=True)
    await dead.bind(dlx)
    mine = topology.index_events_queue(replica_id)
    queue = await channel.declare_queue(
        mine,
        durable=True,
        arguments={
            "x-expires": REPLICA_QUEUE_EXPIRES_MS,
            "x-dead-letter-exchange": topology.index_events_dead_exchange,
        },
    )
    await queue.bind(events)
    await channel.declare_queue(
        topology.index_events_retry_queue(replica_id),
        durable=True,
        # Expired messages go back to this replica's queue only (through the default exchange).
        arguments={
            "x-expires": REPLICA_QUEUE_EXPIRES_MS,
            "x-dead-letter-exchange": "",
            "x-dead-letter-routing-key": mine,
        },
    )
    return queue


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


# --- retries and settling ---------------------------------------------------------------

# Times a message was tried again (published anew through a retry queue with this header).
RETRY_HEADER = "x-ragmesh-retries"
# Exceptions that say a dependency (the broker, Redis, a socket) failed, not the message.
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    ConnectionError,
    TimeoutError,
    OSError,
    aio_pika.exceptions.AMQPError,
    # Publishing on a channel the broker closed (a RuntimeError, not an AMQPError).
    aio_pika.exceptions.ChannelInvalidStateError,
)


def retries_of(message: AbstractIncomingMessage) -> int:
    """How many times this message was already retried (0 for a first delivery)."""
    value = (message.headers or {}).get(RETRY_HEADER, 0)
    return int(value) if isinstance(value, int | str) and str(value).isdigit() else 0


def backoff_seconds(attempt: int, base: float, cap: float) -> float:
    """Exponential backoff for the `attempt`-th retry (1-based), at most `cap`."""
    return float(min(cap, base * 2 ** (attempt - 1)))


def retry_copy(message: AbstractIncomingMessage, attempt: int, delay: float) -> aio_pika.Message:
    """A persistent copy of `message` for a retry queue: it expires after `delay` seconds (back
    into its queue) and carries its retry count."""
    return aio_pika.Message(
        message.body,
        delivery_mode=DeliveryMode.PERSISTENT,
        content_type=message.content_type,
        message_id=message.message_id,
        correlation_id=message.correlation_id,
        reply_to=message.reply_to,
        type=message.type,
        headers={**(message.headers or {}), RETRY_HEADER: attempt},
        expiration=max(delay, 0.001),
    )


async def settle(message: AbstractIncomingMessage, *, ack: bool = False, requeue: bool = False) -> None:
    """Ack, requeue (nack) or dead-letter (reject) a delivery. A channel already gone settles it
    for us (the broker requeues what was not acked), so that failure is only logged."""
    try:
        if ack:
            await message.ack()
        elif requeue:
            await message.nack(requeue=True)
        else:
            await message.reject(requeue=False)
    except Exception as exc:  # noqa: BLE001 - the broker requeues unsettled deliveries of a lost channel
        log.info("delivery not settled: its channel is gone", extra={"error": repr(exc)})
