"""Batch state in Redis: a small state machine whose every step is one atomic script.

Per batch: a hash (`...:state`) with the status, the counts and the timestamps (and `doc`,
the parts that never change, as JSON); a hash of results, one per custom_id; the custom_ids
in input order. Indexes: per owner (and all) by creation time for GET /v1/batches, the
batches still running by expiry time, the finished ones by deletion time.

- Recording a line and counting it are one script: a result is never stored uncounted, nor
  counted twice (a line delivered again finds its result and is not counted again).
- The status moves only forward, by compare-and-set:
  validating -> in_progress -> finalizing -> completed (or expired),
  validating -> finalizing when every line is done although create could not mark the batch
  in_progress (Redis failed right after the lines were published),
  validating | in_progress -> cancelling -> cancelled, validating -> failed.
- Closing a batch (the last line done, its window over) sets `closing` to the end it is
  going to; from then on results are frozen (a late line records nothing), and one
  finalizer (holding a lease) writes the files. A finalizer that dies leaves its lease to
  run out; the next one takes the work over and writes the same files again.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson
import redis.asyncio as aioredis

from ragmesh.errors import ErrorKind, RagmeshError
from ragmesh.redis_keys import RedisKeys

FINAL = ("completed", "failed", "cancelled", "expired")
TIMESTAMPS = (
    "in_progress_at",
    "finalizing_at",
    "completed_at",
    "failed_at",
    "expired_at",
    "cancelling_at",
    "cancelled_at",
)

_FINAL_LUA = "local FINAL = {completed=true, failed=true, cancelled=true, expired=true}\n"

# KEYS: state. ARGV: statuses allowed now (space-separated), new status, its timestamp field, now,
# then field/value pairs to set. Refused once the batch is closing. -> {1 or 0, status now}
_TRANSITION = """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return {0, ''} end
if redis.call('HEXISTS', KEYS[1], 'closing') == 1 then return {0, status} end
for allowed in string.gmatch(ARGV[1], '%S+') do
  if allowed == status then
    redis.call('HSET', KEYS[1], 'status', ARGV[2], ARGV[3], ARGV[4])
    for i = 5, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
    return {1, ARGV[2]}
  end
end
return {0, status}
"""

# KEYS: state, results. ARGV: custom_id, result JSON, 'completed' or 'failed'.
# -> {1 stored | 0 already there | -1 no batch | -2 closing (results frozen), lines done, total}
_RECORD = """
local s = redis.call('HMGET', KEYS[1], 'status', 'closing', 'total', 'completed', 'failed')
if not s[1] then return {-1, 0, 0} end
local total = tonumber(s[3])
local done = tonumber(s[4]) + tonumber(s[5])
if s[2] then return {-2, done, total} end
if redis.call('HSETNX', KEYS[2], ARGV[1], ARGV[2]) == 0 then return {0, done, total} end
redis.call('HINCRBY', KEYS[1], ARGV[3], 1)
return {1, done + 1, total}
"""

# KEYS: state. ARGV: 'done' (every line has its result) or 'expire' (the window is over), now,
# lease seconds. -> the end the caller must now write ('completed', 'cancelled', 'expired'), or ''.
_CLOSE = (
    _FINAL_LUA
    + """
local s = redis.call('HMGET', KEYS[1], 'status', 'closing', 'lease', 'total', 'completed', 'failed')
local status = s[1]
if not status or FINAL[status] then return '' end
local now = tonumber(ARGV[2])
if s[2] then
  if tonumber(s[3] or '0') > now then return '' end
  redis.call('HSET', KEYS[1], 'lease', now + tonumber(ARGV[3]))
  return s[2]
end
local done = tonumber(s[5]) + tonumber(s[6]) >= tonumber(s[4])
local ending = ''
if status == 'cancelling' then
  if done or ARGV[1] == 'expire' then ending = 'cancelled' end
elseif status == 'in_progress' or status == 'validating' then
  -- validating and done: create published every line, then failed to mark the batch in_progress.
  if done then ending = 'completed' elseif ARGV[1] == 'expire' then ending = 'expired' end
end
if ending == '' then return '' end
redis.call('HSET', KEYS[1], 'closing', ending, 'lease', now + tonumber(ARGV[3]))
if ending ~= 'cancelled' then redis.call('HSET', KEYS[1], 'status', 'finalizing', 'finalizing_at', ARGV[2]) end
return ending
"""
)

# KEYS: state, active index, retired index. ARGV: end, now, delete at, batch id, then field/value
# pairs (files, counts, errors). Only the holder of `closing` may finish. -> 1 finished, 0 not.
_FINISH = (
    _FINAL_LUA
    + """
