"""retrieval's ingest consumer settles every delivery through the shared `settle`, whatever its
handler raised: on real RabbitMQ (a namespace of its own), with a retrieval replica in process."""

from __future__ import annotations

from pathlib import Path

import aio_pika
import pytest

from ragmesh.amqp import Topology, declare_ingest
from ragmesh.jobs import JobStore
from ragmesh.v1 import ingest_pb2, retrieval_pb2

from ..conftest import delete_topology, unique_namespace
from .retrieval_harness import eventually, run_replica


async def test_an_ingest_job_whose_handler_raises_is_dead_lettered_and_ingestion_goes_on(
    tmp_path: Path, redis_url: str, amqp_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    namespace = unique_namespace()
    topology = Topology(namespace)
    # The fault, at a known step: recording a failed job's status raises what nothing expects.
    recorded = JobStore.failed

    async def failed(self: JobStore, job_id: str, error: str) -> None:
        if job_id == "job-raises":
            raise RuntimeError("injected: the job store broke while recording the failure")
        await recorded(self, job_id, error)

    monkeypatch.setattr(JobStore, "failed", failed)
    try:
        async with run_replica(tmp_path / "replica", "s", namespace, redis_url, amqp_url) as replica:
            connection = await aio_pika.connect(amqp_url)
            async with connection:
                channel = await connection.channel()
                await declare_ingest(channel, topology)
                dead = await channel.declare_queue(topology.ingest_dead_queue, durable=True)
                collection = await replica.stub.CreateCollection(retrieval_pb2.CollectionRequest(name="raises"))
                # A job that fails (two chunks with one id), and then fails to record its failure.
                bad = ingest_pb2.IngestJob(
                    job_id="job-raises", collection="raises", collection_id=collection.id, documents=1
                )
                for _ in range(2):
                    bad.chunks.add(chunk_id="x#0", document_id="x", text="same id twice")
                good = ingest_pb2.IngestJob(
                    job_id="job-after", collection="raises", collection_id=collection.id, documents=1
                )
                good.chunks.add(chunk_id="y#0", document_id="y", text="a job after the one that raised")
                for job in (bad, good):
                    await channel.default_exchange.publish(
                        aio_pika.Message(job.SerializeToString(), delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
                        routing_key=topology.ingest_queue,
                    )

                bodies: list[bytes] = []

                async def dead_lettered() -> bool:
                    while (message := await dead.get(fail=False)) is not None:
                        bodies.append(message.body)
                        await message.ack()
                    return bool(bodies)

                await eventually(dead_lettered)
                assert bodies == [bad.SerializeToString()]

                # The consumer (one job at a time) was not left holding an unsettled delivery.
                async def indexed() -> bool:
                    info = await replica.stub.GetCollection(retrieval_pb2.CollectionRequest(name="raises"))
                    return info.chunks == 1

                await eventually(indexed)
    finally:
        await delete_topology(amqp_url, namespace, ("s",))
