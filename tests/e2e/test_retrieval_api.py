"""Collections, ingestion, search and embeddings through nginx, as a user would use them."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import pytest

from .conftest import ROOT, Mesh

pytestmark = pytest.mark.e2e

DOCS = [
    {
        "id": "cats",
        "title": "Cats",
        "text": "Cats are small domesticated carnivorous mammals that purr and sleep a lot.",
    },
    {
        "id": "rockets",
        "title": "Rockets",
        "text": "A rocket engine burns stored propellant and ejects exhaust to make thrust.",
    },
    {"id": "bread", "title": "Bread", "text": "Bread is baked from flour, water and yeast after the dough has risen."},
    {"id": "tides", "title": "Tides", "text": "Ocean tides come from the gravitational pull of the moon and the sun."},
]


def wait_job(http: httpx.Client, job_id: str, timeout: float = 120) -> tuple[dict[str, Any], list[str]]:
    """The finished job and every status seen on the way."""
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = http.get(f"/v1/jobs/{job_id}").json()
        if not seen or seen[-1] != job["status"]:
            seen.append(job["status"])
        if job["status"] in ("succeeded", "failed"):
            return job, seen
        time.sleep(0.05)
    raise TimeoutError(job_id)


def add(http: httpx.Client, name: str, docs: list[dict[str, Any]]) -> dict[str, Any]:
    reply = http.post(f"/v1/collections/{name}/documents", json={"documents": docs})
    assert reply.status_code == 202, reply.text
    return reply.json()  # type: ignore[no-any-return]


def search(http: httpx.Client, **body: Any) -> httpx.Response:
    return http.post("/v1/search", json=body)


def test_collection_ingest_and_search_through_the_gateway(http: httpx.Client) -> None:
    created = http.post("/v1/collections", json={"name": "e2e-facts"})
    assert created.status_code == 201 and created.json()["name"] == "e2e-facts"
    accepted = add(http, "e2e-facts", DOCS)
    assert accepted["status"] == "queued" and accepted["documents"] == 4 and accepted["chunks"] == 4
    job, seen = wait_job(http, accepted["job_id"])
    assert job["status"] == "succeeded" and job["done"] == job["total"] == 4, job
    assert seen[-1] == "succeeded" and set(seen) <= {"queued", "running", "succeeded"}
    for mode, query, expected in (
        ("hybrid", "why does the sea rise and fall", "tides"),
        ("dense", "spacecraft propulsion", "rockets"),
        ("sparse", "flour yeast dough", "bread"),
    ):
        reply = search(http, collection="e2e-facts", query=query, top_k=2, mode=mode)
        assert reply.status_code == 200, reply.text
        results = reply.json()["results"]
        assert results[0]["document_id"] == expected
        assert set(results[0]) == {"document_id", "chunk_id", "score", "text", "title", "metadata"}
    listed = http.get("/v1/collections").json()["data"]
    assert {"name": "e2e-facts", "documents": 4, "chunks": 4}.items() <= next(
        c for c in listed if c["name"] == "e2e-facts"
    ).items()


def test_delete_is_immediate_and_recreate_starts_empty(http: httpx.Client) -> None:
    assert http.post("/v1/collections", json={"name": "e2e-gone"}).status_code == 201
    wait_job(http, add(http, "e2e-gone", DOCS[:1])["job_id"])
    assert http.delete("/v1/collections/e2e-gone").json() == {
        "name": "e2e-gone",
        "object": "collection.deleted",
        "deleted": True,
    }
    assert search(http, collection="e2e-gone", query="cats").status_code == 404
    assert http.post("/v1/collections", json={"name": "e2e-gone"}).status_code == 201
    assert search(http, collection="e2e-gone", query="cats").json()["results"] == []


def test_restarted_retrieval_service_keeps_collections(mesh: Mesh, http: httpx.Client) -> None:
    http.post("/v1/collections", json={"name": "e2e-durable"})
    wait_job(http, add(http, "e2e-durable", DOCS)["job_id"])
    before = search(http, collection="e2e-durable", query="purring pets", cache=False).json()["results"]
    assert "retrieval: started" in mesh.supervisorctl("restart", "retrieval")
    deadline = time.monotonic() + 120
    while http.get("/v1/health/ready").status_code != 200:
        assert time.monotonic() < deadline, "retrieval did not come back"
        time.sleep(0.5)
    after = search(http, collection="e2e-durable", query="purring pets", cache=False).json()["results"]
    assert [r["chunk_id"] for r in after] == [r["chunk_id"] for r in before] and after[0]["document_id"] == "cats"


BAD: list[tuple[str, str, Any, int, str | None]] = [
    ("unknown collection search", "/v1/search", {"collection": "nope", "query": "q"}, 404, "collection"),
    ("unknown collection ingest", "/v1/collections/nope/documents", {"documents": DOCS[:1]}, 404, "collection"),
    ("duplicate collection", "/v1/collections", {"name": "e2e-dup"}, 409, "name"),
    ("bad collection name", "/v1/collections", {"name": "has space"}, 400, "name"),
    (
        "empty text",
        "/v1/collections/e2e-dup/documents",
        {"documents": [{"id": "x", "text": "  \x00 "}]},
        400,
        "documents[0].text",
    ),
    (
        "over-long text",
        "/v1/collections/e2e-dup/documents",
        {"documents": [{"id": "x", "text": "a" * 200_001}]},
        400,
        "documents[0].text",
    ),
    (
        "too many documents",
        "/v1/collections/e2e-dup/documents",
        {"documents": [{"id": str(i), "text": "t"} for i in range(51)]},
        413,
        "documents",
    ),
    ("no documents", "/v1/collections/e2e-dup/documents", {"documents": []}, 400, "documents"),
    (
        "duplicate ids",
        "/v1/collections/e2e-dup/documents",
        {"documents": [{"id": "a", "text": "x"}] * 2},
        400,
        "documents[1].id",
    ),
    ("top_k too small", "/v1/search", {"collection": "e2e-dup", "query": "q", "top_k": 0}, 400, "top_k"),
    ("top_k too large", "/v1/search", {"collection": "e2e-dup", "query": "q", "top_k": 1000}, 400, "top_k"),
    ("unknown mode", "/v1/search", {"collection": "e2e-dup", "query": "q", "mode": "fuzzy"}, 400, "mode"),
    ("empty query", "/v1/search", {"collection": "e2e-dup", "query": ""}, 400, "query"),
]


@pytest.mark.parametrize(("name", "path", "body", "status", "param"), BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_refused_and_nothing_is_half_ingested(
    http: httpx.Client, name: str, path: str, body: Any, status: int, param: str | None
) -> None:
    http.post("/v1/collections", json={"name": "e2e-dup"})
    reply = http.post(path, json=body)
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code", "request_id"} and error["message"]
    assert error["param"] == param and error["request_id"] == reply.headers["x-request-id"]
    info = http.get("/v1/collections/e2e-dup").json()
    assert info["chunks"] == 0 and info["documents"] == 0


def test_unknown_job_is_404(http: httpx.Client) -> None:
    reply = http.get("/v1/jobs/job-does-not-exist")
    assert reply.status_code == 404 and reply.json()["error"]["param"] == "job_id"


def test_embeddings_with_the_openai_client(mesh: Mesh) -> None:
    client = mesh.openai()
    one = client.embeddings.create(model="all-MiniLM-L6-v2", input="a single sentence")
    assert len(one.data) == 1 and len(one.data[0].embedding) == 384
    assert one.usage.prompt_tokens > 0
    many = client.embeddings.create(model="all-MiniLM-L6-v2", input=["a single sentence", "something else"])
    assert [d.index for d in many.data] == [0, 1]
    assert many.data[0].embedding == one.data[0].embedding  # identical input, identical vector
    assert abs(np.linalg.norm(many.data[1].embedding) - 1.0) < 1e-5
    # The openai client asks for base64 by default and decodes it; check the raw form too.
    raw = httpx.post(
        f"{mesh.v1}/embeddings",
        json={"model": "all-MiniLM-L6-v2", "input": "a single sentence", "encoding_format": "base64"},
    ).json()
    decoded = np.frombuffer(base64.b64decode(raw["data"][0]["embedding"]), dtype="<f4")
    assert np.allclose(decoded, one.data[0].embedding)
    with pytest.raises(openai.BadRequestError):
        client.embeddings.create(model="all-MiniLM-L6-v2", input=[])
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="no-such-embedder", input="x")
    assert "all-MiniLM-L6-v2" in [m.id for m in client.models.list()]


def test_cli_ingests_a_jsonl_file_with_progress(mesh: Mesh, http: httpx.Client, tmp_path: Path) -> None:
    corpus = tmp_path / "docs.jsonl"
    corpus.write_text("\n".join(json.dumps({"_id": d["id"], "title": d["title"], "text": d["text"]}) for d in DOCS))
    cli = Path(sys.executable).parent / "ragmesh"
    run = subprocess.run(
        [
            str(cli),
            "--url",
            mesh.gateway,
            "ingest",
            str(corpus),
            "--collection",
            "e2e-cli",
            "--create",
            "--batch-size",
            "3",
        ],
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ},
        cwd=ROOT,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    assert "4 documents, 4 chunks queued in 2 job(s)" in run.stderr
    assert "indexing" in run.stderr and "4/4" in run.stderr  # the progress bar reached the end
    found = subprocess.run(
        [str(cli), "--url", mesh.gateway, "search", "moon gravity", "--collection", "e2e-cli"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert found.stdout.splitlines()[0].split()[1] == "tides"
