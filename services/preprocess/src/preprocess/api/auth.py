"""Authentication and per-key rate limits for the public API (an ASGI middleware).

Public without a key: health endpoints, metrics (nginx keeps /metrics off the
gateway), and GET /v1/models when RAGMESH_PREPROCESS_MODELS_PUBLIC is on. The
admin endpoints take the admin key instead. Everything else under /v1 needs a
valid, unexpired, unrevoked key within its limits; the key goes on to the
handlers (allowed models, token accounting) in the request state.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from typing import Any

import orjson
from redis.exceptions import RedisError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from preprocess.keys import ApiKey, KeyStore, rate_limit_headers
from ragmesh.errors import ErrorKind, RagmeshError

log = logging.getLogger(__name__)

PUBLIC = ("/v1/health/live", "/v1/health/ready", "/metrics", "/api/version")
# Ollama's API takes the same keys (its clients send headers={"Authorization": "Bearer ..."}).
OLLAMA_PREFIX = "/api/"


class AuthMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        keys: Callable[[], KeyStore | None],
        enabled: bool,
        models_public: bool,
        max_in_flight: int = 32,
        in_flight_ttl: float = 600.0,
    ) -> None:
        """`max_in_flight`: requests a key may have at once unless it says; `in_flight_ttl`: the
        longest a request may run (an entry a crashed replica left stops counting then)."""
        self.app = app
        self._keys = keys
        self._enabled = enabled
        self._models_public = models_public
        self._max_in_flight = max_in_flight
        self._in_flight_ttl = in_flight_ttl

    def _needs_key(self, scope: Scope) -> bool:
        path: str = scope["path"]
        if not self._enabled or path in PUBLIC or path.startswith("/v1/admin/"):
            return False
        if not path.startswith(("/v1/", OLLAMA_PREFIX)):
            return False
        return not (self._models_public and scope["method"] == "GET" and path.startswith("/v1/models"))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self._needs_key(scope):
            await self.app(scope, receive, send)
            return
        keys = self._keys()
        authorization = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"authorization"), None)
        try:
            if keys is None:
                raise RagmeshError(ErrorKind.UNAVAILABLE, "The key store is starting; retry shortly.", retry_after=1)
            key = await keys.authenticate(authorization)
            requests, tokens = await keys.admit(key)
            # One key cannot hold every engine slot: past its limit in flight, a 429.
            entry = uuid.uuid4().hex
            await keys.enter(key, entry, key.max_in_flight or self._max_in_flight, self._in_flight_ttl)
        except RagmeshError as err:
            await _send_error(send, err, scope["path"])
            return
        except (RedisError, OSError) as exc:
            # Closed, not open: without the key store nobody is let in.
            log.warning("key store unavailable", extra={"error": str(exc)})
            await _send_error(
                send,
                RagmeshError(ErrorKind.UNAVAILABLE, "The key store is unavailable; retry shortly.", retry_after=1),
                scope["path"],
            )
            return
        scope.setdefault("state", {})["api_key"] = key
        extra = [(k.encode(), v.encode()) for k, v in rate_limit_headers(requests, tokens).items()]

        async def send_with_limits(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *extra]
            await send(message)

        try:
            await self.app(scope, receive, send_with_limits)
        finally:
            try:
                await keys.leave(key, entry)
            except (RedisError, OSError) as exc:  # the entry expires with the longest request time
                log.warning("in-flight entry not removed: key store unavailable", extra={"error": str(exc)})


async def _send_error(send: Send, err: RagmeshError, path: str = "") -> None:
    headers = [(b"content-type", b"application/json"), *((k.encode(), v.encode()) for k, v in err.headers.items())]
    if err.retry_after is not None:
        headers.append((b"retry-after", str(err.retry_after).encode()))
    if err.kind is ErrorKind.AUTHENTICATION:
        headers.append((b"www-authenticate", b'Bearer realm="ragmesh"'))
    await send({"type": "http.response.start", "status": err.http_status, "headers": headers})
    body = {"error": err.message} if path.startswith(OLLAMA_PREFIX) else err.to_openai()
    await send({"type": "http.response.body", "body": orjson.dumps(body)})


def api_key_of(scope_or_request: Any) -> ApiKey | None:
    """The key that authenticated this request (None when auth is off)."""
    state = scope_or_request.scope.get("state", {}) if hasattr(scope_or_request, "scope") else {}
    key = state.get("api_key")
    return key if isinstance(key, ApiKey) else None


def owner_of(request: Any) -> str | None:
    """Whose files and batches a request may see: its key's id (None when auth is off: everyone's)."""
    key = api_key_of(request)
    return key.id if key is not None else None