local s = redis.call('HMGET', KEYS[1], 'status', 'closing')
if not s[1] or FINAL[s[1]] then return 0 end
if s[2] and s[2] ~= ARGV[1] then return 0 end
if not s[2] and not (ARGV[1] == 'failed' and s[1] == 'validating') then return 0 end
redis.call('HSET', KEYS[1], 'status', ARGV[1], ARGV[1] .. '_at', ARGV[2], 'closing', ARGV[1])
for i = 5, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
redis.call('HDEL', KEYS[1], 'lease')
redis.call('ZREM', KEYS[2], ARGV[4])
redis.call('ZADD', KEYS[3], ARGV[3], ARGV[4])
return 1
"""
)


def not_found(batch_id: str) -> RagmeshError:
    return RagmeshError(ErrorKind.NOT_FOUND, f"No such batch: {batch_id}.", param="batch_id", code="batch_not_found")


@dataclass(frozen=True)
class LineState:
    """What a worker needs to know about a line's batch."""

    status: str
    closing: str | None
    expires_at: float

    @property
    def frozen(self) -> bool:
        """Results are no longer taken: the batch is closing or over."""
        return self.closing is not None or self.status in FINAL


@dataclass(frozen=True)
class Recorded:
    stored: bool  # this call stored (and counted) the result
    done: int  # lines with a result, this one included
    total: int

    @property
    def complete(self) -> bool:
        return self.total > 0 and self.done >= self.total


