"""Who may read and write a collection.

A collection belongs to the API key that created it and is private: other keys get a
404, as if it did not exist. Its owner may share it read-only (`"shared": "read"`:
search and RAG) or read-write (`"write"`: documents too); deleting it and changing its
sharing stay the owner's. A collection with no owner on record (made with auth off,
or before ownership was kept) is the operator's: every key may read it, none may write.
With auth off there are no keys and every request sees every collection.

Kept in Redis (`RedisKeys.collection_acl`: `{namespace}:collection-acl:{name}`, a hash of
owner and shared), beside the keys.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Any, Literal

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from preprocess.keys import ApiKey
from ragmesh.errors import ErrorKind, RagmeshError
from ragmesh.redis_keys import RedisKeys

Shared = Literal["private", "read", "write"]
Need = Literal["read", "write", "owner"]


def not_found(name: str) -> RagmeshError:
    return RagmeshError(
        ErrorKind.NOT_FOUND, f"Collection '{name}' does not exist.", param="collection", code="collection_not_found"
    )


def _forbidden(name: str, need: Need) -> RagmeshError:
    what = {"read": "read", "write": "add documents to", "owner": "change or delete"}[need]
    return RagmeshError(
        ErrorKind.PERMISSION,
        f"This key may not {what} collection '{name}': it is shared with it read-only, or not its own.",
        param="collection",
        code="collection_permission_denied",
    )


class CollectionAccess:
    def __init__(self, redis: aioredis.Redis, namespace: str) -> None:
        self._redis = redis
        self._schema = RedisKeys(namespace)

    async def _call(self, coroutine: Awaitable[Any]) -> Any:
        try:
            return await coroutine
        except (RedisError, OSError) as exc:
            raise RagmeshError(
                ErrorKind.UNAVAILABLE, "The key store (Redis) is unavailable; retry shortly.", retry_after=1
            ) from exc

    async def record(self, name: str) -> tuple[str, Shared] | None:
        """(owner key id, sharing) of a collection; None when it has no owner on record."""
        raw = await self._call(self._redis.hgetall(self._schema.collection_acl(name)))
        if not raw:
            return None
        fields = {
            (k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
            for k, v in raw.items()
        }
        shared = fields.get("shared", "private")
        return fields.get("owner", ""), shared if shared in ("read", "write") else "private"  # type: ignore[return-value]

    async def check(self, name: str, key: ApiKey | None, need: Need) -> Shared | None:
        """Whether `key` may `need` the collection (404 when it may not even see it, 403 when it
        sees it but may not do this); returns its sharing (None: no owner on record)."""
        if key is None:
            record = await self.record(name)
            return record[1] if record else None
        record = await self.record(name)
        if record is None:
            if need == "read":
                return None
            raise _forbidden(name, need)
        owner, shared = record
        if owner == key.id:
            return shared
        if shared == "private":
            raise not_found(name)
        if need == "read" or (need == "write" and shared == "write"):
            return shared
        raise _forbidden(name, need)

    async def claim(self, name: str, key: ApiKey | None) -> Shared | None:
        """A new collection: its creator's, private."""
        if key is None:
            await self.forget(name)
            return None
        await self._call(
            self._redis.hset(self._schema.collection_acl(name), mapping={"owner": key.id, "shared": "private"})
        )
        return "private"

    async def share(self, name: str, key: ApiKey | None, shared: Shared) -> Shared:
        await self.check(name, key, "owner")
        await self._call(self._redis.hset(self._schema.collection_acl(name), "shared", shared))
        return shared

    async def forget(self, name: str) -> None:
        await self._call(self._redis.delete(self._schema.collection_acl(name)))

    async def visible(self, names: list[str], key: ApiKey | None) -> dict[str, Shared | None]:
        """Of `names`, those `key` may read, with their sharing."""
        out: dict[str, Shared | None] = {}
        for name in names:
            try:
                out[name] = await self.check(name, key, "read")
            except RagmeshError as err:
                if err.kind is not ErrorKind.NOT_FOUND:
                    raise
        return out
