"""API keys and per-key rate limits, in Redis (shared by every preprocess replica).

A key is shown once, when it is created; Redis keeps only its SHA-256. A key
has a name, an optional expiry, the models it may use (none listed: all), and
limits in requests per minute and tokens per minute.

Limits are token buckets in Redis, one per key and limit, holding at most a
minute's allowance and refilling continuously at limit/minute. One Lua script
admits a request (checks the token bucket, takes one from the request bucket)
atomically on Redis's clock, so concurrent replicas can never both take the
last unit, and its cost does not grow with traffic. Tokens (prompt +
completion, from the answer's usage) are charged after the answer and may
take the bucket below zero: the key is then refused until it refills.
"""

from __future__ import annotations

import hashlib
import math
import secrets
import time
import uuid
from dataclasses import dataclass
from typing import Any

import orjson
import redis.asyncio as aioredis
from prometheus_client import Counter

from ragmesh.errors import ErrorKind, RagmeshError, invalid_request
from ragmesh.redis_keys import RedisKeys

KEY_PREFIX = "rm-"

AUTH_FAILURES = Counter("ragmesh_auth_failures_total", "Requests refused by authentication", ["reason"])
RATE_LIMITED = Counter("ragmesh_rate_limited_total", "Requests refused by a per-key limit", ["key", "limit"])
KEY_REQUESTS = Counter("ragmesh_key_requests_total", "Requests admitted, per API key", ["key"])
KEY_TOKENS = Counter("ragmesh_key_tokens_total", "Tokens used, per API key", ["key"])

# Buckets: hashes {level, ts}. KEYS[1] requests, KEYS[2] tokens. ARGV[1] mode
# ("admit": check tokens > 0, then take one request; "charge": take ARGV[4]
# tokens, even below zero), ARGV[2] rpm, ARGV[3] tpm (0: no limit), ARGV[4]
# tokens, ARGV[5] window in ms. Returns {allowed (1/0), refused limit ("" or
# "requests"/"tokens"), requests level, requests ms to full, requests ms to one,
# tokens level, tokens ms to full, tokens ms to one}; levels as strings (floats).
_BUCKETS = """
if redis.replicate_commands then redis.replicate_commands() end  -- TIME then writes (Redis < 5)
local mode, window = ARGV[1], tonumber(ARGV[5])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local function load(key, cap)
  local state = redis.call('HMGET', key, 'level', 'ts')
  local level, ts = tonumber(state[1]), tonumber(state[2])
  if level == nil then return cap end
  return math.min(cap, level + math.max(0, now - ts) * cap / window)
end
local function save(key, level)
  redis.call('HSET', key, 'level', tostring(level), 'ts', now)
  redis.call('PEXPIRE', key, window * 2)
end
local function timing(level, cap)
  if cap <= 0 then return 0, 0 end
  return math.ceil((cap - level) * window / cap), math.max(0, math.ceil((1 - level) * window / cap))
end
local rpm, tpm = tonumber(ARGV[2]), tonumber(ARGV[3])
local requests = rpm > 0 and load(KEYS[1], rpm) or 0
local tokens = tpm > 0 and load(KEYS[2], tpm) or 0
local allowed, refused = 1, ''
if mode == 'admit' then
  if tpm > 0 and tokens < 1 then
    allowed, refused = 0, 'tokens'
  elseif rpm > 0 and requests < 1 then
    allowed, refused = 0, 'requests'
  elseif rpm > 0 then
    requests = requests - 1
    save(KEYS[1], requests)
  end
elseif tpm > 0 then
  tokens = tokens - tonumber(ARGV[4])
  save(KEYS[2], tokens)
end
local r_full, r_one = timing(requests, rpm)
local t_full, t_one = timing(tokens, tpm)
return {allowed, refused, tostring(requests), r_full, r_one, tostring(tokens), t_full, t_one}
"""


# In flight: KEYS[1] the key's sorted set; ARGV[1] request id, ARGV[2] limit, ARGV[3] ttl in ms.
# Entries older than the ttl (a replica that died mid-request) are dropped first. 1: admitted.
_ENTER = """
if redis.replicate_commands then redis.replicate_commands() end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - ttl)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then return 0 end
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('PEXPIRE', KEYS[1], ttl)
return 1
"""


@dataclass(frozen=True)
class ApiKey:
    id: str
    name: str
    created: int
    expires_at: int | None
    models: tuple[str, ...]
    rpm: int  # 0: no limit
    tpm: int
    revoked: bool = False
    max_in_flight: int = 0  # requests at once; 0: the server's default (RAGMESH_PREPROCESS_KEY_MAX_IN_FLIGHT)

    def public(self) -> dict[str, Any]:
        """What the admin API shows: never the secret."""
        return {
            "id": self.id,
            "object": "api_key",
            "name": self.name,
            "created": self.created,
            "expires_at": self.expires_at,
            "models": list(self.models) or None,
            "rpm": self.rpm or None,
            "tpm": self.tpm or None,
            "max_in_flight": self.max_in_flight or None,
            "revoked": self.revoked,
        }


