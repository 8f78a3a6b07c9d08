"""The queue-depth metric against the real RabbitMQ."""

from __future__ import annotations

import aio_pika
from prometheus_client import REGISTRY

from preprocess.queue_depth import QueueDepthMonitor
from ragmesh.amqp import REQUEST_ROUTING_KEY, Topology, connect, declare_requests

from ..conftest import unique_namespace


async def test_depths_of_declared_queues_are_polled_and_absent_ones_skipped(amqp_url: str) -> None:
    topology = Topology(unique_namespace())
    connection = await connect(amqp_url)
    monitor = QueueDepthMonitor(amqp_url, topology, interval=0)
    try:
        channel = await connection.channel(publisher_confirms=True)
        await declare_requests(channel, topology)  # the batch queues exist; the ingest ones do not
        exchange = await channel.get_exchange(topology.requests_exchange)
        for i in range(3):
            await exchange.publish(aio_pika.Message(f"line {i}".encode()), routing_key=REQUEST_ROUTING_KEY)
        depths = await monitor.poll()
        assert depths == {"batch.requests": 3, "batch.retry": 0, "batch.dead": 0}
        assert REGISTRY.get_sample_value("ragmesh:queue_depth", {"queue": "batch.requests"}) == 3
        await (await channel.declare_queue(topology.requests_queue, passive=True)).purge()
        assert (await monitor.poll())["batch.requests"] == 0
    finally:
        cleanup = await connection.channel()
        for name in (topology.requests_queue, topology.retry_queue, topology.requests_dead_queue):
            await cleanup.queue_delete(name)
        for name in (topology.requests_exchange, topology.requests_dead_exchange):
            await cleanup.exchange_delete(name)
        await monitor.close()
        await connection.close()
