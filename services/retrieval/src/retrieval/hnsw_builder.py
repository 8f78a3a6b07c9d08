"""HNSW graphs built in the background, so that no ingestion job pays for one.

Past `hnsw_threshold` chunks a collection searches an HNSW graph over its
first rows plus, exactly, the rows added since (retrieval/index.py). This
builder (re)builds the graph over every row when a snapshot asks for it
(`Snapshot.needs_hnsw`), in a worker thread, without the collection's lock;
the store then swaps it in only if the collection is still the same lineage
(a deletion or a rebuild meanwhile discards it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from retrieval.store import CollectionStore

log = logging.getLogger(__name__)


class HnswBuilder:
    def __init__(self, store: CollectionStore) -> None:
        self._store = store
        self._tasks: dict[str, asyncio.Task[None]] = {}

    def schedule(self, name: str) -> None:
        """Build the collection's graph in the background if it needs one (and none is under way)."""
        snapshot = self._store.local(name)
        if snapshot is None or name in self._tasks or not snapshot.needs_hnsw(self._store.params):
            return
        task = asyncio.create_task(self._run(name), name=f"hnsw-{name}")
        self._tasks[name] = task
        task.add_done_callback(lambda _: self._tasks.pop(name, None))

    async def idle(self) -> None:
        """Until no graph is being built (tests and benchmarks)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks.values()), return_exceptions=True)

    async def _run(self, name: str) -> None:
        try:
            while True:
                snapshot = self._store.local(name)
                if snapshot is None or not snapshot.needs_hnsw(self._store.params):
                    return
                base = await asyncio.to_thread(snapshot.build_hnsw, self._store.params)
                if not await self._store.adopt_hnsw(name, snapshot, base):
                    await asyncio.sleep(0)  # changed meanwhile: look again
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("building the HNSW graph failed; searching exactly meanwhile", extra={"collection": name})

    async def close(self) -> None:
        """Stop building (a graph half-built is not kept)."""
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