@dataclass(frozen=True)
class Usage:
    """A limit's state, for the x-ratelimit-* headers."""

    limit: int
    remaining: int
    reset_ms: int  # until the bucket is full again (OpenAI's x-ratelimit-reset-*)
    retry_ms: int = 0  # until one more unit is available (Retry-After when refused)


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


class KeyStore:
    def __init__(self, redis: aioredis.Redis, namespace: str, window_seconds: float = 60.0) -> None:
        """`window_seconds`: the limits' window; rpm and tpm are per window (a minute unless changed)."""
        self._redis = redis
        self._window_ms = int(window_seconds * 1000)
        self._schema = RedisKeys(namespace)
        self._index = self._schema.api_key_index  # id -> hash of the secret
        self._script = redis.register_script(_BUCKETS)
        self._enter = redis.register_script(_ENTER)

    async def create(
        self,
        name: str,
        *,
        expires_in: int | None,
        models: list[str],
        rpm: int,
        tpm: int,
        max_in_flight: int = 0,
    ) -> tuple[str, ApiKey]:
        """(the secret, shown this once; the key)."""
        if not name.strip():
            raise invalid_request("A key needs a name.", param="name")
        if rpm < 0 or tpm < 0 or (expires_in is not None and expires_in <= 0):
            raise invalid_request("rpm and tpm must be 0 or more; expires_in more than 0.", param="rpm")
        if max_in_flight < 0:
            raise invalid_request("max_in_flight must be 0 or more.", param="max_in_flight")
        secret = KEY_PREFIX + secrets.token_urlsafe(32)
        key = ApiKey(
            id=f"key_{uuid.uuid4().hex[:16]}",
            name=name,
            created=int(time.time()),
            expires_at=math.ceil(time.time() + expires_in) if expires_in else None,  # never less than asked
            models=tuple(models),
            rpm=rpm,
            tpm=tpm,
            max_in_flight=max_in_flight,
        )
        digest = _hash(secret)
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.set(self._schema.api_key(digest), orjson.dumps(key.__dict__))
            pipe.hset(self._index, key.id, digest)
            await pipe.execute()
        return secret, key

    async def get(self, key_id: str) -> ApiKey | None:
        """A key by its id (None when there is no such key)."""
        found = await self._redis.hget(self._index, key_id)
        digest = found.decode() if isinstance(found, bytes) else found
        raw = await self._redis.get(self._schema.api_key(digest)) if digest else None
        return _key(raw) if raw else None

    async def enter(self, key: ApiKey, request_id: str, limit: int, ttl_seconds: float) -> None:
        """Count a request in flight for `key` (a 429 with Retry-After past `limit`); `leave` ends it.

        Every preprocess replica counts in the same Redis set; an entry a crashed replica never
        removed stops counting after `ttl_seconds` (the longest a request may run)."""
        allowed = await self._enter(
            keys=[self._schema.in_flight(key.id)], args=[request_id, limit, int(ttl_seconds * 1000)]
        )
        if not int(allowed):
            RATE_LIMITED.labels(key.name, "in_flight").inc()
            raise RagmeshError(
                ErrorKind.RATE_LIMITED,
                f"Too many requests in flight for this key (at most {limit} at once); retry when one ends.",
                code="too_many_requests_in_flight",
                retry_after=1,
            )

    async def leave(self, key: ApiKey, request_id: str) -> None:
        await self._redis.zrem(self._schema.in_flight(key.id), request_id)

    async def reserve_tokens(self, key: ApiKey, tokens: int) -> None:
        """Take what a request may use from the key's token bucket at admission; `settle` at the end."""
        if key.tpm and tokens > 0:
            await self._run(key, "charge", tokens)

    async def settle_tokens(self, key: ApiKey, reserved: int, used: int) -> None:
        """The request ended having used `used` tokens of the `reserved`: the difference goes back."""
        KEY_TOKENS.labels(key.name).inc(max(0, used))
        if key.tpm and used != reserved:
            await self._run(key, "charge", used - reserved)

    async def list(self) -> list[ApiKey]:
        digests = await self._redis.hgetall(self._index)
        keys = []
        for digest in digests.values():
            raw = await self._redis.get(self._schema.api_key(digest.decode() if isinstance(digest, bytes) else digest))
            if raw:
                keys.append(_key(raw))
        return sorted(keys, key=lambda k: k.created)

    async def revoke(self, key_id: str) -> ApiKey:
        found = await self._redis.hget(self._index, key_id)
        digest = found.decode() if isinstance(found, bytes) else found
        raw = await self._redis.get(self._schema.api_key(digest)) if digest else None
        if raw is None or digest is None:
            raise RagmeshError(ErrorKind.NOT_FOUND, f"No such key: {key_id}.", param="key_id")
        revoked = ApiKey(**{**_key(raw).__dict__, "revoked": True})
        await self._redis.set(self._schema.api_key(digest), orjson.dumps(revoked.__dict__))
        return revoked

    async def authenticate(self, authorization: str | None) -> ApiKey:
        """The key of an `Authorization: Bearer ...` header, or a 401."""
        if not authorization:
            AUTH_FAILURES.labels("missing").inc()
            raise _unauthorized("Missing API key: send 'Authorization: Bearer <key>'.")
        scheme, _, secret = authorization.strip().partition(" ")
        secret = secret.strip()
        if scheme.lower() != "bearer" or not secret.startswith(KEY_PREFIX) or len(secret) > 200:
            AUTH_FAILURES.labels("malformed").inc()
            raise _unauthorized("Malformed API key: send 'Authorization: Bearer <key>'.")
        raw = await self._redis.get(self._schema.api_key(_hash(secret)))
        if raw is None:
            AUTH_FAILURES.labels("unknown").inc()
            raise _unauthorized("Incorrect API key provided.")
        key = _key(raw)
        if key.revoked:
            AUTH_FAILURES.labels("revoked").inc()
            raise _unauthorized("This API key has been revoked.")
        if key.expires_at is not None and key.expires_at <= time.time():
            AUTH_FAILURES.labels("expired").inc()
            raise _unauthorized("This API key has expired.")
        return key

    async def _run(self, key: ApiKey, mode: str, tokens: int = 0) -> tuple[bool, str, Usage | None, Usage | None]:
        reply = await self._script(
            keys=[self._schema.rate_limit(key.id, "rpm"), self._schema.rate_limit(key.id, "tpm")],
            args=[mode, key.rpm, key.tpm, tokens, self._window_ms],
        )
        allowed, refused, r_level, r_full, r_one, t_level, t_full, t_one = reply
        refused = refused.decode() if isinstance(refused, bytes) else str(refused)
        requests = Usage(key.rpm, max(0, int(float(r_level))), int(r_full), int(r_one)) if key.rpm else None
        tokens_left = Usage(key.tpm, max(0, int(float(t_level))), int(t_full), int(t_one)) if key.tpm else None
        return bool(allowed), refused, requests, tokens_left

    async def admit(self, key: ApiKey) -> tuple[Usage | None, Usage | None]:
        """Count one request against the key's limits (a 429 with Retry-After when over)."""
        if not key.rpm and not key.tpm:
            KEY_REQUESTS.labels(key.name).inc()
            return None, None
        allowed, refused, requests, tokens = await self._run(key, "admit")
        if not allowed:
            RATE_LIMITED.labels(key.name, refused).inc()
            usage = tokens if refused == "tokens" else requests
            assert usage is not None
            per = "tokens" if refused == "tokens" else "requests"
            raise _limited(f"Rate limit reached for {per} per minute (limit {usage.limit}).", usage, refused)
        KEY_REQUESTS.labels(key.name).inc()
        return requests, tokens

    async def spend_tokens(self, key: ApiKey, tokens: int) -> None:
        """Charge an answer's tokens to the key's bucket (it may go below zero: the next request waits)."""
        KEY_TOKENS.labels(key.name).inc(tokens)
        if key.tpm and tokens > 0:
            await self._run(key, "charge", tokens)


