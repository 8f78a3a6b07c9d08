"""API keys and per-key limits against the real Redis."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from preprocess.keys import KeyStore
from ragmesh.errors import ErrorKind, RagmeshError

from ..conftest import unique_namespace


@pytest.fixture
def namespace() -> str:
    return unique_namespace()


@pytest.fixture
async def redis_client(redis_url: str, namespace: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.from_url(redis_url)
    yield client
    async for key in client.scan_iter(f"{namespace}:*"):
        await client.delete(key)
    await client.aclose()


@pytest.fixture
def store(redis_client: aioredis.Redis, namespace: str) -> KeyStore:
    return KeyStore(redis_client, namespace, window_seconds=2.0)


async def refused(coro: object) -> RagmeshError:
    with pytest.raises(RagmeshError) as caught:
        await coro  # type: ignore[misc]
    return caught.value


async def test_keys_are_stored_hashed_and_listed_without_secrets(
    store: KeyStore, redis_client: aioredis.Redis, namespace: str
) -> None:
    secret, key = await store.create("alice", expires_in=None, models=["m1"], rpm=5, tpm=0)
    assert secret.startswith("rm-") and len(secret) > 40
    assert (await store.authenticate(f"Bearer {secret}")).id == key.id
    stored = [k async for k in redis_client.scan_iter(f"{namespace}:*")]
    values = [await redis_client.get(k) for k in stored if await redis_client.type(k) == b"string"]
    assert stored and values
    assert not any(secret.encode() in k for k in stored)
    assert not any(secret.encode() in (v or b"") for v in values)
    listed = await store.list()
    assert [k.public()["name"] for k in listed] == ["alice"]
    assert secret not in str([k.public() for k in listed])
    assert listed[0].public()["models"] == ["m1"]


@pytest.mark.parametrize(
    "header",
    [None, "", "Basic dXNlcjpwYXNz", "Bearer", "Bearer sk-not-ours", "Bearer rm-" + "x" * 43, "rm-abc"],
    ids=["missing", "empty", "basic", "no token", "foreign prefix", "unknown", "no scheme"],
)
async def test_bad_credentials_are_401(store: KeyStore, header: str | None) -> None:
    err = await refused(store.authenticate(header))
    assert err.kind is ErrorKind.AUTHENTICATION and err.http_status == 401


async def test_revoked_and_expired_keys_are_refused(store: KeyStore) -> None:
    secret, _ = await store.create("bob", expires_in=1, models=[], rpm=0, tpm=0)
    await store.authenticate(f"Bearer {secret}")
    await asyncio.sleep(2.1)  # expiry is a whole second, rounded up
    assert "expired" in (await refused(store.authenticate(f"Bearer {secret}"))).message
    other, other_key = await store.create("carol", expires_in=None, models=[], rpm=0, tpm=0)
    assert (await store.revoke(other_key.id)).revoked
    assert "revoked" in (await refused(store.authenticate(f"Bearer {other}"))).message
    assert (await refused(store.revoke("key_nope"))).kind is ErrorKind.NOT_FOUND


async def test_request_limit_is_atomic_across_concurrent_callers(
    store: KeyStore, redis_client: aioredis.Redis, namespace: str
) -> None:
    # Two KeyStores on one Redis stand for two preprocess replicas.
    _, key = await store.create("dave", expires_in=None, models=[], rpm=5, tpm=0)
    twin = KeyStore(redis_client, namespace, window_seconds=2.0)
    outcomes = await asyncio.gather(*((store if i % 2 else twin).admit(key) for i in range(20)), return_exceptions=True)
    admitted = [o for o in outcomes if not isinstance(o, BaseException)]
    refusals = [o for o in outcomes if isinstance(o, RagmeshError)]
    assert len(admitted) == 5 and len(refusals) == 15
    err = refusals[0]
    assert err.kind is ErrorKind.RATE_LIMITED and err.http_status == 429 and err.code == "rate_limit_exceeded"
    assert err.retry_after is not None and 1 <= err.retry_after <= 2
    assert err.headers["x-ratelimit-limit-requests"] == "5"
    assert err.headers["x-ratelimit-remaining-requests"] == "0"
    assert err.headers["x-ratelimit-reset-requests"].endswith("s")
    remaining = sorted(int(r[0].remaining) for r in admitted if r[0] is not None)
    assert remaining == [0, 1, 2, 3, 4]
    # The window slides: once the first requests are older than it, the key may go again.
    await asyncio.sleep(2.1)
    requests, _ = await store.admit(key)
    assert requests is not None and requests.remaining == 4


async def test_token_limit_counts_spent_tokens_then_resets(store: KeyStore) -> None:
    _, key = await store.create("erin", expires_in=None, models=[], rpm=0, tpm=100)
    _, tokens = await store.admit(key)
    assert tokens is not None and (tokens.limit, tokens.remaining) == (100, 100)
    await store.spend_tokens(key, 60)
    _, tokens = await store.admit(key)
    assert tokens is not None and 40 <= tokens.remaining <= 45  # it refills at 100 per 2 s meanwhile
    await store.spend_tokens(key, 60)  # an answer may overshoot; the next request waits
    err = await refused(store.admit(key))
    assert err.kind is ErrorKind.RATE_LIMITED
    assert err.headers["x-ratelimit-limit-tokens"] == "100" and err.headers["x-ratelimit-remaining-tokens"] == "0"
    started = time.monotonic()
    while True:
        try:
            await store.admit(key)
            break
        except RagmeshError:
            assert time.monotonic() - started < 10, "the token window never reset"
            await asyncio.sleep(0.2)


async def test_bad_key_parameters_are_400(store: KeyStore) -> None:
    for kwargs in ({"rpm": -1, "tpm": 0, "expires_in": None}, {"rpm": 0, "tpm": 0, "expires_in": 0}):
        err = await refused(store.create("x", models=[], **kwargs))
        assert err.kind is ErrorKind.INVALID_REQUEST
    assert (await refused(store.create("  ", expires_in=None, models=[], rpm=0, tpm=0))).param == "name"
