"""index.events on the real broker: a change a replica cannot apply is retried with a count,
then dead-lettered, so it never blocks the replica's queue for ever."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aio_pika
import pytest
from prometheus_client import REGISTRY

from ragmesh.amqp import RETRY_HEADER, Topology
from ragmesh.v1 import ingest_pb2, retrieval_pb2
from retrieval.ingestion import Ingestion

from ..conftest import delete_topology, unique_namespace
from .retrieval_harness import documents, eventually, run_publisher, run_replica, wait_job


@pytest.fixture
async def namespace(amqp_url: str) -> AsyncIterator[str]:
    name = unique_namespace()
    yield name
    await delete_topology(amqp_url, name, ("ev",))


async def publish_event(amqp_url: str, namespace: str, event: ingest_pb2.IndexEvent) -> None:
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.get_exchange(Topology(namespace).index_events_exchange)
        await exchange.publish(aio_pika.Message(event.SerializeToString()), routing_key="")


def deleted_event(collection: str) -> ingest_pb2.IndexEvent:
    return ingest_pb2.IndexEvent(
        collection=collection,
        collection_id=f"id-{collection}",
        origin="another-replica",
        deleted=ingest_pb2.CollectionDeleted(),
    )


async def test_an_event_that_keeps_failing_is_retried_then_dead_lettered(
    tmp_path: Path, namespace: str, redis_url: str, amqp_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    attempts: list[str] = []

    async def broken_apply(self: Ingestion, event: ingest_pb2.IndexEvent) -> None:
        attempts.append(event.collection)
        raise OSError("injected: the disk is full")

    monkeypatch.setattr(Ingestion, "_apply", broken_apply)
    async with run_replica(
        tmp_path, "ev", namespace, redis_url, amqp_url, index_event_max_retries=2, index_event_backoff=0.05
    ):
        await publish_event(amqp_url, namespace, deleted_event("doomed"))
        connection = await aio_pika.connect(amqp_url)
        async with connection:
            channel = await connection.channel()
            dead = await channel.get_queue(Topology(namespace).index_events_dead_queue)
            found: list[Any] = []

            async def dead_lettered() -> bool:
                message = await dead.get(fail=False)
                if message is not None:
                    found.append(message)
                    await message.ack()
                return bool(found)

            await eventually(dead_lettered)
    assert attempts == ["doomed"] * 3, "the first try and two retries, then no more"
    assert ingest_pb2.IndexEvent.FromString(found[0].body).collection == "doomed"
    assert found[0].headers[RETRY_HEADER] == 2


async def test_an_event_failing_once_is_applied_on_its_retry(
    tmp_path: Path, namespace: str, redis_url: str, amqp_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_apply = Ingestion._apply
    attempts: list[str] = []

    async def flaky_apply(self: Ingestion, event: ingest_pb2.IndexEvent) -> None:
        attempts.append(event.collection)
        if len(attempts) == 1:
            raise OSError("injected: Redis blinked")
        await real_apply(self, event)

    monkeypatch.setattr(Ingestion, "_apply", flaky_apply)
    applied = REGISTRY.get_sample_value("ragmesh_retrieval_index_events_applied_total", {"change": "deleted"}) or 0.0
    async with run_replica(tmp_path, "ev", namespace, redis_url, amqp_url, index_event_backoff=0.05):
        await publish_event(amqp_url, namespace, deleted_event("flaky"))

        async def applied_once() -> bool:
            now = REGISTRY.get_sample_value("ragmesh_retrieval_index_events_applied_total", {"change": "deleted"})
            return (now or 0.0) == applied + 1

        await eventually(applied_once)
        await asyncio.sleep(0)  # nothing more is delivered: the event was acked once applied
    assert attempts == ["flaky", "flaky"]


async def test_a_job_whose_announcement_meets_a_closed_channel_is_retried_not_failed(
    tmp_path: Path, namespace: str, redis_url: str, amqp_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The job is indexed, then publishing its index.events change finds the publisher's channel
    closed (the broker blinked). That is a dependency failing, not the job: it goes back to the
    queue, the redelivery announces the change (indexing nothing twice) and the job succeeds,
    instead of ending `failed` in ingest.dead while this replica holds chunks no other has."""
    real_announce = Ingestion.announce
    announced: list[str] = []

    async def announce_once_closed(self: Ingestion, event: ingest_pb2.IndexEvent) -> None:
        announced.append(event.WhichOneof("change") or "")
        if announced.count("added") == 1 and event.WhichOneof("change") == "added":
            raise aio_pika.exceptions.ChannelInvalidStateError("injected: the channel is closed")
        await real_announce(self, event)

    monkeypatch.setattr(Ingestion, "announce", announce_once_closed)
    async with (
        run_replica(tmp_path, "ev", namespace, redis_url, amqp_url) as replica,
        run_publisher(namespace, redis_url, amqp_url) as (publisher, jobs),
    ):
        collection = await replica.stub.CreateCollection(retrieval_pb2.CollectionRequest(name="blink"))
        accepted = await publisher.submit("blink", collection.id, documents(("d1", "T", "Some text to index.")))
        job = await wait_job(jobs, accepted.job_id)
        info = await replica.stub.GetCollection(retrieval_pb2.CollectionRequest(name="blink"))
    assert job["status"] == "succeeded", job
    assert announced.count("added") == 2, "announced again on the redelivery"
    assert info.chunks == accepted.chunks, "indexed once"
