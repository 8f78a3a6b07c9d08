"""Who gets the embedded engine's slots: admission, interactive-first slots, batch preemption.

- Admission: at most `max_concurrent` choices admitted (running or waiting for a slot); past
  that, 503 overloaded. Released from the worker threads, hence the lock.
- Slots (`n_parallel`, touched on the event loop only): each running choice holds a `Slot`
  from the moment its thread starts until the thread is done with it. A choice told to stop
  (cancelled, or preempted) is `leaving`: it still holds its slot until its next token.
- Batch choices wait for room interactive traffic leaves free: while interactive traffic is
  about (a request in the last `reserve_seconds`), `reserved_slots` stay free for it (batch
  always keeps one). Waiters wake when a slot is vacated and when the reserve window ends (a
  timer), so no slot sits idle because nobody looked.
- An interactive request that finds no slot free (counting the leaving ones as free soon)
  preempts the newest batch choices, just enough of them.

No xllamacpp here: unit tests drive it with plain threading events and a clock.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from prometheus_client import Counter, Gauge

from ragmesh.errors import ErrorKind, RagmeshError

ACTIVE_REQUESTS = Gauge("ragmesh_inference_active_requests", "Engine requests running or waiting for a slot")
PREEMPTIONS = Counter(
    "ragmesh_inference_batch_preemptions_total", "Batch choices stopped to give their slot to an interactive request"
)


@dataclass(eq=False)
class Slot:
    """One running choice's hold on an engine slot."""

    batch: bool
    # Tells the choice's thread to stop at its next token.
    stop: threading.Event = field(default_factory=threading.Event)
    leaving: bool = False  # told to stop, still in its slot until its next token
    preempted: bool = False  # stopped for an interactive request: the batch choice starts over


class SlotScheduler:
    def __init__(
        self,
        n_parallel: int,
        max_concurrent: int,
        reserved_slots: int,
        reserve_seconds: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.n_parallel = n_parallel
        self._max_concurrent = max_concurrent
        self._reserved = max(0, min(reserved_slots, n_parallel - 1))
        self._reserve_seconds = reserve_seconds
        self._clock = clock
        self._admitted = 0
        self._admitted_lock = threading.Lock()
        self._slots: list[Slot] = []  # oldest first
        self._waiters: list[asyncio.Future[None]] = []
        self._timer: asyncio.TimerHandle | None = None
        self._last_interactive = -float("inf")

    # --- admission (any thread) ---------------------------------------------------------

    @property
    def active(self) -> int:
        """Choices admitted and not yet finished (running or waiting for a slot)."""
        with self._admitted_lock:
            return self._admitted

    def admit(self, n: int) -> None:
        with self._admitted_lock:
            if self._admitted + n > self._max_concurrent:
                raise RagmeshError(
                    ErrorKind.UNAVAILABLE, "The engine is overloaded; retry shortly.", code="overloaded", retry_after=1
                )
            self._admitted += n
        ACTIVE_REQUESTS.inc(n)

    def release(self) -> None:
        with self._admitted_lock:
            self._admitted -= 1
        ACTIVE_REQUESTS.dec()

    # --- slots (event loop) -----------------------------------------------------------------

    def in_slots(self) -> int:
        """Choices generating in a slot (those past the slot count queue inside llama.cpp)."""
        return min(self.n_parallel, len(self._slots))

    def running(self, batch: bool) -> int:
        """Batch (or interactive) choices holding a slot now."""
        return sum(1 for s in self._slots if s.batch == batch)

    def quiet(self) -> None:
        """As if no interactive request came within the reserve window (tests, benchmarks)."""
        self._last_interactive = -float("inf")
        self._wake()

    def occupy(self, batch: bool) -> Slot:
        """A choice's thread starts: it holds a slot until `vacate`."""
        slot = Slot(batch)
        self._slots.append(slot)
        return slot

    def stop(self, slot: Slot) -> None:
        """Tell a choice to stop (its caller went away): it leaves its slot at its next token."""
        slot.stop.set()
        slot.leaving = slot in self._slots

    def vacate(self, slot: Slot) -> None:
        """The choice's thread is done with its slot: batch waiters look again."""
        if slot in self._slots:
            self._slots.remove(slot)
        slot.leaving = False
        self._wake()

    def interactive_arrived(self) -> None:
        self._last_interactive = self._clock()

    def batch_room(self) -> int:
        """Slots batch work may take now. While interactive traffic is about, the reserved slots
        stay free for it; with none, batch takes them all."""
        return self.n_parallel - self._reserved_now() - len(self._slots)

    def _reserved_now(self) -> int:
        return self._reserved if self._reserve_left() > 0 else 0

    def _reserve_left(self) -> float:
        return self._last_interactive + self._reserve_seconds - self._clock()

    async def wait_for_batch_room(self) -> None:
        loop = asyncio.get_running_loop()
        while self.batch_room() < 1:
            if self.n_parallel - len(self._slots) >= 1:
                # Only the reservation stands in the way: look again when it ends.
                self._arm_timer(loop, self._reserve_left())
            waiter: asyncio.Future[None] = loop.create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            finally:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)

    def _arm_timer(self, loop: asyncio.AbstractEventLoop, delay: float) -> None:
        when = loop.time() + max(0.0, delay)
        if self._timer is not None and not self._timer.cancelled() and abs(self._timer.when() - when) < 0.001:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer = loop.call_at(when, self._wake)

    def _wake(self) -> None:
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)

    def preempt_for(self, n: int) -> list[Slot]:
        """Stop the newest batch choices (least work lost) until `n` interactive choices have slots.

        A choice already leaving counts as a free slot, so no more are stopped than needed. A
        stopped batch choice has sent nothing to its caller (batch output is held back until it
        is complete); it waits for a slot again and starts over.
        """
        free = self.n_parallel - sum(1 for s in self._slots if not s.leaving)
        victims: list[Slot] = []
        candidates = [s for s in reversed(self._slots) if s.batch and not s.leaving]
        while free < n and candidates:
            victim = candidates.pop(0)
            victim.preempted = True
            self.stop(victim)
            victims.append(victim)
            free += 1
            PREEMPTIONS.inc()
        return victims
