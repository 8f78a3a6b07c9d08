"""Queue depth of the mesh's RabbitMQ queues as a metric, polled with passive declares.

Every preprocess replica reports the same numbers: aggregate with max(), not sum().
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from aio_pika.abc import AbstractChannel
from prometheus_client import Gauge

from ragmesh.amqp import Topology
from ragmesh.amqp_client import LazyChannel

log = logging.getLogger(__name__)

QUEUE_DEPTH = Gauge("ragmesh:queue_depth", "Messages ready in a mesh queue (polled)", ["queue"])


def watched_queues(topology: Topology) -> dict[str, str]:
    """Metric label -> queue name."""
    return {
        "ingest": topology.ingest_queue,
        "ingest.dead": topology.ingest_dead_queue,
        "batch.requests": topology.requests_queue,
        "batch.retry": topology.retry_queue,
        "batch.dead": topology.requests_dead_queue,
        "index.events.dead": topology.index_events_dead_queue,
    }


class QueueDepthMonitor:
    def __init__(self, amqp_url: str, topology: Topology, interval: float) -> None:
        self._broker = LazyChannel(amqp_url, name=f"{topology.namespace or 'ragmesh'}.preprocess.queue-depth")
        self._queues = watched_queues(topology)
        self._interval = interval
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._interval > 0:
            self._task = asyncio.create_task(self._run())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._broker.close()

    async def poll(self) -> dict[str, int]:
        """Read every queue's depth once (a queue not declared yet is skipped) and set the gauges."""
        connection = await self._broker.connection()
        depths: dict[str, int] = {}
        channel: AbstractChannel | None = None
        for label, name in self._queues.items():
            if channel is None or channel.is_closed:
                channel = await connection.channel()
            try:
                queue = await channel.declare_queue(name, passive=True)
            except Exception:  # noqa: BLE001 - absent queue: the broker closed the channel; the next gets a new one
                continue
            depth = queue.declaration_result.message_count or 0
            QUEUE_DEPTH.labels(label).set(depth)
            depths[label] = depth
        if channel is not None and not channel.is_closed:
            await channel.close()
        return depths

    async def _run(self) -> None:
        while True:
            try:
                await self.poll()
            except Exception as exc:  # noqa: BLE001 - a metric must never take the service down
                log.warning("queue depth poll failed", extra={"error": str(exc)})
            await asyncio.sleep(self._interval)
