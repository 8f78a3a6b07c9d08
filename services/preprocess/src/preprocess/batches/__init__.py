"""OpenAI Batches, and the direct queue protocol, over RabbitMQ (see README).

One module per job: `lines` (input files and line messages), `store` (the state machine in
Redis), `api` (the HTTP operations), `worker` (consuming and settling), `direct` (the direct
protocol), `finalizer` (output files and final status), `sweeper` (expiry and retention).
`Batches` wires them for one preprocess replica.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import redis.asyncio as aioredis

from preprocess.batches.api import BatchApi
from preprocess.batches.finalizer import Finalizer
from preprocess.batches.store import BatchStore
from preprocess.batches.sweeper import Sweeper
from preprocess.batches.worker import BatchWorker, Runner
from preprocess.files import FileStore
from preprocess.settings import PreprocessSettings
from ragmesh.amqp import Topology, declare_requests
from ragmesh.amqp_client import LazyChannel

__all__ = ["Batches", "Runner"]


class Batches:
    """One replica's batch side: the API, the workers, the sweeper, sharing one publishing channel."""

    def __init__(
        self,
        settings: PreprocessSettings,
        redis: aioredis.Redis,
        files: FileStore,
        run: Runner,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._settings = settings
        self.files = files
        self.store = BatchStore(redis, settings.namespace)
        topology = Topology(settings.namespace)
        self.publisher = LazyChannel(
            settings.amqp_url,
            name=f"{settings.namespace or 'ragmesh'}.preprocess.batch-publisher",
            declare=lambda channel: declare_requests(channel, topology),
        )
        self.finalizer = Finalizer(self.store, files, settings.batch_retention, clock)
        self.api = BatchApi(settings, self.store, files, self.finalizer, self.publisher, clock)
        self.worker = BatchWorker(settings, self.store, self.finalizer, self.publisher, run, clock)
        self.sweeper = Sweeper(self.store, files, self.finalizer, settings.batch_sweep_interval, clock)
        self._workers_started = False

    def start_workers(self) -> None:
        """Consume the requests queue (retrying until the broker answers) and sweep."""
        if self._settings.batch_workers > 0:
            self.worker.start()
            self._workers_started = True
        self.sweeper.start()

    async def stop_consuming(self) -> None:
        """SIGTERM: take no new lines; the ones in hand go on (until `close`)."""
        if self._workers_started:
            await self.worker.pause()

    async def close(self) -> None:
        """Stop taking lines, let the ones in hand finish (the grace, from the first stop), close."""
        await self.sweeper.close()
        if self._workers_started:
            await self.worker.stop(self._settings.shutdown_grace)
        await self.publisher.close()

    async def check(self) -> str:
        """Whether the batch queue can be published to ("ok" or the reason)."""
        return await self.publisher.check(self._settings.publish_timeout)

    def ready(self) -> dict[str, str]:
        """Readiness of the batch workers: "ok" while this replica consumes lines."""
        return {"batch_workers": self.worker.state} if self._workers_started else {}

    # --- the API (see BatchApi) -----------------------------------------------------------

    async def upload(self, data: bytes, filename: str, purpose: str, owner: str | None) -> dict[str, Any]:
        return await self.api.upload(data, filename, purpose, owner)

    async def create(self, body: Any, owner: str | None) -> dict[str, Any]:
        return await self.api.create(body, owner)

    async def get(self, batch_id: str, owner: str | None) -> dict[str, Any]:
        return await self.api.get(batch_id, owner)

    async def list(self, limit: int, after: str | None, owner: str | None) -> dict[str, Any]:
        return await self.api.list(limit, after, owner)

    async def cancel(self, batch_id: str, owner: str | None) -> dict[str, Any]:
        return await self.api.cancel(batch_id, owner)
