"""Time-driven batch work, done by every replica (each step is safe to run twice at once):
batches whose completion window is over end `expired`; batches whose every line is done but
whose ending nobody finished (a worker died, a finalizer's lease ran out) are finished;
batches and files past their retention are deleted."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from preprocess.batches.finalizer import Finalizer
from preprocess.batches.store import BatchStore
from preprocess.files import FileStore

log = logging.getLogger(__name__)


class Sweeper:
    def __init__(
        self, store: BatchStore, files: FileStore, finalizer: Finalizer, interval: float, clock: Callable[[], float]
    ) -> None:
        self._store = store
        self._files = files
        self._finalizer = finalizer
        self._interval = interval
        self._clock = clock
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._interval > 0:
            self._task = asyncio.create_task(self._loop(), name="batch sweeper")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _loop(self) -> None:
        while True:
            try:
                await self.sweep()
            except Exception as exc:  # noqa: BLE001 - Redis away: the next round tries again
                log.warning("batch sweep failed", extra={"error": repr(exc)})
            await asyncio.sleep(self._interval)

    async def sweep(self) -> None:
        """One round of everything time-driven."""
        now = self._clock()
        for batch_id in await self._store.due_expiry(now):
            await self._finalizer.expire(batch_id)
        for batch_id in await self._store.active():
            await self._finalizer.maybe_finalize(batch_id)
        for batch_id in await self._store.due_deletion(now):
            await self._store.delete(batch_id)
        await self._files.sweep(now)
