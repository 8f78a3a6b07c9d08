"""OpenAI Files: batch input files uploaded by clients, and the output files batches write.

Contents live in a folder every preprocess replica can read (a shared volume in a cluster);
their descriptions live in Redis, so any replica answers for any file, with indexes per
owner (GET /v1/files) and by expiry. A file is written to a temporary name and renamed, so a
reader never sees half of one. Every file expires `retention` seconds after it was made:
the sweeper deletes its description and its contents.
"""

from __future__ import annotations

import asyncio
import os
import re
import time
import uuid
from pathlib import Path
from typing import Any, Literal

import orjson
import redis.asyncio as aioredis

from ragmesh.durable import fsync_dir, write_atomic
from ragmesh.errors import ErrorKind, RagmeshError, invalid_request
from ragmesh.redis_keys import RedisKeys

PURPOSES = ("batch", "batch_output")
# Descriptions read per round trip while a listing filters by purpose.
_LIST_CHUNK = 200


def not_found(file_id: str) -> RagmeshError:
    shown = file_id if FILE_ID.fullmatch(file_id) else "(not a file id)"
    return RagmeshError(ErrorKind.NOT_FOUND, f"No such file: {shown}.", param="file_id", code="file_not_found")


# What the mesh names files: file-<letters, digits, _> (uploads: 32 hex digits), a batch's results
# with -output or -errors: never a dot or a slash, so an id can never name another path.
FILE_ID = re.compile(r"file-[A-Za-z0-9_]{1,64}(?:-output|-errors)?")


def checked(file_id: str) -> str:
    """`file_id` when it has the mesh's format, else a 404: checked before any path or key is built."""
    if not FILE_ID.fullmatch(file_id):
        raise not_found(file_id)
    return file_id


