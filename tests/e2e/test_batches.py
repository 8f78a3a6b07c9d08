"""OpenAI Files + Batches and the direct queue protocol, through the gateway and the real broker."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from ..conftest import close_own_connections
from .conftest import MODEL, Mesh

pytestmark = pytest.mark.e2e

FINAL = ("completed", "failed", "cancelled", "expired")


def chat_line(custom_id: str, text: str = "Say hi.", max_tokens: int = 4, **extra: Any) -> dict[str, Any]:
    body = {"model": MODEL, "messages": [{"role": "user", "content": text}], "max_tokens": max_tokens, **extra}
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": body}


def jsonl(lines: list[dict[str, Any]]) -> bytes:
    return b"".join(json.dumps(line).encode() + b"\n" for line in lines)


def submit(client: openai.OpenAI, lines: list[dict[str, Any]], endpoint: str = "/v1/chat/completions") -> str:
    uploaded = client.files.create(file=("lines.jsonl", io.BytesIO(jsonl(lines))), purpose="batch")
    batch = client.batches.create(input_file_id=uploaded.id, endpoint=endpoint, completion_window="24h")  # type: ignore[arg-type]
    # A small batch can be done before create answers: past validating is what is promised.
    assert batch.status in ("in_progress", "finalizing", "completed") and batch.request_counts is not None
    assert batch.request_counts.total == len(lines)
    return batch.id


def wait(client: openai.OpenAI, batch_id: str, timeout: float = 240) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        batch = client.batches.retrieve(batch_id)
        if batch.status in FINAL:
            return batch
        assert time.monotonic() < deadline, f"batch stuck: {batch.status} {batch.request_counts}"
        time.sleep(0.3)


def results(client: openai.OpenAI, file_id: str | None) -> list[dict[str, Any]]:
    if not file_id:
        return []
    return [json.loads(line) for line in client.files.content(file_id).text.splitlines() if line]


def wait_until(predicate: Any, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline
        time.sleep(0.2)


def test_openai_batch_workflow_chat_and_embeddings(mesh: Mesh) -> None:
    client = mesh.openai()
    lines = [chat_line(f"chat-{i}", f"Say the number {i}.") for i in range(6)]
    lines.append(chat_line("rag-0", "What causes tides?", rag={"collection": "e2e-batch-rag", "top_k": 1}))
    httpx.post(f"{mesh.v1}/collections", json={"name": "e2e-batch-rag"})
    batch = wait(client, submit(client, lines))
    assert batch.status == "completed" and batch.request_counts.completed == 7 and batch.request_counts.failed == 0
    out = results(client, batch.output_file_id)
    assert [r["custom_id"] for r in out] == [line["custom_id"] for line in lines]  # input order
    for record in out:
        assert record["response"]["status_code"] == 200 and record["error"] is None
        assert record["response"]["body"]["object"] == "chat.completion"
    assert out[-1]["response"]["body"]["rag"]["status"] == "no_sources"
    assert batch.id in [b.id for b in client.batches.list(limit=50)]

    embed_lines = [
        {
            "custom_id": f"e{i}",
            "method": "POST",
            "url": "/v1/embeddings",
            "body": {"model": "all-MiniLM-L6-v2", "input": f"text {i}"},
        }
        for i in range(20)
    ]
    embedded = wait(client, submit(client, embed_lines, "/v1/embeddings"))
    vectors = results(client, embedded.output_file_id)
    assert len(vectors) == 20 and len(vectors[0]["response"]["body"]["data"][0]["embedding"]) == 384


def test_a_poison_line_fails_alone(mesh: Mesh) -> None:
    client = mesh.openai()
    lines = [
        chat_line("good-1"),
        {
            "custom_id": "bad",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {"model": MODEL, "messages": "not a list"},
        },
        chat_line("good-2"),
    ]
    batch = wait(client, submit(client, lines))
    assert batch.status == "completed" and (batch.request_counts.completed, batch.request_counts.failed) == (2, 1)
    errors = results(client, batch.error_file_id)
    assert [e["custom_id"] for e in errors] == ["bad"]
    assert errors[0]["response"]["status_code"] == 400
    assert {"message", "type", "param", "code"} <= set(errors[0]["response"]["body"]["error"])
    assert [r["custom_id"] for r in results(client, batch.output_file_id)] == ["good-1", "good-2"]


@pytest.mark.parametrize(
    ("content", "status"),
    [
        (b"this is not json\n", 400),
        (jsonl([{"method": "POST", "url": "/v1/chat/completions", "body": {}}]), 400),
        (jsonl([chat_line("same"), chat_line("same")]), 400),
        (jsonl([{**chat_line("x"), "url": "/v1/images/generations"}]), 400),
        (b"x" * 250_001, 413),
    ],
    ids=["not jsonl", "no custom_id", "duplicate custom_id", "unsupported url", "over the size limit"],
)
def test_bad_files_are_refused_at_upload(mesh: Mesh, content: bytes, status: int) -> None:
    reply = httpx.post(f"{mesh.v1}/files", files={"file": ("f.jsonl", content)}, data={"purpose": "batch"}, timeout=30)
    assert reply.status_code == status, reply.text
    assert set(reply.json()["error"]) == {"message", "type", "param", "code", "request_id"}


def test_bad_batch_creation(mesh: Mesh) -> None:
    missing = httpx.post(f"{mesh.v1}/batches", json={"input_file_id": "file-nope", "endpoint": "/v1/chat/completions"})
    assert missing.status_code == 404
    client = mesh.openai()
    uploaded = client.files.create(file=("l.jsonl", io.BytesIO(jsonl([chat_line("a")]))), purpose="batch")
    wrong = httpx.post(f"{mesh.v1}/batches", json={"input_file_id": uploaded.id, "endpoint": "/v1/embeddings"})
    assert wrong.status_code == 400 and wrong.json()["error"]["param"] == "input_file_id"
    assert httpx.get(f"{mesh.v1}/batches/batch_nope").status_code == 404


def test_cancel_stops_new_lines(mesh: Mesh) -> None:
    client = mesh.openai()
    lines = [chat_line(f"c{i}", "Write a long story.", max_tokens=24) for i in range(40)]
    batch_id = submit(client, lines)
    cancelling = client.batches.cancel(batch_id)
    assert cancelling.status in ("cancelling", "cancelled")
    batch = wait(client, batch_id)
    assert batch.status == "cancelled"
    counts = batch.request_counts
    assert counts.completed + counts.failed == 40 and counts.failed > 0
    errors = results(client, batch.error_file_id)
    assert all(e["error"]["code"] == "batch_cancelled" for e in errors)
    assert len({r["custom_id"] for r in errors + results(client, batch.output_file_id)}) == 40


def exactly_once(client: openai.OpenAI, batch: Any, n: int) -> None:
    out = results(client, batch.output_file_id) + results(client, batch.error_file_id)
    ids = [r["custom_id"] for r in out]
    assert sorted(ids) == sorted(f"k{i}" for i in range(n)), "every line once, none twice"
    assert batch.request_counts.completed + batch.request_counts.failed == n


def test_worker_killed_mid_batch_loses_and_duplicates_nothing(mesh: Mesh) -> None:
    client = mesh.openai()
    n = 24
    batch_id = submit(client, [chat_line(f"k{i}", "Tell me a story.", max_tokens=12) for i in range(n)])
    wait_until(lambda: client.batches.retrieve(batch_id).request_counts.completed >= 3)  # type: ignore[union-attr]
    os.kill(int(mesh.supervisorctl("pid", "preprocess")), signal.SIGKILL)
    wait_until(lambda: httpx.get(f"{mesh.gateway}/v1/health/ready", timeout=5).status_code == 200)
    batch = wait(client, batch_id)
    assert batch.status == "completed"
    exactly_once(client, batch, n)


def test_broker_connections_dropped_mid_batch_lose_and_duplicate_nothing(mesh: Mesh) -> None:
    """The broker drops every connection of this mesh (its own only: the broker is shared) while
    lines run: workers come back by themselves, unacked lines are delivered again."""
    client = mesh.openai()
    n = 24
    batch_id = submit(client, [chat_line(f"k{i}", "Tell me a story.", max_tokens=12) for i in range(n)])
    wait_until(lambda: client.batches.retrieve(batch_id).request_counts.completed >= 3)  # type: ignore[union-attr]
    assert close_own_connections(mesh.env["RAGMESH_NAMESPACE"]) > 0
    batch = wait(client, batch_id)
    assert batch.status == "completed"
    exactly_once(client, batch, n)


async def test_direct_queue_protocol_is_idempotent(mesh: Mesh) -> None:
    """The documented producer (examples/direct_producer.py) against the real broker."""
    from examples.direct_producer import request_once

    url = os.environ.get("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
    namespace = mesh.env["RAGMESH_NAMESPACE"]
    body = chat_line("x", "Invent a word.", temperature=1.5)["body"]
    message_id = uuid.uuid4().hex
    # The same message twice: one run (sampling at temperature 1.5 would differ), one stored answer.
    first = await request_once(url, namespace, "/v1/chat/completions", body, message_id)
    second = await request_once(url, namespace, "/v1/chat/completions", body, message_id)
    assert first["status_code"] == 200 and first["body"]["object"] == "chat.completion"
    assert first == second


def test_cli_batch_submit_waits_and_saves_results(mesh: Mesh, tmp_path: Path) -> None:
    source = tmp_path / "lines.jsonl"
    source.write_bytes(jsonl([chat_line("cli-1"), chat_line("cli-2")]))
    run = subprocess.run(
        [str(Path(sys.executable).parent / "ragmesh"), "--url", mesh.gateway, "batch", "submit", str(source), "--wait"],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    assert "completed: 2 completed, 0 failed" in run.stderr
    saved = [json.loads(line) for line in (tmp_path / "lines.output.jsonl").read_text().splitlines()]
    assert [r["custom_id"] for r in saved] == ["cli-1", "cli-2"]


def embedding_line(custom_id: str) -> dict[str, Any]:
    body = {"model": "all-MiniLM-L6-v2", "input": f"text {custom_id}"}
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/embeddings", "body": body}


def test_files_are_listed_in_pages_and_deleted(mesh: Mesh) -> None:
    client = mesh.openai()
    mine = [
        client.files.create(file=(f"f{i}.jsonl", io.BytesIO(jsonl([embedding_line("x")]))), purpose="batch").id
        for i in range(3)
    ]
    first = client.files.list(purpose="batch", limit=2)
    assert len(first.data) == 2 and first.has_more
    listed = [f.id for f in client.files.list(purpose="batch", limit=2)]  # every page, newest first
    assert [i for i in listed if i in mine] == mine[::-1]
    assert all(f.purpose == "batch" and f.expires_at for f in first.data)

    deleted = client.files.delete(mine[1])
    assert deleted.id == mine[1] and deleted.deleted
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(mine[1])
    with pytest.raises(openai.NotFoundError):
        client.files.content(mine[1])
    assert mine[1] not in [f.id for f in client.files.list()]
    missing = httpx.delete(f"{mesh.v1}/files/file-nope")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "file_not_found"


def test_batches_are_listed_in_pages_newest_first(mesh: Mesh) -> None:
    client = mesh.openai()
    made = [submit(client, [embedding_line(f"p{i}")], "/v1/embeddings") for i in range(3)]
    page = client.batches.list(limit=2)
    assert len(page.data) == 2 and page.has_more
    every = [b.id for b in client.batches.list(limit=2)]  # the client follows `after` page by page
    assert [i for i in every if i in made] == made[::-1]
    assert len(every) == len(set(every))


def test_a_batch_past_its_completion_window_ends_expired(mesh: Mesh) -> None:
    """A 1 s window for 100 chat lines on a 4-slot engine: the lines not done fail with
    batch_expired, those done keep their result, and counts and files agree."""
    client = mesh.openai()
    lines = [chat_line(f"w{i}", "Write a long story.", max_tokens=64) for i in range(100)]
    uploaded = client.files.create(file=("lines.jsonl", io.BytesIO(jsonl(lines))), purpose="batch")
    created = client.batches.create(
        input_file_id=uploaded.id,
        endpoint="/v1/chat/completions",
        completion_window="1s",  # type: ignore[arg-type]
    )
    assert created.expires_at == created.created_at + 1
    batch = wait(client, created.id)
    assert batch.status == "expired" and batch.expired_at
    out, errors = results(client, batch.output_file_id), results(client, batch.error_file_id)
    assert sorted(r["custom_id"] for r in out + errors) == sorted(line["custom_id"] for line in lines)
    assert (batch.request_counts.completed, batch.request_counts.failed) == (len(out), len(errors))
    assert errors and {e["error"]["code"] for e in errors} == {"batch_expired"}


async def test_a_direct_request_that_cannot_be_read_is_answered_with_a_400(mesh: Mesh) -> None:
    import aio_pika

    url = os.environ.get("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
    namespace = mesh.env["RAGMESH_NAMESPACE"]
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        replies = await channel.declare_queue("", exclusive=True, auto_delete=True)
        exchange = await channel.get_exchange(f"{namespace}.requests")
        await exchange.publish(
            aio_pika.Message(
                b'{"v": 9, "url": "/v1/embeddings", "body": {}}', reply_to=replies.name, correlation_id="c1"
            ),
            routing_key="request",
        )
        message = await replies.iterator(timeout=60).__anext__()
        await message.ack()
    reply = json.loads(message.body)
    assert message.correlation_id == "c1" and reply["v"] == 1 and reply["status_code"] == 400
    assert "version" in reply["body"]["error"]["message"]
