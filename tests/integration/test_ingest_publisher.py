"""preprocess's side of ingestion: accepted means queued; broker down means 503 and nothing kept."""

from __future__ import annotations

import aio_pika
import pytest
import redis.asyncio as aioredis

from preprocess.documents import Chunker, load_tokenizer
from preprocess.ingest import IngestPublisher
from preprocess.settings import PreprocessSettings
from ragmesh.amqp import Topology
from ragmesh.errors import RagmeshError
from ragmesh.jobs import JobStore
from ragmesh.v1 import ingest_pb2

from ..conftest import delete_topology, free_port, unique_namespace
from .retrieval_harness import CORPUS, documents


async def test_accepted_job_is_on_the_durable_queue(redis_url: str, amqp_url: str) -> None:
    namespace = unique_namespace()
    redis = aioredis.Redis.from_url(redis_url)
    jobs = JobStore(redis, namespace)
    settings = PreprocessSettings(namespace=namespace, redis_url=redis_url, amqp_url=amqp_url)
    publisher = IngestPublisher(settings, Chunker(load_tokenizer(), 16, 4), jobs)
    try:
        try:
            accepted = await publisher.submit("facts", "id-1", documents(*CORPUS))
            assert accepted.documents == 4 and accepted.chunks > 4  # 16-token chunks split these texts
            job = await jobs.get(accepted.job_id)
            assert job is not None and job["status"] == "queued" and job["total"] == accepted.chunks
        finally:
            await publisher.close()
        connection = await aio_pika.connect_robust(amqp_url)
        async with connection:
            channel = await connection.channel()
            queue = await channel.declare_queue(Topology(namespace).ingest_queue, passive=True)
            message = await queue.get(timeout=5)
            assert message.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
            body = ingest_pb2.IngestJob.FromString(message.body)
            assert body.job_id == accepted.job_id and body.collection_id == "id-1"
            assert {c.document_id for c in body.chunks} == {d[0] for d in CORPUS}
            assert all(c.title for c in body.chunks)
            await message.ack()
    finally:
        await delete_topology(amqp_url, namespace)  # a failed run leaves nothing on the broker either
        await redis.aclose()


async def test_broker_down_is_503_and_leaves_no_job(redis_url: str) -> None:
    namespace = unique_namespace()
    redis = aioredis.Redis.from_url(redis_url)
    jobs = JobStore(redis, namespace)
    dead_broker = f"amqp://guest:guest@127.0.0.1:{free_port()}/"
    settings = PreprocessSettings(namespace=namespace, redis_url=redis_url, amqp_url=dead_broker, publish_timeout=3)
    publisher = IngestPublisher(settings, Chunker(load_tokenizer(), 64, 8), jobs)
    with pytest.raises(RagmeshError) as info:
        await publisher.submit("facts", "id-1", documents(*CORPUS))
    assert info.value.http_status == 503 and info.value.retry_after
    assert [key async for key in redis.scan_iter(f"{namespace}:job:*")] == []
    assert (await publisher.check()).startswith("unavailable")
    await publisher.close()
    await redis.aclose()
