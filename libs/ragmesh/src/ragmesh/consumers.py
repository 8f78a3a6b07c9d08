"""Queue consumers that stop cleanly: on SIGTERM take nothing new, settle what is in hand.

A service registers its consumers through one `ConsumerGate`. Draining cancels
every consumer (basic.cancel: the broker delivers nothing more to this
replica), then waits, up to a deadline, for the handlers still running; each
acks or nacks its own message. Whatever is still unacknowledged when the
connection closes goes back to its queue for another replica (at-least-once;
handlers are idempotent).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

from aio_pika.abc import AbstractIncomingMessage, AbstractQueue

log = logging.getLogger(__name__)

Handler = Callable[[AbstractIncomingMessage], Awaitable[None]]


class ConsumerGate:
    """Counts the messages in hand across a service's consumers and stops them on demand."""

    def __init__(self, grace: float) -> None:
        self._grace = grace
        self._deadline: float | None = None
        self._consumers: list[tuple[AbstractQueue, str]] = []
        self._in_hand = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self.draining = False

    @property
    def in_hand(self) -> int:
        return self._in_hand

    async def consume(self, queue: AbstractQueue, handler: Handler) -> bool:
        """Start consuming `queue` (not once draining began); whether it started."""
        if self.draining:
            return False
        tag = await queue.consume(self._counted(handler))
        self._consumers.append((queue, tag))
        return True

    def _counted(self, handler: Handler) -> Handler:
        async def run(message: AbstractIncomingMessage) -> None:
            self._in_hand += 1
            self._idle.clear()
            try:
                await handler(message)
            finally:
                self._in_hand -= 1
                if self._in_hand == 0:
                    self._idle.set()

        return run

    async def stop(self) -> None:
        """Take no new messages; the ones in hand have `grace` seconds from the first stop to finish."""
        if self._deadline is None:
            self._deadline = time.monotonic() + self._grace
        self.draining = True
        consumers, self._consumers = self._consumers, []
        for queue, tag in consumers:
            with contextlib.suppress(Exception):  # a closed channel delivers nothing anyway
                await queue.cancel(tag)

    async def settle(self) -> int:
        """Stop, then wait until no message is in hand or the grace is over; how many are left."""
        await self.stop()
        assert self._deadline is not None
        remaining = self._deadline - time.monotonic()
        if self._in_hand and remaining > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), remaining)
        if self._in_hand:
            log.warning("messages in hand at the end of the grace go back to their queue", extra={"n": self._in_hand})
        return self._in_hand
