"""AMQP connections that come and go: a publishing channel opened on first use, and a consumer
that keeps itself running (and says when it is not)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aio_pika
from aio_pika.abc import (
    AbstractChannel,
    AbstractConnection,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustConnection,
)

from ragmesh.amqp import connect

log = logging.getLogger(__name__)

# Declares what a channel needs (exchanges, queues); returns the queue to consume, if any.
Declare = Callable[[AbstractChannel], Awaitable[Any]]


class LazyChannel:
    """A robust connection and one channel on it, opened on first use (the broker may come up
    after the service) and opened again when the channel closed. `declare` runs on every new
    channel, so what it publishes to exists."""

    def __init__(
        self,
        url: str,
        *,
        name: str,
        declare: Declare | None = None,
        publisher_confirms: bool = True,
        on_return_raises: bool = False,
    ) -> None:
        self._url = url
        self._name = name
        self._declare = declare
        self._confirms = publisher_confirms
        self._on_return_raises = on_return_raises
        self._connection: AbstractRobustConnection | None = None
        self._channel: AbstractChannel | None = None
        self._lock = asyncio.Lock()

    async def connection(self) -> AbstractRobustConnection:
        """The connection, made on first use."""
        async with self._lock:
            return await self._connect()

    async def _connect(self) -> AbstractRobustConnection:
        if self._connection is None:
            self._connection = await connect(self._url, self._name)
        return self._connection

    async def get(self) -> AbstractChannel:
        """The channel, (re)opened and declared as needed."""
        async with self._lock:
            connection = await self._connect()
            if self._channel is None or self._channel.is_closed:
                try:
                    channel = await connection.channel(
                        publisher_confirms=self._confirms, on_return_raises=self._on_return_raises
                    )
                except RuntimeError as exc:
                    # While the robust connection reconnects (the broker closed it), aiormq refuses
                    # a new channel with a bare RuntimeError: a dependency failure, which callers
                    # retry or requeue (TRANSIENT_ERRORS), not a bug that dead-letters a message.
                    raise ConnectionError(f"the AMQP connection is closed: {exc}") from exc
                if self._declare is not None:
                    await self._declare(channel)
                self._channel = channel
            return self._channel

    async def check(self, timeout: float) -> str:  # noqa: ASYNC109 - a readiness probe's budget
        """Readiness: "ok" once the broker answered and the declarations passed, else the reason."""
        try:
            await asyncio.wait_for(self.get(), timeout=timeout)
        except Exception as exc:  # noqa: BLE001 - reported, not raised
            return f"unavailable: {exc!r}"
        return "ok"

    async def close(self) -> None:
        if self._connection is not None:
            await self._connection.close()
            self._connection = self._channel = None


Handler = Callable[[AbstractIncomingMessage], Awaitable[None]]


class SupervisedConsumer:
    """Consumes one queue for as long as the service runs.

    A loop owns the connection: connect, open a channel, set the prefetch, declare, consume,
    then wait until the connection or the channel closes; any failure of any step is logged and
    the loop starts over after `retry_delay`. `state` is "ok" only while a consumer is
    registered, so readiness can say when this replica takes no messages. Handlers run as the
    broker delivers (one task each, at most `prefetch` at once); `stop` drains them.
    """

    def __init__(
        self,
        url: str,
        *,
        name: str,
        prefetch: int,
        declare: Callable[[AbstractChannel], Awaitable[AbstractQueue]],
        handle: Handler,
        retry_delay: float = 2.0,
    ) -> None:
        self._url = url
        self._name = name
        self._prefetch = prefetch
        self._declare = declare
        self._handle = handle
        self._retry_delay = retry_delay
        self._task: asyncio.Task[None] | None = None
        self._connection: AbstractConnection | None = None
        self._queue: AbstractQueue | None = None
        self._tag: str | None = None
        self._handlers: set[asyncio.Task[Any]] = set()
        # Set once the service drains (SIGTERM): nothing new is consumed, even after a reconnect.
        self._paused_at: float | None = None
        self.state = "starting"

    def start(self) -> None:
        self._task = asyncio.create_task(self._supervise(), name=f"consumer {self._name}")

    async def _supervise(self) -> None:
        while True:
            try:
                await self._consume_until_closed()
                self.state = "down: the connection or channel closed"
                log.warning("consumer lost its channel; starting over", extra={"consumer": self._name})
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - every failure is retried; readiness shows it
                self.state = f"down: {exc!r}"
                log.warning("consumer down; retrying", extra={"consumer": self._name, "error": repr(exc)})
            finally:
                await self._drop_connection()
            await asyncio.sleep(self._retry_delay)

    async def _consume_until_closed(self) -> None:
        self._connection = await aio_pika.connect(
            self._url, timeout=10, client_properties={"connection_name": self._name}
        )
        channel = await self._connection.channel()
        await channel.set_qos(prefetch_count=self._prefetch)
        self._queue = await self._declare(channel)
        if self._paused_at is not None:
            return  # draining: declared, never consumed
        self._tag = await self._queue.consume(self._dispatch)
        self.state = "ok"
        log.info("consuming", extra={"consumer": self._name, "queue": self._queue.name, "prefetch": self._prefetch})
        closed = [asyncio.ensure_future(self._connection.closed()), asyncio.ensure_future(channel.closed())]
        try:
            await asyncio.wait(closed, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in closed:
                waiter.cancel()

    async def _dispatch(self, message: AbstractIncomingMessage) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._handlers.add(task)
        try:
            await self._handle(message)
        finally:
            if task is not None:
                self._handlers.discard(task)

    async def _drop_connection(self) -> None:
        connection, self._connection, self._queue, self._tag = self._connection, None, None, None
        if connection is not None and not connection.is_closed:
            with contextlib.suppress(Exception):
                await connection.close()

    async def pause(self) -> None:
        """Take no more messages (basic.cancel); the handlers in hand go on, their channel open."""
        if self._paused_at is None:
            self._paused_at = time.monotonic()
        queue, tag = self._queue, self._tag
        self._tag = None
        if queue is not None and tag is not None:
            with contextlib.suppress(Exception):
                await queue.cancel(tag)
        self.state = "draining"

    async def stop(self, grace: float = 5.0) -> None:
        """Take no more messages, give the handlers in hand `grace` seconds (counted from `pause`,
        when it came first) to finish and settle their messages, then cancel them (their messages
        go back to the queue with the connection) and close."""
        await self.pause()
        assert self._paused_at is not None
        remaining = self._paused_at + grace - time.monotonic()
        if self._handlers:
            _, pending = await asyncio.wait(set(self._handlers), timeout=max(0.0, remaining))
            for task in pending:
                task.cancel()
            if pending:
                log.warning(
                    "messages in hand at the end of the grace go back to their queue",
                    extra={"consumer": self._name, "messages": len(pending)},
                )
                await asyncio.wait(pending, timeout=1.0)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._drop_connection()
        self.state = "stopped"