class BatchStore:
    def __init__(self, redis: aioredis.Redis, namespace: str) -> None:
        self.redis = redis
        self._schema = RedisKeys(namespace)
        self._transition = redis.register_script(_TRANSITION)
        self._record = redis.register_script(_RECORD)
        self._close = redis.register_script(_CLOSE)
        self._finish = redis.register_script(_FINISH)

    # --- keys -----------------------------------------------------------------------

    def state_key(self, batch_id: str) -> str:
        return self._schema.batch_state(batch_id)

    def results_key(self, batch_id: str) -> str:
        return self._schema.batch_results(batch_id)

    def order_key(self, batch_id: str) -> str:
        return self._schema.batch_order(batch_id)

    def index_key(self, owner: str | None) -> str:
        """Batches by creation time: one owner's (an API key id), or everyone's (None)."""
        return self._schema.batches_index(owner)

    @property
    def active_key(self) -> str:
        return self._schema.batches_active

    @property
    def retired_key(self) -> str:
        return self._schema.batches_retired

    # --- life cycle -----------------------------------------------------------------------

    async def create(self, doc: dict[str, Any], order: list[str], created_ms: int) -> None:
        """A new batch, `validating`, indexed for its owner and by its expiry (one transaction)."""
        batch_id = doc["id"]
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(
                self.state_key(batch_id),
                mapping={
                    "doc": orjson.dumps(doc),
                    "status": "validating",
                    "total": len(order),
                    "completed": 0,
                    "failed": 0,
                    "expires_at": doc["expires_at"],
                },
            )
            pipe.set(self.order_key(batch_id), orjson.dumps(order))
            pipe.zadd(self.index_key(None), {batch_id: created_ms})
            if doc.get("owner") is not None:
                pipe.zadd(self.index_key(doc["owner"]), {batch_id: created_ms})
            pipe.zadd(self.active_key, {batch_id: doc["expires_at"]})
            await pipe.execute()

    async def transition(
        self, batch_id: str, allowed: tuple[str, ...], status: str, now: int, **fields: str
    ) -> tuple[bool, str]:
        """Move to `status` if the batch is in one of `allowed` now (and not closing): (moved, status now)."""
        args: list[Any] = [" ".join(allowed), status, f"{status}_at", now]
        for name, value in fields.items():
            args += [name, value]
        moved, current = await self._transition(keys=[self.state_key(batch_id)], args=args)
        return bool(moved), _text(current)

    async def record(self, batch_id: str, custom_id: str, result: dict[str, Any], ok: bool) -> Recorded:
        """Store and count a line's result in one step; a second result for the line is refused."""
        stored, done, total = await self._record(
            keys=[self.state_key(batch_id), self.results_key(batch_id)],
            args=[custom_id, orjson.dumps(result), "completed" if ok else "failed"],
        )
        return Recorded(int(stored) == 1, int(done), int(total))

    async def begin_close(self, batch_id: str, why: str, now: float, lease: float) -> str:
        """Claim the batch's finalization: the end to write ('completed', 'cancelled', 'expired'),
        or '' when there is nothing to do or another finalizer holds the lease. `why`: 'done'
        (every line has a result) or 'expire' (the completion window is over)."""
        ending = await self._close(keys=[self.state_key(batch_id)], args=[why, now, lease])
        return _text(ending)

    async def finish(self, batch_id: str, ending: str, now: int, delete_at: float, **fields: str | int) -> bool:
        """Set the final status (and files, counts) if this finalizer still holds the batch."""
        args: list[Any] = [ending, now, delete_at, batch_id]
        for name, value in fields.items():
            args += [name, value]
        keys = [self.state_key(batch_id), self.active_key, self.retired_key]
        return bool(await self._finish(keys=keys, args=args))

    async def delete(self, batch_id: str) -> None:
        """Forget a batch: its state, results and order, and its index entries."""
        raw = await self.redis.hget(self.state_key(batch_id), "doc")
        owner = orjson.loads(raw).get("owner") if raw else None
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.delete(self.state_key(batch_id), self.results_key(batch_id), self.order_key(batch_id))
            pipe.zrem(self.index_key(None), batch_id)
            if owner is not None:
                pipe.zrem(self.index_key(owner), batch_id)
            pipe.zrem(self.active_key, batch_id)
            pipe.zrem(self.retired_key, batch_id)
            await pipe.execute()

    # --- reads ------------------------------------------------------------------------------

    async def load(self, batch_id: str) -> dict[str, Any]:
        """The batch as stored (with `owner`); NOT_FOUND when there is none."""
        raw = await self.redis.hgetall(self.state_key(batch_id))
        if not raw:
            raise not_found(batch_id)
        return batch_object({_text(k): _text(v) for k, v in raw.items()})

    async def load_many(self, batch_ids: list[str]) -> list[dict[str, Any]]:
        """The batches that still exist among `batch_ids`, in that order."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for batch_id in batch_ids:
                pipe.hgetall(self.state_key(batch_id))
            raws = await pipe.execute()
        return [batch_object({_text(k): _text(v) for k, v in raw.items()}) for raw in raws if raw]

    async def line_state(self, batch_id: str) -> LineState | None:
        status, closing, expires_at = await self.redis.hmget(
            self.state_key(batch_id), ["status", "closing", "expires_at"]
        )
        if status is None:
            return None
        return LineState(_text(status), _text(closing) if closing else None, float(expires_at or 0))

    async def has_result(self, batch_id: str, custom_id: str) -> bool:
        return bool(await self.redis.hexists(self.results_key(batch_id), custom_id))

    async def order(self, batch_id: str) -> list[str]:
        raw = await self.redis.get(self.order_key(batch_id))
        return list(orjson.loads(raw)) if raw else []

    async def results_of(self, batch_id: str, custom_ids: list[str]) -> list[bytes | None]:
        """The stored results (JSON) of these lines, None where a line has none."""
        values = await self.redis.hmget(self.results_key(batch_id), custom_ids)
        return [v if isinstance(v, bytes) or v is None else str(v).encode() for v in values]

    async def page(self, owner: str | None, after: str | None, limit: int) -> tuple[list[str], bool]:
        """Batch ids newest first, after the id `after`: (up to `limit` ids, whether more follow)."""
        index = self.index_key(owner)
        start = 0
        if after:
            rank: Any = await self.redis.zrevrank(index, after)
            if rank is None:
                return [], False
            start = int(rank) + 1
        ids = [_text(i) for i in await self.redis.zrevrange(index, start, start + int(limit))]
        return ids[:limit], len(ids) > limit

    async def active(self) -> list[str]:
        """Batches not finished yet."""
        return [_text(i) for i in await self.redis.zrange(self.active_key, 0, -1)]

    async def due_expiry(self, now: float) -> list[str]:
        """Running batches whose completion window is over."""
        return [_text(i) for i in await self.redis.zrangebyscore(self.active_key, "-inf", now)]

    async def due_deletion(self, now: float, limit: int = 500) -> list[str]:
        """Finished batches past their retention."""
        found = await self.redis.zrangebyscore(self.retired_key, "-inf", now, start=0, num=limit)
        return [_text(i) for i in found]


def batch_object(fields: dict[str, str]) -> dict[str, Any]:
    """OpenAI's batch object (plus `owner`, which the API removes) from the state hash."""
    doc: dict[str, Any] = orjson.loads(fields["doc"])
    batch: dict[str, Any] = {
        "id": doc["id"],
        "object": "batch",
        "endpoint": doc["endpoint"],
        "errors": orjson.loads(fields["errors"]) if fields.get("errors") else None,
        "input_file_id": doc["input_file_id"],
        "completion_window": doc["completion_window"],
        "status": fields["status"],
        "output_file_id": fields.get("output_file_id") or None,
        "error_file_id": fields.get("error_file_id") or None,
        "created_at": doc["created_at"],
        "expires_at": doc["expires_at"],
    }
    for name in TIMESTAMPS:
        batch[name] = int(float(fields[name])) if fields.get(name) else None
    batch["request_counts"] = {
        "total": int(fields["total"]),
        "completed": int(fields.get("completed", 0)),
        "failed": int(fields.get("failed", 0)),
    }
    batch["metadata"] = doc.get("metadata")
    batch["owner"] = doc.get("owner")
    return batch


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