def _key(raw: bytes | str) -> ApiKey:
    data = orjson.loads(raw)
    data["models"] = tuple(data.get("models") or ())
    return ApiKey(**data)


def _unauthorized(message: str) -> RagmeshError:
    return RagmeshError(ErrorKind.AUTHENTICATION, message, code="invalid_api_key")


def _limited(message: str, usage: Usage, kind: str) -> RagmeshError:
    return RagmeshError(
        ErrorKind.RATE_LIMITED,
        message,
        code="rate_limit_exceeded",
        retry_after=max(1, -(-usage.retry_ms // 1000)),
        headers=rate_limit_headers(usage if kind == "requests" else None, usage if kind == "tokens" else None),
    )


def rate_limit_headers(requests: Usage | None, tokens: Usage | None) -> dict[str, str]:
    """OpenAI's x-ratelimit-* headers."""
    headers: dict[str, str] = {}
    for kind, usage in (("requests", requests), ("tokens", tokens)):
        if usage is not None:
            headers[f"x-ratelimit-limit-{kind}"] = str(usage.limit)
            headers[f"x-ratelimit-remaining-{kind}"] = str(usage.remaining)
            headers[f"x-ratelimit-reset-{kind}"] = f"{max(0, usage.reset_ms) / 1000:.3f}s"
    return headers


def check_model_allowed(key: ApiKey | None, model: str) -> None:
    """A key limited to some models sees the others as absent (404, as OpenAI does)."""
    if key is not None and key.models and model not in key.models:
        raise RagmeshError(
            ErrorKind.NOT_FOUND,
            f"The model `{model}` does not exist or you do not have access to it.",
            param="model",
            code="model_not_found",
        )
