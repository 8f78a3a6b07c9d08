"""A Redis error is a 503 everywhere: the real preprocess app (its lifespan, Redis client,
RabbitMQ publisher, batch worker, key store) over HTTP, on the shared Redis and RabbitMQ, with
the fault injected at an exact Redis call (a wrapper that makes the client raise
redis.exceptions.ConnectionError or TimeoutError for the commands that name one key family of
this test's namespace; every other command, and every other namespace, is served).

The batch line case failed before the error table read Redis errors: a line whose key lookup
met Redis down was recorded in the batch's error file as a 500 ("internal error:
ConnectionError") and never retried.
"""

from __future__ import annotations

import asyncio
import io
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import redis.asyncio as aioredis
import redis.exceptions
from redis.asyncio.client import Pipeline

from preprocess.app import create_app
from preprocess.settings import PreprocessSettings

from ..conftest import delete_topology, free_port, unique_namespace
from .batch_harness import embedding_lines

FAULTS = [redis.exceptions.ConnectionError, redis.exceptions.TimeoutError]
FINAL = ("completed", "failed", "cancelled", "expired")


class RedisFault:
    """Makes every Redis client of this process raise `error` for the commands (and transactions)
    whose arguments contain `needle`, which always includes this test's namespace."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, namespace: str) -> None:
        self.namespace = namespace
        self.needle: bytes | None = None
        self.error: type[Exception] = redis.exceptions.ConnectionError
        self.hits = 0
        fault = self
        command = aioredis.Redis.execute_command
        transaction = Pipeline.execute

        async def execute_command(client: aioredis.Redis, *args: Any, **options: Any) -> Any:
            fault.check(args)
            return await command(client, *args, **options)  # type: ignore[no-untyped-call]

        async def execute(pipe: Pipeline, raise_on_error: bool = True) -> Any:
            for args, _ in pipe.command_stack:
                fault.check(args)
            return await transaction(pipe, raise_on_error)

        monkeypatch.setattr(aioredis.Redis, "execute_command", execute_command)
        monkeypatch.setattr(Pipeline, "execute", execute)

    def on(self, family: str, error: type[Exception]) -> None:
        """Fail from now on every command naming a key of `family` (`":apikeys"`, `":file:"` ...)."""
        self.needle, self.error = f"{self.namespace}{family}".encode(), error

    def off(self) -> None:
        self.needle = None

    def check(self, args: tuple[Any, ...]) -> None:
        if self.needle is None:
            return
        if any(self.needle in (a if isinstance(a, bytes) else str(a).encode()) for a in args):
            self.hits += 1
            raise self.error("injected by the test")


@pytest.fixture
def namespace() -> str:
    return unique_namespace()


@pytest.fixture
def fault(monkeypatch: pytest.MonkeyPatch, namespace: str) -> RedisFault:
    return RedisFault(monkeypatch, namespace)


@pytest.fixture
async def cleanup(namespace: str, redis_url: str, amqp_url: str) -> AsyncIterator[None]:
    yield
    await delete_topology(amqp_url, namespace)
    client = aioredis.Redis.from_url(redis_url)
    try:
        async for key in client.scan_iter(f"{namespace}:*", count=1000):
            await client.delete(key)
    finally:
        await client.aclose()


@asynccontextmanager
async def preprocess(settings: PreprocessSettings) -> AsyncIterator[tuple[httpx.AsyncClient, Any]]:
    """The real app, served in this process; (an HTTP client to it, the app)."""
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)  # a 500, as a server answers
        async with httpx.AsyncClient(transport=transport, base_url="http://preprocess", timeout=60) as http:
            yield http, app


def settings_for(namespace: str, redis_url: str, amqp_url: str, files: Path, workers: int) -> PreprocessSettings:
    dead = f"127.0.0.1:{free_port()}"  # no peer: the lines under test never get past Redis
    return PreprocessSettings(
        namespace=namespace,
        redis_url=redis_url,
        amqp_url=amqp_url,
        files_dir=str(files),
        inference_addr=dead,
        retrieval_addr=dead,
        postprocess_addr=dead,
        batch_workers=workers,
        batch_max_retries=1,
        batch_backoff_base=0.05,
        batch_backoff_max=0.1,
        batch_sweep_interval=0,
        queue_metrics_interval=0,
        admin_port=0,
        auth="on",
    )


def upload(data: bytes) -> dict[str, Any]:
    return {"files": {"file": ("lines.jsonl", io.BytesIO(data), "application/jsonl")}, "data": {"purpose": "batch"}}


def assert_unavailable(reply: httpx.Response, what: str) -> None:
    assert reply.status_code == 503, f"{what}: {reply.status_code} {reply.text}"
    error = reply.json()["error"]
    assert {"message", "type", "param", "code"} <= set(error), what
    assert error["type"] == "server_error" and error["code"] == "service_unavailable", what
    assert "unavailable" in error["message"] and "injected" not in error["message"], what  # never Redis's text
    assert reply.headers.get("retry-after"), what


async def final(http: httpx.AsyncClient, batch_id: str, auth: dict[str, str]) -> dict[str, Any]:
    """The batch once it ended (polled as a client does)."""
    deadline = time.monotonic() + 60
    while True:
        reply = await http.get(f"/v1/batches/{batch_id}", headers=auth)
        if reply.status_code == 200 and reply.json()["status"] in FINAL:
            return dict(reply.json())
        assert time.monotonic() < deadline, f"batch stuck: {reply.status_code} {reply.text}"
        await asyncio.sleep(0.05)


@pytest.mark.usefixtures("cleanup")
@pytest.mark.parametrize("error", FAULTS, ids=lambda e: e.__name__)
async def test_a_batch_line_that_meets_redis_down_is_retried_then_a_503_in_the_error_file_never_a_500(
    tmp_path: Path, namespace: str, redis_url: str, amqp_url: str, fault: RedisFault, error: type[Exception]
) -> None:
    async with preprocess(settings_for(namespace, redis_url, amqp_url, tmp_path / "files", workers=1)) as (http, app):
        secret, _ = await app.state.serving.keys.create("redis-fault", expires_in=None, models=[], rpm=0, tpm=0)
        auth = {"Authorization": f"Bearer {secret}"}
        uploaded = await http.post("/v1/files", headers=auth, **upload(embedding_lines(1)))
        assert uploaded.status_code == 200, uploaded.text
        # The worker looks the line's key up by id (HGET {ns}:apikeys): Redis fails right there.
        # HTTP requests authenticate by the secret's hash, so they go on being served.
        fault.on(":apikeys", error)
        created = await http.post(
            "/v1/batches",
            headers=auth,
            json={"input_file_id": uploaded.json()["id"], "endpoint": "/v1/embeddings", "completion_window": "24h"},
        )
        assert created.status_code == 200, created.text
        batch = await final(http, created.json()["id"], auth)
        assert batch["status"] == "completed" and batch["request_counts"]["failed"] == 1, batch
        content = await http.get(f"/v1/files/{batch['error_file_id']}/content", headers=auth)
        assert content.status_code == 200, content.text
        fault.off()
    (record,) = [orjson.loads(line) for line in content.content.splitlines()]
    response = record["response"]
    assert response["status_code"] == 503, record
    assert response["body"]["error"]["type"] == "server_error", record
    assert response["body"]["error"]["code"] == "service_unavailable", record
    assert "gave up after 2 attempts" in record["error"]["message"], record  # retried first, as a dependency down
    assert fault.hits == 2


def routes(file_id: str, batch_id: str) -> list[tuple[str, str, Callable[[httpx.AsyncClient, Any], Any]]]:
    """(the key family whose commands fail, the route, its call)."""
    start = {"input_file_id": file_id, "endpoint": "/v1/embeddings", "completion_window": "24h"}
    return [
        (":files:", "POST /v1/files", lambda h, a: h.post("/v1/files", headers=a, **upload(embedding_lines(2)))),
        (":files:", "GET /v1/files", lambda h, a: h.get("/v1/files", headers=a)),
        (":file:", "GET /v1/files/{id}", lambda h, a: h.get(f"/v1/files/{file_id}", headers=a)),
        (":file:", "GET /v1/files/{id}/content", lambda h, a: h.get(f"/v1/files/{file_id}/content", headers=a)),
        (":file:", "DELETE /v1/files/{id}", lambda h, a: h.delete(f"/v1/files/{file_id}", headers=a)),
        (":batch:", "POST /v1/batches", lambda h, a: h.post("/v1/batches", headers=a, json=start)),
        (":batches:", "GET /v1/batches", lambda h, a: h.get("/v1/batches", headers=a)),
        (":batch:", "GET /v1/batches/{id}", lambda h, a: h.get(f"/v1/batches/{batch_id}", headers=a)),
        (":batch:", "POST /v1/batches/{id}/cancel", lambda h, a: h.post(f"/v1/batches/{batch_id}/cancel", headers=a)),
        (":job:", "GET /v1/jobs/{id}", lambda h, a: h.get("/v1/jobs/job_x", headers=a)),
        (":apikey:", "key store (authentication)", lambda h, a: h.get("/v1/batches", headers=a)),
        (":inflight:", "key store (requests in flight)", lambda h, a: h.get("/v1/batches", headers=a)),
        (":ratelimit:", "rate limits", lambda h, a: h.get("/v1/batches", headers=a)),
    ]


@pytest.mark.usefixtures("cleanup")
@pytest.mark.parametrize("error", FAULTS, ids=lambda e: e.__name__)
async def test_every_route_answers_503_when_redis_fails_at_its_call_then_serves_again(
    tmp_path: Path, namespace: str, redis_url: str, amqp_url: str, fault: RedisFault, error: type[Exception]
) -> None:
    async with preprocess(settings_for(namespace, redis_url, amqp_url, tmp_path / "files", workers=0)) as (http, app):
        # A key with limits, so its requests run the rate-limit script too.
        secret, _ = await app.state.serving.keys.create("redis-fault", expires_in=None, models=[], rpm=10**6, tpm=0)
        auth = {"Authorization": f"Bearer {secret}"}
        uploaded = await http.post("/v1/files", headers=auth, **upload(embedding_lines(2)))
        assert uploaded.status_code == 200, uploaded.text
        file_id = uploaded.json()["id"]
        created = await http.post(
            "/v1/batches",
            headers=auth,
            json={"input_file_id": file_id, "endpoint": "/v1/embeddings", "completion_window": "24h"},
        )
        assert created.status_code == 200, created.text
        batch_id = created.json()["id"]
        for family, route, call in routes(file_id, batch_id):
            fault.on(family, error)
            hits = fault.hits
            try:
                reply = await call(http, auth)
            finally:
                fault.off()
            assert fault.hits > hits, f"{route}: never met Redis at {family}"
            assert_unavailable(reply, route)
        # Nothing half-done: the file and the batch are as they were.
        assert (await http.get(f"/v1/files/{file_id}", headers=auth)).status_code == 200
        batch = await http.get(f"/v1/batches/{batch_id}", headers=auth)
        assert batch.status_code == 200 and batch.json()["status"] == "in_progress", batch.text
