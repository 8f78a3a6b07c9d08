"""API keys and per-key rate limits, in Redis (shared by every preprocess replica).

A key is shown once, when it is created; Redis keeps only its SHA-256. A key
has a name, an optional expiry, the models it may use (none listed: all), and
limits in requests per minute and tokens per minute.

Limits are sliding one-minute windows kept by one Lua script per check, so
concurrent replicas can never both take the last unit. Requests are counted
when they are admitted; tokens (prompt + completion, from the answer's usage)
after the answer, and a key over its token budget is refused until the window
has room again.
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

KEY_PREFIX = "rm-"

AUTH_FAILURES = Counter("ragmesh_auth_failures_total", "Requests refused by authentication", ["reason"])
RATE_LIMITED = Counter("ragmesh_rate_limited_total", "Requests refused by a per-key limit", ["key", "limit"])
KEY_REQUESTS = Counter("ragmesh_key_requests_total", "Requests admitted, per API key", ["key"])
KEY_TOKENS = Counter("ragmesh_key_tokens_total", "Tokens used, per API key", ["key"])

# Sliding window: the entries of the last window (a minute), each a request
# (weight 1) or a number of tokens. KEYS[1] the window (sorted set), ARGV:
# now_ms, limit, weight to add (0: only check), member, window_ms.
# Returns {allowed, used, reset_ms}.
_WINDOW = """
local key, now, limit, weight, member = KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4]
local window = tonumber(ARGV[5])
redis.call('ZREMRANGEBYSCORE', key, '-inf', now - window)
local used = 0
for _, entry in ipairs(redis.call('ZRANGE', key, 0, -1)) do
  used = used + tonumber(string.match(entry, '^(%d+):'))
end
local oldest = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
local reset = 0
if oldest[2] then reset = tonumber(oldest[2]) + window - now end
if weight > 0 then
  if used + weight > limit and limit > 0 then return {0, used, reset} end
  redis.call('ZADD', key, now, weight .. ':' .. member)
  redis.call('PEXPIRE', key, window + 1000)
  used = used + weight
elseif used >= limit and limit > 0 then
  return {0, used, reset}
end
return {1, used, reset}
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
            "revoked": self.revoked,
        }


@dataclass(frozen=True)
class Usage:
    """A limit's state, for the x-ratelimit-* headers."""

    limit: int
    remaining: int
    reset_ms: int


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


class KeyStore:
    def __init__(self, redis: aioredis.Redis, namespace: str, window_seconds: float = 60.0) -> None:
        """`window_seconds`: the limits' window; rpm and tpm are per window (a minute unless changed)."""
        self._redis = redis
        self._window_ms = int(window_seconds * 1000)
        ns = namespace or "ragmesh"
        self._by_hash = f"{ns}:apikey:"
        self._index = f"{ns}:apikeys"  # id -> hash of the secret
        self._window = f"{ns}:ratelimit:"
        self._script = redis.register_script(_WINDOW)

    async def create(
        self, name: str, *, expires_in: int | None, models: list[str], rpm: int, tpm: int
    ) -> tuple[str, ApiKey]:
        """(the secret, shown this once; the key)."""
        if not name.strip():
            raise invalid_request("A key needs a name.", param="name")
        if rpm < 0 or tpm < 0 or (expires_in is not None and expires_in <= 0):
            raise invalid_request("rpm and tpm must be 0 or more; expires_in more than 0.", param="rpm")
        secret = KEY_PREFIX + secrets.token_urlsafe(32)
        key = ApiKey(
            id=f"key_{uuid.uuid4().hex[:16]}",
            name=name,
            created=int(time.time()),
            expires_at=math.ceil(time.time() + expires_in) if expires_in else None,  # never less than asked
            models=tuple(models),
            rpm=rpm,
            tpm=tpm,
        )
        digest = _hash(secret)
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.set(self._by_hash + digest, orjson.dumps(key.__dict__))
            pipe.hset(self._index, key.id, digest)
            await pipe.execute()
        return secret, key

    async def list(self) -> list[ApiKey]:
        digests = await self._redis.hgetall(self._index)
        keys = []
        for digest in digests.values():
            raw = await self._redis.get(self._by_hash + (digest.decode() if isinstance(digest, bytes) else digest))
            if raw:
                keys.append(_key(raw))
        return sorted(keys, key=lambda k: k.created)

    async def revoke(self, key_id: str) -> ApiKey:
        found = await self._redis.hget(self._index, key_id)
        digest = found.decode() if isinstance(found, bytes) else found
        raw = await self._redis.get(self._by_hash + digest) if digest else None
        if raw is None or digest is None:
            raise RagmeshError(ErrorKind.NOT_FOUND, f"No such key: {key_id}.", param="key_id")
        revoked = ApiKey(**{**_key(raw).__dict__, "revoked": True})
        await self._redis.set(self._by_hash + digest, orjson.dumps(revoked.__dict__))
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
        raw = await self._redis.get(self._by_hash + _hash(secret))
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

    async def admit(self, key: ApiKey) -> tuple[Usage | None, Usage | None]:
        """Count one request against the key's limits (a 429 with Retry-After when over)."""
        now = int(time.time() * 1000)
        requests_usage = tokens_usage = None
        if key.tpm:
            allowed, used, reset = await self._script(
                keys=[self._window + key.id + ":tpm"], args=[now, key.tpm, 0, "", self._window_ms]
            )
            tokens_usage = Usage(key.tpm, max(0, key.tpm - int(used)), int(reset))
            if not allowed:
                RATE_LIMITED.labels(key.name, "tokens").inc()
                raise _limited(f"Rate limit reached for tokens per minute (limit {key.tpm}).", tokens_usage, "tokens")
        if key.rpm:
            member = uuid.uuid4().hex
            allowed, used, reset = await self._script(
                keys=[self._window + key.id + ":rpm"], args=[now, key.rpm, 1, member, self._window_ms]
            )
            requests_usage = Usage(key.rpm, max(0, key.rpm - int(used)), int(reset))
            if not allowed:
                RATE_LIMITED.labels(key.name, "requests").inc()
                raise _limited(
                    f"Rate limit reached for requests per minute (limit {key.rpm}).", requests_usage, "requests"
                )
        KEY_REQUESTS.labels(key.name).inc()
        return requests_usage, tokens_usage

    async def spend_tokens(self, key: ApiKey, tokens: int) -> None:
        """Charge an answer's tokens to the key's window (may go over: the next request waits)."""
        KEY_TOKENS.labels(key.name).inc(tokens)
        if key.tpm and tokens > 0:
            now = int(time.time() * 1000)
            await self._script(
                keys=[self._window + key.id + ":tpm"], args=[now, 0, tokens, uuid.uuid4().hex, self._window_ms]
            )


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
        retry_after=max(1, -(-usage.reset_ms // 1000)),
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
