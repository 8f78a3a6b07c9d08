"""Retrieval replicas and an ingest publisher running in the test's process, on real Redis and RabbitMQ."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import redis.asyncio as aioredis

from preprocess.documents import Chunker, load_tokenizer
from preprocess.ingest import DocumentsRequest, IngestPublisher
from preprocess.settings import PreprocessSettings
from ragmesh.jobs import JobStore
from ragmesh.v1 import retrieval_pb2, retrieval_pb2_grpc
from retrieval.server import retrieval_service
from retrieval.settings import RetrievalSettings

from ..conftest import free_port, remember_replica
from .conftest import serving


@dataclass
class Replica:
    stub: retrieval_pb2_grpc.RetrievalAsyncStub
    settings: RetrievalSettings
    address: str = ""

    async def search(
        self, collection: str, query: str, mode: int = 0, top_k: int = 5, **kw: bool
    ) -> retrieval_pb2.SearchResponse:
        request = retrieval_pb2.SearchRequest(collection=collection, query=query, top_k=top_k, mode=mode, **kw)  # type: ignore[arg-type]
        return await self.stub.Search(request, timeout=30)


@asynccontextmanager
async def run_replica(
    data_dir: Path, replica_id: str, namespace: str, redis_url: str, amqp_url: str, **overrides: Any
) -> AsyncIterator[Replica]:
    port = free_port()
    remember_replica(namespace, replica_id)  # its events queues leave the broker with the namespace
    settings = RetrievalSettings.model_validate(
        {
            "grpc_port": port,
            "data_dir": str(data_dir),
            "replica_id": replica_id,
            "namespace": namespace,
            "redis_url": redis_url,
            "amqp_url": amqp_url,
            "ingest_batch_size": 4,
            **overrides,
        }
    )
    async with retrieval_service(settings) as service:
        # Ready means consuming: its index.events queue exists from then on.
        deadline = time.monotonic() + 30
        while (await service.ready_check())["rabbitmq"] != "ok":
            assert time.monotonic() < deadline, "replica not ready"
            await asyncio.sleep(0.05)
        async with serving(service.register, port) as channel:
            yield Replica(retrieval_pb2_grpc.RetrievalStub(channel), settings, f"127.0.0.1:{port}")


@asynccontextmanager
async def run_publisher(
    namespace: str, redis_url: str, amqp_url: str
) -> AsyncIterator[tuple[IngestPublisher, JobStore]]:
    settings = PreprocessSettings(namespace=namespace, redis_url=redis_url, amqp_url=amqp_url)
    redis = aioredis.Redis.from_url(redis_url)
    jobs = JobStore(redis, namespace)
    publisher = IngestPublisher(settings, Chunker(load_tokenizer(), 64, 8), jobs)
    try:
        yield publisher, jobs
    finally:
        await publisher.close()
        await redis.aclose()


def documents(*docs: tuple[str, str, str]) -> DocumentsRequest:
    return DocumentsRequest.model_validate({"documents": [{"id": i, "title": t, "text": x} for i, t, x in docs]})


async def wait_job(jobs: JobStore, job_id: str, timeout: float = 60) -> dict[str, object]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = await jobs.get(job_id)
        if job is not None and job["status"] in ("succeeded", "failed"):
            return job
        await asyncio.sleep(0.1)
    raise TimeoutError(f"job {job_id} did not finish")


async def eventually(check: object, timeout: float = 20.0) -> None:
    """Poll an async predicate until it holds."""
    assert callable(check)
    deadline = time.monotonic() + timeout
    while True:
        if await check():
            return
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.1)


CORPUS = (
    ("cats", "Cats", "Cats are small domesticated carnivorous mammals that purr and sleep most of the day."),
    ("rockets", "Rockets", "A rocket engine burns stored propellant and ejects exhaust to produce thrust into orbit."),
    ("bread", "Bread", "Bread is baked from flour, water and yeast; the dough rises before it goes in the oven."),
    ("tides", "Tides", "Ocean tides are caused by the gravitational pull of the moon and the sun on the seas."),
)


def grpc_code(exc: BaseException) -> grpc.StatusCode | None:
    return exc.code() if isinstance(exc, grpc.aio.AioRpcError) else None
