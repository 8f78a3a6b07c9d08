"""Batch replicas running in the test's process on the real Redis and RabbitMQ, and the faults
the race tests inject into them.

A replica is the `Batches` object preprocess builds (API + workers), given its own Redis
client: a `FaultyRedis` runs hooks before or after the commands it sends, which is how a
test stops a replica at an exact step (before it writes a status, right after it stored a
result) without sleeping. Lines run through a fake runner (`FakeRunner`) the test can hold.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import Any

import orjson
import redis.asyncio as aioredis
from prometheus_client import REGISTRY

from preprocess.batches import Batches
from preprocess.files import FileStore
from preprocess.settings import PreprocessSettings

FINAL = ("completed", "failed", "cancelled", "expired")

# A hook gets the command's arguments (and, after it ran, its reply).
Hook = Callable[[tuple[Any, ...], Any], Awaitable[None]]


class FaultyRedis(aioredis.Redis):
    """A Redis client that runs the test's hooks around every command it sends."""

    before: list[Hook]
    after: list[Hook]

    async def execute_command(self, *args: Any, **options: Any) -> Any:
        for hook in list(getattr(self, "before", [])):
            await hook(args, None)
        reply = await super().execute_command(*args, **options)  # type: ignore[no-untyped-call]
        for hook in list(getattr(self, "after", [])):
            await hook(args, reply)
        return reply


def faulty_redis(url: str) -> FaultyRedis:
    pool = aioredis.ConnectionPool.from_url(url, socket_timeout=2, socket_connect_timeout=2)
    client = FaultyRedis(connection_pool=pool)
    client.auto_close_connection_pool = True  # its pool goes with it
    client.before, client.after = [], []
    return client


def writes_status(args: tuple[Any, ...], status: str) -> bool:
    """Whether a command sets a batch's status to `status` (a whole JSON object, or a script's argument)."""
    value = status.encode()
    return any(
        (a if isinstance(a, bytes) else str(a).encode()) in (value, b"status=" + value)
        or b'"status":"' + value + b'"' in (a if isinstance(a, bytes) else str(a).encode())
        for a in args
    )


def mentions(args: tuple[Any, ...], *needles: str) -> bool:
    """Whether a command's arguments contain every one of `needles` (bytes or text)."""
    text = b" ".join(a if isinstance(a, bytes) else str(a).encode() for a in args)
    return all(n.encode() in text for n in needles)


class FakeClock:
    """Wall time the test moves by hand (expiry, retention)."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


class FakeRunner:
    """Answers batch lines like the mesh would (embeddings), counting calls; `gate` holds them."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self.gate: asyncio.Event | None = None
        self.started = asyncio.Event()

    async def __call__(self, url: str, body: dict[str, Any], owner: str | None = None) -> dict[str, Any]:
        self.calls[str(body.get("input"))] += 1
        self.started.set()
        if self.gate is not None:
            await self.gate.wait()
        return {"object": "list", "data": [{"object": "embedding", "index": 0, "embedding": [0.5]}], "model": "m"}


def embedding_lines(n: int, prefix: str = "l") -> bytes:
    lines = [
        {
            "custom_id": f"{prefix}{i}",
            "method": "POST",
            "url": "/v1/embeddings",
            "body": {"model": "m", "input": f"t{i}"},
        }
        for i in range(n)
    ]
    return b"".join(orjson.dumps(line) + b"\n" for line in lines)


def settings_for(namespace: str, redis_url: str, amqp_url: str, files_dir: Path, **extra: Any) -> PreprocessSettings:
    return PreprocessSettings(
        namespace=namespace,
        redis_url=redis_url,
        amqp_url=amqp_url,
        files_dir=str(files_dir),
        batch_backoff_base=0.05,
        batch_backoff_max=0.2,
        **{"auth": "off", **extra},
    )


@asynccontextmanager
async def replica(
    settings: PreprocessSettings,
    redis: aioredis.Redis,
    run: Any,
    *,
    workers: bool = True,
    clock: Callable[[], float] | None = None,
) -> AsyncIterator[Batches]:
    """One preprocess replica's batch side (its workers consuming when `workers`)."""
    files = FileStore(redis, Path(settings.files_dir), settings.namespace, settings.batch_retention)
    batches = (
        Batches(settings, redis, files, run) if clock is None else Batches(settings, redis, files, run, clock=clock)
    )
    if workers:
        batches.start_workers()
    try:
        yield batches
    finally:
        with suppress(Exception):
            await asyncio.wait_for(batches.close(), 20)
        with suppress(Exception):
            await redis.aclose()


async def submit(api: Batches, data: bytes, endpoint: str = "/v1/embeddings", **extra: Any) -> dict[str, Any]:
    uploaded = await api.upload(data, "lines.jsonl", "batch", None)
    return await api.create({"input_file_id": uploaded["id"], "endpoint": endpoint, **extra}, None)


async def wait_final(api: Batches, batch_id: str, timeout: float = 30) -> dict[str, Any]:
    """The batch once it reached a final status (polls, as a client does)."""
    deadline = time.monotonic() + timeout
    while True:
        batch = await api.get(batch_id, None)
        if batch["status"] in FINAL:
            return batch
        assert time.monotonic() < deadline, f"batch stuck: {batch['status']} {batch['request_counts']}"
        await asyncio.sleep(0.05)


async def until(predicate: Callable[[], Awaitable[bool]], timeout: float = 30, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not await predicate():
        assert time.monotonic() < deadline, f"{what} not reached"
        await asyncio.sleep(0.02)


def running_lines() -> float:
    return REGISTRY.get_sample_value("ragmesh_preprocess_batch_lines_running") or 0.0


def file_contents(files_dir: Path) -> list[bytes]:
    return [p.read_bytes() for p in sorted(files_dir.glob("*.jsonl"))]


def output_records(files_dir: Path) -> list[dict[str, Any]]:
    """Every result record in every output or error file on disk (input files have no `response`)."""
    records = []
    for data in file_contents(files_dir):
        for line in data.splitlines():
            record = orjson.loads(line)
            if "response" in record:
                records.append(record)
    return records
