"""Retrieval on real Redis, RabbitMQ and the real embedding model, over real gRPC.

Documents go in the way preprocess sends them (IngestPublisher: cleaning,
chunking, a confirmed publish to the ingest queue); replicas run in this
process with their own data folders.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import aio_pika
import grpc
import numpy as np
import pytest
from prometheus_client import REGISTRY

from ragmesh.amqp import Topology, declare_ingest
from ragmesh.errors import from_rpc_error
from ragmesh.jobs import JobStore
from ragmesh.v1 import ingest_pb2, retrieval_pb2

from ..conftest import delete_topology, free_port, unique_namespace
from .retrieval_harness import CORPUS, Replica, documents, eventually, run_publisher, run_replica, wait_job

DENSE, SPARSE, HYBRID = (
    retrieval_pb2.SEARCH_MODE_DENSE,
    retrieval_pb2.SEARCH_MODE_SPARSE,
    retrieval_pb2.SEARCH_MODE_HYBRID,
)


@pytest.fixture(scope="module")
async def namespace(amqp_url: str) -> AsyncIterator[str]:
    name = unique_namespace()
    yield name
    await delete_topology(amqp_url, name, ("a", "b", "c", "d"))


@pytest.fixture(scope="module")
async def replica(
    tmp_path_factory: pytest.TempPathFactory, namespace: str, redis_url: str, amqp_url: str
) -> AsyncIterator[Replica]:
    async with run_replica(tmp_path_factory.mktemp("replica-a"), "a", namespace, redis_url, amqp_url) as r:
        yield r


@pytest.fixture(scope="module")
async def publisher(namespace: str, redis_url: str, amqp_url: str) -> AsyncIterator[tuple[object, JobStore]]:
    async with run_publisher(namespace, redis_url, amqp_url) as pair:
        yield pair


async def create(replica: Replica, name: str) -> retrieval_pb2.Collection:
    return await replica.stub.CreateCollection(retrieval_pb2.CollectionRequest(name=name))


async def ingest(
    publisher: tuple[object, JobStore], collection: retrieval_pb2.Collection, *docs: tuple[str, str, str]
) -> dict[str, object]:
    pub, jobs = publisher
    accepted = await pub.submit(collection.name, collection.id, documents(*docs))  # type: ignore[attr-defined]
    return await wait_job(jobs, accepted.job_id)


async def test_collection_lifecycle(replica: Replica) -> None:
    created = await create(replica, "life")
    assert created.name == "life" and created.id and created.chunks == 0
    with pytest.raises(grpc.aio.AioRpcError) as dup:
        await create(replica, "life")
    assert dup.value.code() == grpc.StatusCode.ALREADY_EXISTS and from_rpc_error(dup.value).http_status == 409
    listed = await replica.stub.ListCollections(retrieval_pb2.ListCollectionsRequest())
    assert "life" in [c.name for c in listed.collections]
    await replica.stub.DeleteCollection(retrieval_pb2.CollectionRequest(name="life"))
    for call in (replica.stub.GetCollection, replica.stub.DeleteCollection):
        with pytest.raises(grpc.aio.AioRpcError) as gone:
            await call(retrieval_pb2.CollectionRequest(name="life"))
        assert gone.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as bad:
        await create(replica, "no spaces/allowed")
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_ingest_then_search_in_every_mode(replica: Replica, publisher: tuple[object, JobStore]) -> None:
    collection = await create(replica, "facts")
    job = await ingest(publisher, collection, *CORPUS)
    assert job["status"] == "succeeded", job
    assert job["done"] == job["total"] == 4 and job["documents"] == 4
    for mode, query, expected in (
        (DENSE, "what makes a spacecraft fly", "rockets"),
        (SPARSE, "flour yeast dough", "bread"),
        (HYBRID, "why does the sea level rise and fall with the moon", "tides"),
    ):
        reply = await replica.search("facts", query, mode)
        assert reply.hits[0].document_id == expected, (mode, [h.document_id for h in reply.hits])
        assert reply.hits[0].title and reply.hits[0].text and reply.hits[0].chunk_id.startswith(expected + "#")
    sparse = await replica.search("facts", "flour yeast dough", SPARSE, top_k=10)
    assert [h.document_id for h in sparse.hits] == ["bread"]  # no shared term, no hit
    info = await replica.stub.GetCollection(retrieval_pb2.CollectionRequest(name="facts"))
    assert (info.documents, info.chunks, info.index_type) == (4, 4, "flat")


async def test_result_cache_and_its_invalidation(replica: Replica, publisher: tuple[object, JobStore]) -> None:
    collection = await create(replica, "cached")
    await ingest(publisher, collection, CORPUS[0])
    first = await replica.search("cached", "volcano eruptions")
    again = await replica.search("cached", "volcano eruptions")
    assert not first.cached and again.cached
    assert [h.chunk_id for h in again.hits] == [h.chunk_id for h in first.hits]
    assert not (await replica.search("cached", "volcano eruptions", no_cache=True)).cached
    await ingest(publisher, collection, ("volcano", "Volcanoes", "Volcano eruptions throw lava and ash into the air."))
    after = await replica.search("cached", "volcano eruptions")
    assert not after.cached and after.index_version > first.index_version
    assert after.hits[0].document_id == "volcano"


async def test_same_document_id_replaces_the_document(replica: Replica, publisher: tuple[object, JobStore]) -> None:
    collection = await create(replica, "upsert")
    await ingest(publisher, collection, ("d1", "Old", "The old text about pottery and clay."))
    await ingest(publisher, collection, ("d1", "New", "The new text about sailing boats."))
    reply = await replica.search("upsert", "pottery clay sailing boats", top_k=10)
    assert [(h.document_id, h.title) for h in reply.hits] == [("d1", "New")]


async def test_job_for_a_deleted_collection_fails_cleanly(replica: Replica, publisher: tuple[object, JobStore]) -> None:
    collection = await create(replica, "ephemeral")
    await replica.stub.DeleteCollection(retrieval_pb2.CollectionRequest(name="ephemeral"))
    job = await ingest(publisher, collection, CORPUS[0])
    assert job["status"] == "failed" and "deleted" in str(job["error"])


async def test_poison_messages_are_dead_lettered(
    replica: Replica, namespace: str, amqp_url: str, redis_url: str
) -> None:
    topology = Topology(namespace)
    connection = await aio_pika.connect_robust(amqp_url)
    async with connection:
        channel = await connection.channel()
        await declare_ingest(channel, topology)
        dead = await channel.declare_queue(topology.ingest_dead_queue, durable=True)
        await channel.default_exchange.publish(
            aio_pika.Message(b"\xff not a protobuf"), routing_key=topology.ingest_queue
        )
        # A well-formed job that cannot be indexed: two chunks with the same id.
        collection = await create(replica, "poison")
        job = ingest_pb2.IngestJob(job_id="job-poison", collection="poison", collection_id=collection.id, documents=1)
        for _ in range(2):
            job.chunks.add(chunk_id="x#0", document_id="x", text="same id twice")
        import redis.asyncio as aioredis

        redis = aioredis.Redis.from_url(redis_url)
        jobs = JobStore(redis, namespace)
        await jobs.create("job-poison", "poison", 1, 2)
        await channel.default_exchange.publish(
            aio_pika.Message(job.SerializeToString()), routing_key=topology.ingest_queue
        )
        failed = await wait_job(jobs, "job-poison")
        assert failed["status"] == "failed" and "chunk" in str(failed["error"])
        await redis.aclose()

        bodies: list[bytes] = []

        async def two_dead() -> bool:
            while (message := await dead.get(fail=False)) is not None:
                bodies.append(message.body)
                await message.ack()
            return len(bodies) >= 2

        await eventually(two_dead)
        assert b"\xff not a protobuf" in bodies and job.SerializeToString() in bodies
    # The collection was not touched by the failed job.
    info = await replica.stub.GetCollection(retrieval_pb2.CollectionRequest(name="poison"))
    assert info.chunks == 0


async def test_embed(replica: Replica) -> None:
    reply = await replica.stub.Embed(retrieval_pb2.EmbedRequest(inputs=["same text", "same text", "other"]))
    vectors = np.frombuffer(reply.vectors, dtype="<f4").reshape(3, reply.dimensions)
    assert reply.dimensions == 384 and reply.model == "all-MiniLM-L6-v2" and reply.prompt_tokens > 0
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert np.array_equal(vectors[0], vectors[1]) and not np.array_equal(vectors[0], vectors[2])
    again = await replica.stub.Embed(retrieval_pb2.EmbedRequest(inputs=["same text"]))
    assert np.array_equal(np.frombuffer(again.vectors, dtype="<f4"), vectors[0])
    for inputs in ([], ["word " * 400], [""]):
        with pytest.raises(grpc.aio.AioRpcError) as bad:
            await replica.stub.Embed(retrieval_pb2.EmbedRequest(inputs=inputs))
        assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_two_replicas_converge_through_index_events(
    tmp_path: Path, namespace: str, redis_url: str, amqp_url: str, publisher: tuple[object, JobStore], replica: Replica
) -> None:
    async with run_replica(tmp_path / "b", "b", namespace, redis_url, amqp_url) as other:
        collection = await create(other, "shared")
        await ingest(publisher, collection, *CORPUS)  # whichever replica takes the job, both must get it

        async def both_have_it() -> bool:
            hits = [
                await r.search("shared", "rocket propellant thrust", DENSE, no_cache=True) for r in (replica, other)
            ]
            return all(h.hits and h.hits[0].document_id == "rockets" for h in hits)

        await eventually(both_have_it)
        # A deletion is visible on every replica at once (the registry), before any event arrives.
        await replica.stub.DeleteCollection(retrieval_pb2.CollectionRequest(name="shared"))
        with pytest.raises(grpc.aio.AioRpcError) as gone:
            await other.search("shared", "rocket")
        assert gone.value.code() == grpc.StatusCode.NOT_FOUND


async def test_restart_keeps_collections_and_redis_down_still_searches(
    tmp_path: Path, namespace: str, redis_url: str, amqp_url: str, publisher: tuple[object, JobStore]
) -> None:
    data = tmp_path / "c"
    async with run_replica(data, "c", namespace, redis_url, amqp_url) as first:
        collection = await create(first, "durable")
        pub, jobs = publisher
        accepted = await pub.submit(collection.name, collection.id, documents(*CORPUS))  # type: ignore[attr-defined]
        # Another replica of this namespace may take the job: wait until this one has the data.
        await wait_job(jobs, accepted.job_id)

        async def indexed() -> bool:
            info = await first.stub.GetCollection(retrieval_pb2.CollectionRequest(name="durable"))
            return bool(info.chunks == 4)

        await eventually(indexed)
    async with run_replica(data, "c", namespace, redis_url, amqp_url) as restarted:
        reply = await restarted.search("durable", "bread dough yeast", SPARSE)
        assert reply.hits[0].document_id == "bread"
    errors_before = REGISTRY.get_sample_value("ragmesh_retrieval_cache_errors_total", {"cache": "embedding"}) or 0.0
    dead_redis = f"redis://127.0.0.1:{free_port()}/0"
    async with run_replica(data, "c", namespace, dead_redis, amqp_url) as no_redis:
        reply = await no_redis.search("durable", "rocket thrust into orbit", HYBRID)
        assert reply.hits[0].document_id == "rockets" and not reply.cached
        with pytest.raises(grpc.aio.AioRpcError) as unavailable:
            await create(no_redis, "cannot")
        assert unavailable.value.code() == grpc.StatusCode.UNAVAILABLE
    errors_after = REGISTRY.get_sample_value("ragmesh_retrieval_cache_errors_total", {"cache": "embedding"}) or 0.0
    assert errors_after > errors_before


async def test_search_bad_input(replica: Replica) -> None:
    await create(replica, "bad-input")
    cases = [
        (dict(collection="nope", query="q", top_k=5), grpc.StatusCode.NOT_FOUND),
        (dict(collection="bad-input", query="q", top_k=0), grpc.StatusCode.INVALID_ARGUMENT),
        (dict(collection="bad-input", query="q", top_k=101), grpc.StatusCode.INVALID_ARGUMENT),
        (dict(collection="bad-input", query="  ", top_k=5), grpc.StatusCode.INVALID_ARGUMENT),
        (dict(collection="bad-input", query="q", top_k=5, mode=7), grpc.StatusCode.INVALID_ARGUMENT),
    ]
    for fields, code in cases:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await replica.stub.Search(retrieval_pb2.SearchRequest(**fields))  # type: ignore[arg-type]
        assert info.value.code() == code, fields
    empty = await replica.search("bad-input", "anything")
    assert list(empty.hits) == []
    await asyncio.sleep(0)


async def test_delete_during_ingestion_is_immediate_and_nothing_comes_back(
    tmp_path: Path, namespace: str, redis_url: str, amqp_url: str, publisher: tuple[object, JobStore]
) -> None:
    data = tmp_path / "d"
    many = [(f"doc{i}", f"Title {i}", f"Sentence number {i} about topic {i % 7} and more words.") for i in range(400)]
    async with run_replica(data, "d", namespace, redis_url, amqp_url) as replica_d:
        collection = await create(replica_d, "doomed")
        pub, jobs = publisher
        accepted = await pub.submit(collection.name, collection.id, documents(*many))  # type: ignore[attr-defined]

        async def running() -> bool:
            job = await jobs.get(accepted.job_id)
            return job is not None and job["status"] in ("running", "failed", "succeeded")

        await eventually(running)
        started = asyncio.get_running_loop().time()
        await replica_d.stub.DeleteCollection(retrieval_pb2.CollectionRequest(name="doomed"), timeout=5)
        assert asyncio.get_running_loop().time() - started < 2.0
        with pytest.raises(grpc.aio.AioRpcError):
            await replica_d.search("doomed", "topic")
        job = await wait_job(jobs, accepted.job_id)
        assert job["status"] == "failed" and "deleted" in str(job["error"])
    async with run_replica(data, "d", namespace, redis_url, amqp_url) as restarted:
        listed = await restarted.stub.ListCollections(retrieval_pb2.ListCollectionsRequest())
        assert "doomed" not in [c.name for c in listed.collections]
    assert not (data / "collections" / "doomed").exists()


async def test_an_empty_replica_catches_up_from_its_peers(
    tmp_path: Path, namespace: str, redis_url: str, amqp_url: str, publisher: tuple[object, JobStore], replica: Replica
) -> None:
    collection = await create(replica, "catch-up")
    await ingest(publisher, collection, *CORPUS[:2])
    await ingest(publisher, collection, *CORPUS[2:])

    async def indexed() -> bool:
        info = await replica.stub.GetCollection(retrieval_pb2.CollectionRequest(name="catch-up"))
        return bool(info.chunks == 4 and info.index_version == 2)

    await eventually(indexed)
    # A new replica, its data folder empty: ready only once it has copied what it lacked.
    async with run_replica(tmp_path / "empty", "fresh", namespace, redis_url, amqp_url, peers=replica.address) as fresh:
        request = retrieval_pb2.CollectionRequest(name="catch-up")
        mine, theirs = await replica.stub.GetCollection(request), await fresh.stub.GetCollection(request)
        assert (theirs.id, theirs.chunks, theirs.documents, theirs.index_version) == (
            mine.id,
            mine.chunks,
            mine.documents,
            mine.index_version,
        )
        for query in ("rocket propellant thrust", "what makes bread rise", "moon and tides"):
            for mode in (DENSE, SPARSE, HYBRID):
                a = await replica.search("catch-up", query, mode, top_k=4, no_cache=True)
                b = await fresh.search("catch-up", query, mode, top_k=4, no_cache=True)
                assert b.hits and [(h.chunk_id, round(h.score, 5)) for h in b.hits] == [
                    (h.chunk_id, round(h.score, 5)) for h in a.hits
                ]
        # Changes after the copy reach it through its events queue, once.
        await ingest(publisher, collection, ("volcano", "Volcano", "Lava erupts from a volcano when magma rises."))

        async def both_have_five() -> bool:
            infos = [await r.stub.GetCollection(request) for r in (replica, fresh)]
            return all(i.chunks == 5 and i.index_version == 3 for i in infos)

        await eventually(both_have_five)
