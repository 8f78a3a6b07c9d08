"""The one place a service connects to Redis: `redis_client(settings)`.

Every service (preprocess, retrieval, postprocess) gets its client here, so they all meet
Redis alike: the URL from `RAGMESH_REDIS_URL` (its credentials too:
`redis://[user]:password@host:port/db`, `rediss://` for TLS), short socket timeouts (a
Redis that hangs is a 503 within seconds, never a request held to its deadline), a ping
before reusing a connection idle longer than the health-check interval (a connection
Redis or a proxy dropped is replaced, not failed on), and a short retry of commands that
met a broken or refused connection.
"""

from __future__ import annotations

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError

from ragmesh.settings import RedisSettings

# Seconds a command may wait for its reply, and a connection for its handshake.
SOCKET_TIMEOUT = 2.0
CONNECT_TIMEOUT = 2.0
# A connection idle longer than this (seconds) is pinged before it is used again.
HEALTH_CHECK_INTERVAL = 15
# Retries of a command whose connection broke or was refused, 50 ms then 100 ms apart. Only
# connection errors: a command that timed out may have run (an INCR, a charge script), so it
# is never sent again; the caller sees the timeout (a 503).
RETRIES = 2
BACKOFF_BASE = 0.05
BACKOFF_CAP = 0.5


def retry_policy(retries: int = RETRIES) -> Retry:
    """The retry policy of every client: exponential backoff, connection errors only."""
    return Retry(ExponentialBackoff(cap=BACKOFF_CAP, base=BACKOFF_BASE), retries, (RedisConnectionError,))


def redis_client(
    settings: RedisSettings,
    *,
    socket_timeout: float = SOCKET_TIMEOUT,
    connect_timeout: float = CONNECT_TIMEOUT,
    health_check_interval: int = HEALTH_CHECK_INTERVAL,
    retries: int = RETRIES,
) -> aioredis.Redis:
    """A client (with its connection pool) for the Redis of `settings.redis_url`; close it
    with `await client.aclose()`. Nothing connects until the first command."""
    return aioredis.Redis.from_url(
        settings.redis_url,
        socket_timeout=socket_timeout,
        socket_connect_timeout=connect_timeout,
        health_check_interval=health_check_interval,
        # redis-py's own default retries 10 times on timeouts too: a frozen Redis then held each
        # command for over 20 s, and a command that timed out after it ran was run again.
        retry=retry_policy(retries),
    )
