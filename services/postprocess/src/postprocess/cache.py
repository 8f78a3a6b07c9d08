"""The response cache: finished answers of deterministic requests, in Redis.

preprocess decides what is cacheable and computes the key (it includes the
collection's index version for RAG requests, so new documents move requests
to new keys); postprocess stores answers under it and replays them. Redis
being down only turns the cache off.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any

import orjson
import redis.asyncio as aioredis
from prometheus_client import Counter
from redis.exceptions import RedisError

from ragmesh.redis_keys import RedisKeys

log = logging.getLogger(__name__)

RESPONSE_CACHE = Counter("ragmesh_postprocess_response_cache_total", "Response cache operations", ["outcome"])


class ResponseCache:
    def __init__(self, redis: aioredis.Redis, namespace: str, ttl: int) -> None:
        self._redis = redis
        self._schema = RedisKeys(namespace)
        self._ttl = ttl

    def _key(self, cache_key: str) -> str:
        return self._schema.response(hashlib.sha256(cache_key.encode()).hexdigest())

    async def load(self, cache_key: str) -> dict[str, Any] | None:
        try:
            raw = await self._redis.get(self._key(cache_key))
        except (RedisError, OSError) as exc:
            RESPONSE_CACHE.labels("error").inc()
            log.warning("response cache unavailable", extra={"error": str(exc)})
            return None
        RESPONSE_CACHE.labels("hit" if raw else "miss").inc()
        return orjson.loads(raw) if raw else None

    async def store(self, cache_key: str, record: dict[str, Any]) -> None:
        try:
            await self._redis.set(self._key(cache_key), orjson.dumps(record), ex=self._ttl)
        except (RedisError, OSError) as exc:
            RESPONSE_CACHE.labels("error").inc()
            log.warning("response cache unavailable", extra={"error": str(exc)})
            return
        RESPONSE_CACHE.labels("store").inc()
