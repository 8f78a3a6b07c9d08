"""Ingestion jobs, kept in Redis so that any replica can report on them.

preprocess creates a job when it accepts documents; retrieval moves it along
(running, progress, succeeded or failed); GET /v1/jobs/{id} reads it.
"""

from __future__ import annotations

import time
from typing import Any

import redis.asyncio as aioredis

from ragmesh.redis_keys import JOB_FINISHED_TTL, RedisKeys

# Finished jobs are kept this long (seconds), then Redis forgets them.
FINISHED_TTL = JOB_FINISHED_TTL

STATUSES = ("queued", "running", "succeeded", "failed")


class JobStore:
    def __init__(self, redis: aioredis.Redis, namespace: str = "") -> None:
        self._redis = redis
        self._schema = RedisKeys(namespace)

    def _key(self, job_id: str) -> str:
        return self._schema.job(job_id)

    async def create(self, job_id: str, collection: str, documents: int, total: int, owner: str = "") -> None:
        """A queued job; `owner`: the id of the API key that submitted it (others never see it)."""
        await self._redis.hset(
            self._key(job_id),
            mapping={
                "owner": owner,
                "id": job_id,
                "collection": collection,
                "status": "queued",
                "documents": documents,
                "total": total,
                "done": 0,
                "error": "",
                "created_at": int(time.time()),
                "finished_at": 0,
            },
        )

    async def delete(self, job_id: str) -> None:
        await self._redis.delete(self._key(job_id))

    async def running(self, job_id: str) -> None:
        await self._redis.hset(self._key(job_id), mapping={"status": "running", "done": 0})

    async def progress(self, job_id: str, done: int) -> None:
        await self._redis.hset(self._key(job_id), "done", done)

    async def succeeded(self, job_id: str, total: int) -> None:
        await self._finish(job_id, "succeeded", done=total)

    async def failed(self, job_id: str, error: str) -> None:
        await self._finish(job_id, "failed", error=error[:2000])

    async def _finish(self, job_id: str, status: str, *, done: int | None = None, error: str = "") -> None:
        key = self._key(job_id)
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hset(key, mapping={"status": status, "error": error, "finished_at": int(time.time())})
            if done is not None:
                pipe.hset(key, "done", done)
            pipe.expire(key, FINISHED_TTL)
            await pipe.execute()

    async def get(self, job_id: str, owner: str | None = None) -> dict[str, Any] | None:
        """The job as the API shows it, or None (also when `owner` is given and the job is another key's)."""
        raw = await self._redis.hgetall(self._key(job_id))
        if not raw:
            return None
        fields = {_text(k): _text(v) for k, v in raw.items()}
        if owner is not None and fields.get("owner", "") != owner:
            return None
        return {
            "id": fields["id"],
            "object": "ingest.job",
            "collection": fields["collection"],
            "status": fields["status"],
            "documents": int(fields["documents"]),
            "done": int(fields["done"]),
            "total": int(fields["total"]),
            "error": fields["error"] or None,
            "created_at": int(fields["created_at"]),
            "finished_at": int(fields["finished_at"]) or None,
        }


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