class FileStore:
    def __init__(self, redis: aioredis.Redis, directory: Path, namespace: str, retention: float = 30 * 24 * 3600):
        self._redis = redis
        self._dir = directory
        self._schema = RedisKeys(namespace)
        self._retention = retention

    def path(self, file_id: str) -> Path:
        return self._dir / f"{checked(file_id)}.jsonl"

    async def stored_bytes(self, owner: str) -> int:
        """What one key's files take (its uploads and its batches' results): the storage quota's measure."""
        ids = await self._redis.zrange(self._index(owner), 0, -1)
        if not ids:
            return 0
        names = [i.decode() if isinstance(i, bytes) else str(i) for i in ids]
        records = await self._redis.mget([self._key(name) for name in names])
        return sum(int(orjson.loads(r).get("bytes", 0)) for r in records if r)

    def temp_path(self, file_id: str) -> Path:
        """Where a file is written before `put_path` renames it into place (same folder, same disk);
        a path of its own per call, so two writers of one file never write into each other's."""
        self._dir.mkdir(parents=True, exist_ok=True)
        return self._dir / f".{checked(file_id)}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"

    def _key(self, file_id: str) -> str:
        return self._schema.file(file_id)

    def _index(self, owner: str | None) -> str:
        return self._schema.files_index(owner)

    @property
    def _expiry(self) -> str:
        return self._schema.files_expiry

    async def put(
        self,
        data: bytes,
        filename: str,
        purpose: str,
        lines: int,
        owner: str | None,
        *,
        file_id: str | None = None,
        now: float | None = None,
    ) -> dict[str, Any]:
        """Keep a file (contents first, then its description) and return OpenAI's file object.

        `owner`: the API key id that uploaded it (None with auth off); only that key sees it.
        `file_id`: a fixed id (a batch's output), so writing it again replaces it."""
        file_id = file_id or f"file-{uuid.uuid4().hex}"
        await asyncio.to_thread(write_atomic, self.path(file_id), data)
        return await self._describe(file_id, len(data), filename, purpose, lines, owner, now)

    async def put_path(
        self, source: Path, file_id: str, filename: str, purpose: str, lines: int, owner: str | None, now: float
    ) -> dict[str, Any]:
        """Keep a file already written (completely) at `source`: renamed into place, then described."""
        size = await asyncio.to_thread(_move_into_place, source, self.path(file_id))
        return await self._describe(file_id, size, filename, purpose, lines, owner, now)

    async def _describe(
        self, file_id: str, size: int, filename: str, purpose: str, lines: int, owner: str | None, now: float | None
    ) -> dict[str, Any]:
        created = now if now is not None else time.time()
        info = {
            "id": file_id,
            "object": "file",
            "bytes": size,
            "created_at": int(created),
            "expires_at": int(created + self._retention),
            "filename": filename,
            "purpose": purpose,
            "status": "processed",
            "status_details": None,
            "lines": lines,
            "owner": owner,
        }
        score = int(created * 1000)
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.set(self._key(file_id), orjson.dumps(info))
            pipe.zadd(self._index(None), {file_id: score})
            if owner is not None:
                pipe.zadd(self._index(owner), {file_id: score})
            pipe.zadd(self._expiry, {file_id: int(created + self._retention)})
            await pipe.execute()
        return _public(info)

    async def _stored(self, file_id: str, owner: str | None) -> dict[str, Any]:
        raw = await self._redis.get(self._key(checked(file_id)))
        info: dict[str, Any] | None = orjson.loads(raw) if raw is not None else None
        if info is None or (owner is not None and info.get("owner") != owner):
            raise not_found(file_id)
        return info

    async def info(self, file_id: str, owner: str | None) -> dict[str, Any]:
        """The file object; a file another key owns is absent (`owner` None: no check, auth is off)."""
        return _public(await self._stored(file_id, owner))

    async def content(self, file_id: str, owner: str | None) -> bytes:
        await self.info(file_id, owner)
        try:
            return await asyncio.to_thread(self.path(file_id).read_bytes)
        except FileNotFoundError:
            raise RagmeshError(
                ErrorKind.NOT_FOUND, f"The contents of {file_id} are gone.", param="file_id", code="file_not_found"
            ) from None

    async def list(
        self,
        owner: str | None,
        *,
        purpose: str | None = None,
        after: str | None = None,
        limit: int = 10_000,
        order: Literal["asc", "desc"] = "desc",
    ) -> dict[str, Any]:
        """OpenAI's file list: the owner's files by creation time, after the id `after`, of one purpose."""
        if purpose is not None and purpose not in PURPOSES:
            raise invalid_request(f"purpose must be one of {', '.join(PURPOSES)}.", param="purpose")
        index = self._index(owner)
        rank_of = self._redis.zrevrank if order == "desc" else self._redis.zrank
        span = self._redis.zrevrange if order == "desc" else self._redis.zrange
        start = 0
        if after:
            rank: Any = await rank_of(index, after)
            if rank is None:
                return _page([], False)
            start = int(rank) + 1
        found: list[dict[str, Any]] = []
        while len(found) <= limit:
            ids = [_text(i) for i in await span(index, start, start + _LIST_CHUNK - 1)]
            if not ids:
                break
            start += len(ids)
            for raw in await self._redis.mget([self._key(i) for i in ids]):
                info = orjson.loads(raw) if raw is not None else None
                if info is not None and (purpose is None or info["purpose"] == purpose):
                    found.append(_public(info))
        return _page(found[:limit], len(found) > limit)

    async def delete(self, file_id: str, owner: str | None) -> dict[str, Any]:
        """Delete a file the owner can see: description, index entries, then contents."""
        await self._forget(await self._stored(file_id, owner))
        return {"id": file_id, "object": "file", "deleted": True}

    async def _forget(self, info: dict[str, Any]) -> None:
        file_id = info["id"]
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.delete(self._key(file_id))
            pipe.zrem(self._index(None), file_id)
            if info.get("owner") is not None:
                pipe.zrem(self._index(info["owner"]), file_id)
            pipe.zrem(self._expiry, file_id)
            await pipe.execute()
        await asyncio.to_thread(self.path(file_id).unlink, missing_ok=True)

    async def sweep(self, now: float, limit: int = 500) -> int:
        """Delete files past their expiry (at most `limit` per call); how many went."""
        due = [_text(i) for i in await self._redis.zrangebyscore(self._expiry, "-inf", now, start=0, num=limit)]
        for file_id in due:
            raw = await self._redis.get(self._key(file_id))
            info = orjson.loads(raw) if raw is not None else {"id": file_id, "owner": None}
            await self._forget(info)
        return len(due)


def _move_into_place(source: Path, target: Path) -> int:
    target.parent.mkdir(parents=True, exist_ok=True)
    source.replace(target)
    fsync_dir(target.parent)
    return target.stat().st_size


def _page(data: list[dict[str, Any]], has_more: bool) -> dict[str, Any]:
    return {
        "object": "list",
        "data": data,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
        "has_more": has_more,
    }


def _public(info: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in info.items() if k not in ("lines", "owner")}


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
