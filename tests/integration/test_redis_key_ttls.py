"""The key schema against the real Redis: the stores write exactly the keys `RedisKeys` builds
(so the schema is what is in Redis, not a second description of it), each with the TTL the
schema documents."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from postprocess.cache import ResponseCache
from preprocess.batches.store import BatchStore
from preprocess.files import FileStore
from preprocess.keys import KeyStore, _hash
from preprocess.ownership import CollectionAccess
from ragmesh.jobs import JobStore
from ragmesh.redis_keys import JOB_FINISHED_TTL, RedisKeys

from ..conftest import unique_namespace

WINDOW = 60.0
IN_FLIGHT_TTL = 30.0
RESPONSE_TTL = 3600


@pytest.fixture
def namespace() -> str:
    return unique_namespace()


@pytest.fixture
async def client(redis_url: str, namespace: str) -> AsyncIterator[aioredis.Redis]:
    redis = aioredis.Redis.from_url(redis_url)
    yield redis
    async for key in redis.scan_iter(f"{namespace}:*", count=1000):
        await redis.delete(key)
    await redis.aclose()


async def test_the_stores_write_the_schemas_keys_with_the_documented_ttls(
    client: aioredis.Redis, namespace: str, tmp_path: Path
) -> None:
    schema = RedisKeys(namespace)
    keys = KeyStore(client, namespace, window_seconds=WINDOW)
    secret, key = await keys.create("ttl", expires_in=None, models=[], rpm=10, tpm=1000)
    await keys.admit(key)
    await keys.reserve_tokens(key, 5)
    await keys.enter(key, "req-1", limit=4, ttl_seconds=IN_FLIGHT_TTL)
    jobs = JobStore(client, namespace)
    await jobs.create("job_1", "docs", 1, 1, owner=key.id)
    await jobs.succeeded("job_1", 1)
    await jobs.create("job_2", "docs", 1, 1, owner=key.id)
    files = FileStore(client, tmp_path, namespace)
    uploaded = await files.put(b"{}\n", "a.jsonl", "batch", 1, key.id)
    batches = BatchStore(client, namespace)
    doc = {"id": "batch_1", "expires_at": 2_000_000_000, "owner": key.id}
    await batches.create(doc, ["l0"], 1)
    await CollectionAccess(client, namespace).claim("docs", key)
    await ResponseCache(client, namespace, RESPONSE_TTL).store("req", {"body": "x"})

    expected = {
        schema.api_key(_hash(secret)): -1,
        schema.api_key_index: -1,
        schema.rate_limit(key.id, "rpm"): 2 * WINDOW,
        schema.rate_limit(key.id, "tpm"): 2 * WINDOW,
        schema.in_flight(key.id): IN_FLIGHT_TTL,
        schema.job("job_1"): JOB_FINISHED_TTL,
        schema.job("job_2"): -1,  # queued: kept until it finishes
        schema.file(uploaded["id"]): -1,
        schema.files_index(None): -1,
        schema.files_index(key.id): -1,
        schema.files_expiry: -1,
        schema.batch_state("batch_1"): -1,
        schema.batch_order("batch_1"): -1,
        schema.batches_index(None): -1,
        schema.batches_index(key.id): -1,
        schema.batches_active: -1,
        schema.collection_acl("docs"): -1,
        schema.response(hashlib.sha256(b"req").hexdigest()): RESPONSE_TTL,
    }
    found = {k.decode() async for k in client.scan_iter(f"{namespace}:*", count=1000)}
    assert found == set(expected), "a store wrote a key the schema does not build, or the reverse"
    for name, ttl in expected.items():
        left = await client.pttl(name) / 1000
        if ttl == -1:
            assert left < 0, f"{name} expires ({left} s) although the schema says it does not"
        else:
            assert 0 < left <= ttl, f"{name}: {left} s left, the schema says {ttl} s"
