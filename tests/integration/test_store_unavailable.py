"""The Files and Batches API over HTTP when Redis does not answer: every route is a 503 in
OpenAI's shape with Retry-After (a dependency down), never a 500.

The preprocess app runs in this process (its real lifespan: Redis client, RabbitMQ publisher,
file store) on a redis-server of the test's own, frozen with SIGSTOP (every command times
out, as in a `CLIENT PAUSE`), then stopped (connections refused).
"""

from __future__ import annotations

import io
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from preprocess.app import create_app
from preprocess.settings import PreprocessSettings

from ..conftest import PrivateRedis, delete_topology, private_redis_server, unique_namespace
from .batch_harness import embedding_lines


@pytest.fixture
def store(tmp_path: Path) -> Iterator[PrivateRedis]:
    with private_redis_server(tmp_path) as server:
        yield server


@pytest.fixture
async def client(tmp_path: Path, store: PrivateRedis, amqp_url: str) -> AsyncIterator[httpx.AsyncClient]:
    namespace = unique_namespace()
    settings = PreprocessSettings(
        namespace=namespace,
        redis_url=store.url,
        amqp_url=amqp_url,
        files_dir=str(tmp_path / "files"),
        batch_workers=0,  # the lines stay queued: only the HTTP side is under test
        batch_sweep_interval=0,
        queue_metrics_interval=0,
        admin_port=0,
        auth="off",  # the routes themselves, not the key store in front of them, meet Redis first
    )
    app = create_app(settings)
    try:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)  # a 500, as a server answers
            async with httpx.AsyncClient(transport=transport, base_url="http://preprocess", timeout=60) as http:
                yield http
    finally:
        await delete_topology(amqp_url, namespace)


def upload(data: bytes) -> dict[str, Any]:
    return {"files": {"file": ("lines.jsonl", io.BytesIO(data), "application/jsonl")}, "data": {"purpose": "batch"}}


async def calls_while_down(http: httpx.AsyncClient, file_id: str, batch_id: str) -> dict[str, httpx.Response]:
    return {
        "POST /v1/files": await http.post("/v1/files", **upload(embedding_lines(2))),
        "GET /v1/files": await http.get("/v1/files"),
        "GET /v1/files/{id}": await http.get(f"/v1/files/{file_id}"),
        "GET /v1/files/{id}/content": await http.get(f"/v1/files/{file_id}/content"),
        "DELETE /v1/files/{id}": await http.delete(f"/v1/files/{file_id}"),
        "POST /v1/batches": await http.post(
            "/v1/batches", json={"input_file_id": file_id, "endpoint": "/v1/embeddings", "completion_window": "24h"}
        ),
        "GET /v1/batches": await http.get("/v1/batches"),
        "GET /v1/batches/{id}": await http.get(f"/v1/batches/{batch_id}"),
        "POST /v1/batches/{id}/cancel": await http.post(f"/v1/batches/{batch_id}/cancel"),
    }


def assert_unavailable(replies: dict[str, httpx.Response]) -> None:
    for route, reply in replies.items():
        assert reply.status_code == 503, f"{route}: {reply.status_code} {reply.text}"
        error = reply.json()["error"]
        assert {"message", "type", "param", "code"} <= set(error) and error["type"] == "server_error", route
        assert "Redis" in error["message"] and reply.headers.get("retry-after"), route


async def test_files_and_batches_answer_503_while_redis_hangs_then_serve_again(
    client: httpx.AsyncClient, store: PrivateRedis
) -> None:
    uploaded = await client.post("/v1/files", **upload(embedding_lines(3)))
    assert uploaded.status_code == 200, uploaded.text
    file_id = uploaded.json()["id"]
    created = await client.post(
        "/v1/batches", json={"input_file_id": file_id, "endpoint": "/v1/embeddings", "completion_window": "24h"}
    )
    assert created.status_code == 200, created.text
    batch_id = created.json()["id"]

    store.freeze()
    try:
        assert_unavailable(await calls_while_down(client, file_id, batch_id))
    finally:
        store.thaw()
    batch = await client.get(f"/v1/batches/{batch_id}")
    assert batch.status_code == 200 and batch.json()["status"] == "in_progress"
    assert (await client.get(f"/v1/files/{file_id}")).status_code == 200


async def test_files_and_batches_answer_503_while_redis_is_down(client: httpx.AsyncClient, store: PrivateRedis) -> None:
    uploaded = await client.post("/v1/files", **upload(embedding_lines(1)))
    assert uploaded.status_code == 200, uploaded.text
    store.process.kill()
    store.process.wait(10)
    assert_unavailable(await calls_while_down(client, uploaded.json()["id"], "batch_gone"))
