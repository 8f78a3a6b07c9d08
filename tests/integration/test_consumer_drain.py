"""A draining consumer on the real broker: nothing new once paused, the message in hand settled,
what is left unacknowledged at the end of the grace back in the queue."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aio_pika
import pytest
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue

from ragmesh.amqp_client import Handler, SupervisedConsumer

from ..conftest import unique_namespace


@pytest.fixture
async def queue_name(amqp_url: str) -> AsyncIterator[str]:
    name = f"{unique_namespace()}.drain"
    yield name
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        await channel.queue_delete(name)


async def publish(amqp_url: str, name: str, count: int) -> None:
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        await channel.declare_queue(name, durable=True)
        for i in range(count):
            await channel.default_exchange.publish(aio_pika.Message(str(i).encode()), routing_key=name)


async def depth(amqp_url: str, name: str) -> int:
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(name, passive=True)
        return int(queue.declaration_result.message_count or 0)


def consumer(amqp_url: str, name: str, handle: Handler) -> SupervisedConsumer:
    async def declare(channel: AbstractChannel) -> AbstractQueue:
        return await channel.declare_queue(name, durable=True)

    return SupervisedConsumer(amqp_url, name=f"{name}.consumer", prefetch=1, declare=declare, handle=handle)


async def test_a_paused_consumer_takes_nothing_new_and_settles_what_it_holds(amqp_url: str, queue_name: str) -> None:
    await publish(amqp_url, queue_name, 3)
    started, release = asyncio.Event(), asyncio.Event()
    handled: list[bytes] = []

    async def handle(message: AbstractIncomingMessage) -> None:
        started.set()
        await release.wait()
        handled.append(message.body)
        await message.ack()

    running = consumer(amqp_url, queue_name, handle)
    running.start()
    await asyncio.wait_for(started.wait(), 10)  # one message in hand (prefetch 1)
    await running.pause()  # SIGTERM
    assert running.state == "draining"
    release.set()
    await running.stop(grace=10)
    assert handled == [b"0"]  # the one in hand finished and was acked; nothing else was taken
    assert await depth(amqp_url, queue_name) == 2


async def test_a_message_still_in_hand_at_the_end_of_the_grace_goes_back_to_the_queue(
    amqp_url: str, queue_name: str
) -> None:
    await publish(amqp_url, queue_name, 1)
    started = asyncio.Event()
    cancelled = asyncio.Event()

    async def handle(message: AbstractIncomingMessage) -> None:
        started.set()
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    running = consumer(amqp_url, queue_name, handle)
    running.start()
    await asyncio.wait_for(started.wait(), 10)
    await running.pause()
    await running.stop(grace=0.5)
    assert cancelled.is_set()
    assert await depth(amqp_url, queue_name) == 1  # unacknowledged: back for another replica
