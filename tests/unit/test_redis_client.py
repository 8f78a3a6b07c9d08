"""The one Redis client factory: what every service's client is made with."""

from __future__ import annotations

from pathlib import Path

import redis.exceptions

from ragmesh import redis_client as factory
from ragmesh.settings import RedisSettings


async def test_the_client_takes_the_url_credentials_timeouts_health_checks_and_retry_policy() -> None:
    settings = RedisSettings(redis_url="redis://ragmesh:s3cret@redis.internal:6380/2")
    client = factory.redis_client(settings)
    try:
        kwargs = client.connection_pool.connection_kwargs
        assert (kwargs["host"], kwargs["port"], kwargs["db"]) == ("redis.internal", 6380, 2)
        assert (kwargs["username"], kwargs["password"]) == ("ragmesh", "s3cret")
        assert kwargs["socket_timeout"] == factory.SOCKET_TIMEOUT
        assert kwargs["socket_connect_timeout"] == factory.CONNECT_TIMEOUT
        assert kwargs["health_check_interval"] == factory.HEALTH_CHECK_INTERVAL
        retry = kwargs["retry"]
        assert retry.get_retries() == factory.RETRIES
        # Connection errors are retried; a timeout never (the command may have run: a charge, an INCR).
        assert redis.exceptions.ConnectionError in retry._supported_errors
        assert redis.exceptions.TimeoutError not in retry._supported_errors
    finally:
        await client.aclose()


def test_every_service_gets_its_client_from_the_factory() -> None:
    """No service builds a Redis client of its own (the three copies this replaced)."""
    root = Path(__file__).resolve().parents[2]
    for source in (root / "services").glob("*/src/**/*.py"):
        text = source.read_text()
        assert "Redis.from_url" not in text and "aioredis.Redis(" not in text, source
