"""Two replicas of every service: balanced calls, a crash, an empty replica, a rollout under load.

One mesh for the module (RAGMESH_REPLICAS, one engine thread per inference
replica), started the way `make up` starts it; every request goes through
nginx with the real openai client unless the test says otherwise.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import httpx
import httpx2  # the openai client's own HTTP library
import openai
import pytest
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from ragmesh.v1 import retrieval_pb2, retrieval_pb2_grpc

from .conftest import MODEL, ROOT, Mesh, mesh_env, running_mesh

pytestmark = pytest.mark.e2e

SERVICES = ("inference", "retrieval", "postprocess", "preprocess")
EMBEDDING_MODEL = "all-MiniLM-L6-v2"


@dataclass
class Replicated:
    mesh: Mesh
    # service -> [{"program", "http", "grpc"}], as `make up` wrote run/mesh.json
    replicas: dict[str, list[dict[str, Any]]]

    def metrics(self, service: str, index: int) -> str:
        port = self.replicas[service][index]["http"]
        return httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text

    def ready(self, service: str, index: int) -> bool:
        port = self.replicas[service][index]["http"]
        try:
            return httpx.get(f"http://127.0.0.1:{port}/v1/health/ready", timeout=5).status_code == 200
        except httpx.HTTPError:
            return False

    def program(self, service: str, index: int) -> str:
        return str(self.replicas[service][index]["program"])


@pytest.fixture(scope="module")
def replicated(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Replicated]:
    run_dir = tmp_path_factory.mktemp("replicas")
    env = mesh_env(
        run_dir,
        RAGMESH_REPLICAS="inference=2,retrieval=2,postprocess=2,preprocess=2",
        # Two engines on two cores: one thread each (the launcher's default too).
        RAGMESH_INFERENCE_N_THREADS="1",
        RAGMESH_INFERENCE_N_THREADS_BATCH="1",
        RAGMESH_PREPROCESS_BATCH_BACKOFF_BASE="0.5",
    )
    with running_mesh(run_dir, env) as mesh:
        layout = json.loads((run_dir / "mesh.json").read_text())["replicas"]
        assert {service: len(layout[service]) for service in SERVICES} == dict.fromkeys(SERVICES, 2)
        yield Replicated(mesh, layout)


def calls(metrics: str, method: str) -> float:
    """Calls a gRPC server handled for one method (every status)."""
    pattern = rf'^ragmesh_grpc_server_requests_total\{{[^}}]*method="/ragmesh\.v1\.{method}"[^}}]*\}} (\S+)$'
    return sum(float(value) for value in re.findall(pattern, metrics, re.M))


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"{what}: not after {timeout:.0f} s"
        time.sleep(0.2)


HELLO: list[Any] = [{"role": "user", "content": "Say hello."}]


def chat_body(**extra: Any) -> dict[str, Any]:
    """A short chat request's HTTP body."""
    return {"model": MODEL, "messages": HELLO, "max_tokens": 4, **extra}


def chat(client: openai.OpenAI, max_tokens: int = 4) -> ChatCompletion:
    """A short sampled chat answer (never from the response cache)."""
    return client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=max_tokens, temperature=0.8)


def stream_chat(client: openai.OpenAI, max_tokens: int = 4) -> list[ChatCompletionChunk]:
    """A short sampled streamed answer, every chunk of it (the client raises on an error event)."""
    stream = client.chat.completions.create(
        model=MODEL,
        messages=HELLO,
        max_tokens=max_tokens,
        temperature=0.8,
        stream=True,
        stream_options={"include_usage": True},
    )
    return list(stream)


# --- balancing -----------------------------------------------------------------------------


def test_calls_from_one_preprocess_reach_both_replicas_of_every_peer(replicated: Replicated) -> None:
    peers = {
        "inference": "Inference/Generate",
        "postprocess": "Postprocess/Process",
        "retrieval": "Retrieval/Search",
    }
    before = {(s, i): calls(replicated.metrics(s, i), m) for s, m in peers.items() for i in (0, 1)}
    before[("retrieval-embed", 0)] = calls(replicated.metrics("retrieval", 0), "Retrieval/Embed")
    before[("retrieval-embed", 1)] = calls(replicated.metrics("retrieval", 1), "Retrieval/Embed")
    # Straight to one preprocess process (not through nginx, which spreads over both).
    one = f"http://127.0.0.1:{replicated.replicas['preprocess'][0]['http']}"
    with httpx.Client(base_url=one, timeout=60) as http:
        assert http.post("/v1/collections", json={"name": "balance"}).status_code == 201
        # One kind after the other: searches and embeddings share the channel to retrieval,
        # so interleaved they would alternate between replicas in step with each other.
        for _ in range(20):
            reply = http.post("/v1/chat/completions", json=chat_body(temperature=0.8, cache=False))
            assert reply.status_code == 200, reply.text
        for i in range(20):
            found = http.post("/v1/search", json={"collection": "balance", "query": f"q {i}", "cache": False})
            assert found.status_code == 200, found.text
        for i in range(20):
            embedded = http.post("/v1/embeddings", json={"model": EMBEDDING_MODEL, "input": f"text {i}"})
            assert embedded.status_code == 200, embedded.text
    shares = {}
    for name, service, method in (
        ("inference", "inference", "Inference/Generate"),
        ("postprocess", "postprocess", "Postprocess/Process"),
        ("retrieval", "retrieval", "Retrieval/Search"),
        ("retrieval-embed", "retrieval", "Retrieval/Embed"),
    ):
        got = [calls(replicated.metrics(service, i), method) - before[(name, i)] for i in (0, 1)]
        assert sum(got) == 20, (name, got)
        shares[name] = got[0] / sum(got)
    for name, share in shares.items():
        assert 0.35 <= share <= 0.65, f"{name}: replica 0 got {share:.0%} of the calls ({shares})"


# --- an empty retrieval replica --------------------------------------------------------------


def search_replica(
    port: int, collection: str, query: str, mode: retrieval_pb2.SearchMode.ValueType, token: str = ""
) -> list[tuple[str, float]]:
    """Search one replica directly, with the mesh's service credential (make up's, in its run folder)."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = retrieval_pb2_grpc.RetrievalStub(channel)
        request = retrieval_pb2.SearchRequest(collection=collection, query=query, top_k=5, mode=mode, no_cache=True)
        reply = stub.Search(request, timeout=30, metadata=(("ragmesh-service-token", token),))
    return [(hit.chunk_id, round(hit.score, 5)) for hit in reply.hits]


def test_an_empty_retrieval_replica_catches_up_from_its_peer(replicated: Replicated) -> None:
    mesh = replicated.mesh
    docs = [
        {"id": f"doc-{i}", "title": title, "text": text}
        for i, (title, text) in enumerate(
            [
                ("Tides", "Ocean tides come from the pull of the moon and the sun."),
                ("Bread", "Bread dough rises because yeast makes gas before baking."),
                ("Rockets", "Rocket engines burn propellant and push exhaust out to make thrust."),
                ("Volcanoes", "Magma rising through the crust erupts from volcanoes as lava."),
            ]
        )
    ]
    with httpx.Client(base_url=mesh.gateway, timeout=60) as http:
        assert http.post("/v1/collections", json={"name": "catch-up"}).status_code == 201
        job = http.post("/v1/collections/catch-up/documents", json={"documents": docs}).json()["job_id"]
        wait_until(lambda: http.get(f"/v1/jobs/{job}").json()["status"] == "succeeded", 120, "the ingestion job")
    ports = [r["grpc"] for r in replicated.replicas["retrieval"]]
    token = mesh.env.get("RAGMESH_SERVICE_TOKEN") or (mesh.run_dir / "service-token").read_text().strip()
    queries = [("what moves the sea", retrieval_pb2.SEARCH_MODE_HYBRID), ("yeast", retrieval_pb2.SEARCH_MODE_SPARSE)]
    wait_until(
        lambda: all(
            len(search_replica(p, "catch-up", "lava", retrieval_pb2.SEARCH_MODE_DENSE, token)) == 4 for p in ports
        ),
        60,
        "both replicas indexed the documents",
    )
    program = replicated.program("retrieval", 1)
    assert f"{program}: stopped" in mesh.supervisorctl("stop", program)
    data = mesh.run_dir / "data" / "retrieval-1"
    assert (data / "collections" / "catch-up").is_dir()
    shutil.rmtree(data)  # the replica comes back with an empty data folder
    assert f"{program}: started" in mesh.supervisorctl("start", program)
    wait_until(lambda: replicated.ready("retrieval", 1), 120, "the empty replica")
    for query, mode in queries:
        assert search_replica(ports[1], "catch-up", query, mode, token) == search_replica(
            ports[0], "catch-up", query, mode, token
        )
    assert (data / "collections" / "catch-up").is_dir()  # saved to its own disk, too


# --- a crash ------------------------------------------------------------------------------------


def engine_running(replicated: Replicated, index: int) -> float:
    text = replicated.metrics("inference", index)
    return sum(float(v) for v in re.findall(r"^ragmesh:num_requests_running\{[^}]*\} (\S+)$", text, re.M))


# SmolLM2's <|endoftext|> and <|im_end|>: banned, an answer runs to max_tokens.
NO_EOS = {"0": -100, "2": -100}


def test_sigkill_of_an_inference_replica_fails_only_its_requests_in_flight(replicated: Replicated) -> None:
    mesh = replicated.mesh
    client = mesh.openai(timeout=120)
    count: list[Any] = [{"role": "user", "content": "Count slowly to one thousand."}]
    started = threading.Barrier(7)
    outcomes: list[Any] = [None] * 6

    def stream(slot: int) -> None:
        try:
            # The end-of-text tokens banned (logit_bias; llama.cpp's ignore_eos is refused from
            # clients): each stream lasts 400 tokens.
            chunks = client.chat.completions.create(
                model=MODEL, messages=count, max_tokens=400, stream=True, logit_bias=NO_EOS
            )
            first = True
            for _ in chunks:
                if first:
                    started.wait(60)
                    first = False
            outcomes[slot] = "ok"
        except openai.APIError as exc:
            outcomes[slot] = exc

    threads = [threading.Thread(target=stream, args=(slot,)) for slot in range(6)]
    for thread in threads:
        thread.start()
    started.wait(60)  # every stream has its first token
    victim = 1
    in_flight = engine_running(replicated, victim)
    assert in_flight >= 1 and engine_running(replicated, 0) >= 1, "the streams landed on both replicas"
    program = replicated.program("inference", victim)
    pid = int(mesh.supervisorctl("pid", program))
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: not _alive(pid), 10, "the killed process to be gone")
    # Every request started after the kill succeeds, on the other replica.
    after = [chat(client) for _ in range(4)]
    assert all(reply.choices[0].message.content is not None for reply in after)
    assert [c for c in stream_chat(client) if c.choices and c.choices[0].finish_reason]
    for thread in threads:
        thread.join(180)
    failed = [o for o in outcomes if o != "ok"]
    # Exactly the streams the killed engine was generating failed, each with an error event.
    assert len(failed) == in_flight, outcomes
    for exc in failed:
        assert isinstance(exc, openai.APIError) and isinstance(exc.body, dict), exc
        assert exc.body["type"] == "server_error" and exc.body["code"] == "service_unavailable", exc.body
    wait_until(lambda: replicated.ready("inference", victim), 120, "the killed replica restarted by the supervisor")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


# --- a rollout under load -------------------------------------------------------------------------


@dataclass
class Load:
    """Steady mixed traffic through the gateway until stopped; every outcome recorded."""

    mesh: Mesh
    stop: threading.Event = field(default_factory=threading.Event)
    done: Counter[str] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)
    threads: list[threading.Thread] = field(default_factory=list)

    def start(self) -> None:
        for work in (self._streams, self._chats, self._searches, self._embeddings):
            thread = threading.Thread(target=self._loop, args=(work,), daemon=True)
            thread.start()
            self.threads.append(thread)

    def finish(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(180)

    def _loop(self, work: Callable[[openai.OpenAI, httpx.Client], str]) -> None:
        # A connection per request: nginx's reload (a preprocess replica in or out of
        # rotation) closes idle keep-alive connections, and a request written onto one
        # at that instant is lost in transit. That race belongs to HTTP/1.1 keep-alive
        # itself (clients retry it: the openai SDK does by default); with retries off
        # here, it would hide what this test looks for, a request the mesh dropped.
        client = self.mesh.openai(
            timeout=120, http_client=openai.DefaultHttpxClient(limits=httpx2.Limits(max_keepalive_connections=0))
        )
        http = httpx.Client(base_url=self.mesh.v1, timeout=120, limits=httpx.Limits(max_keepalive_connections=0))
        while not self.stop.is_set():
            try:
                self.done[work(client, http)] += 1
            except Exception as exc:  # noqa: BLE001 - every failure is the test's business
                self.failures.append(f"{work.__name__}: {exc!r}")
            time.sleep(0.05)
        http.close()

    @staticmethod
    def _streams(client: openai.OpenAI, http: httpx.Client) -> str:
        chunks = stream_chat(client, max_tokens=24)
        # Whole: a finish_reason, then the usage chunk (the client raised on an error event).
        assert [c for c in chunks if c.choices and c.choices[0].finish_reason], "stream ended without finishing"
        assert chunks[-1].usage is not None, "stream ended before its usage chunk"
        return "stream"

    @staticmethod
    def _chats(client: openai.OpenAI, http: httpx.Client) -> str:
        reply = chat(client, max_tokens=8)
        assert reply.choices[0].finish_reason in ("stop", "length")
        return "chat"

    @staticmethod
    def _searches(client: openai.OpenAI, http: httpx.Client) -> str:
        reply = http.post("/search", json={"collection": "rollout", "query": "moon and sea", "top_k": 3})
        assert reply.status_code == 200 and len(reply.json()["results"]) == 3, reply.text
        return "search"

    @staticmethod
    def _embeddings(client: openai.OpenAI, http: httpx.Client) -> str:
        reply = client.embeddings.create(model=EMBEDDING_MODEL, input=["rolling out", f"at {time.time()}"])
        assert len(reply.data) == 2 and len(reply.data[0].embedding) == 384
        return "embedding"


def test_rollout_of_every_service_under_load_drops_nothing(replicated: Replicated) -> None:
    mesh = replicated.mesh
    client = mesh.openai(timeout=120)
    http = httpx.Client(base_url=mesh.v1, timeout=60)
    assert http.post("/collections", json={"name": "rollout"}).status_code == 201
    seed = [{"id": f"s{i}", "text": f"The moon pulls the sea; note {i}."} for i in range(5)]
    job = http.post("/collections/rollout/documents", json={"documents": seed}).json()["job_id"]
    wait_until(lambda: http.get(f"/jobs/{job}").json()["status"] == "succeeded", 120, "the seed job")

    load = Load(mesh)
    load.start()
    # One ingestion job and one 200-line batch, running while every replica restarts.
    docs = [
        {"id": f"d{i}", "title": f"Note {i}", "text": f"Tides and moons, note number {i}. " * 20} for i in range(60)
    ]
    job = http.post("/collections/rollout/documents", json={"documents": docs}).json()["job_id"]
    lines = [
        {
            "custom_id": f"line-{i}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": chat_body(max_tokens=8, messages=[{"role": "user", "content": f"Say {i}."}]),
        }
        for i in range(200)
    ]
    uploaded = client.files.create(
        file=("lines.jsonl", io.BytesIO(b"".join(json.dumps(x).encode() + b"\n" for x in lines))), purpose="batch"
    )
    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h")
    try:
        rollout = subprocess.run(
            [sys.executable, str(ROOT / "scripts" / "rollout.py"), "all", "--timeout", "240"],
            env=mesh.env,
            capture_output=True,
            text=True,
            timeout=1200,
        )
        assert rollout.returncode == 0, rollout.stdout + rollout.stderr
        for service in SERVICES:
            for index in (0, 1):
                assert f"{replicated.program(service, index)}: ready again" in rollout.stdout
        time.sleep(2)  # a little traffic on the new processes too
    finally:
        load.finish()
    assert not load.failures, load.failures[:10]
    assert all(load.done[kind] >= 3 for kind in ("stream", "chat", "search", "embedding")), load.done

    wait_until(lambda: http.get(f"/jobs/{job}").json()["status"] in ("succeeded", "failed"), 300, "the job")
    assert http.get(f"/jobs/{job}").json()["status"] == "succeeded"
    deadline = time.monotonic() + 600
    while (batch := client.batches.retrieve(batch.id)).status not in ("completed", "failed", "cancelled", "expired"):
        assert time.monotonic() < deadline, batch.request_counts
        time.sleep(1)
    assert batch.status == "completed" and batch.request_counts is not None
    assert (batch.request_counts.completed, batch.request_counts.failed) == (200, 0)
    assert batch.output_file_id is not None
    out = [json.loads(line) for line in client.files.content(batch.output_file_id).text.splitlines() if line]
    ids = Counter(record["custom_id"] for record in out)
    assert len(out) == 200 and set(ids.values()) == {1} and set(ids) == {f"line-{i}" for i in range(200)}
    assert all(record["response"]["status_code"] == 200 for record in out)
    http.close()


def test_rollout_of_one_service_restarts_only_its_replicas(replicated: Replicated) -> None:
    before = {(s, i): replicated.mesh.supervisorctl("pid", replicated.program(s, i)) for s in SERVICES for i in (0, 1)}
    rollout = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "rollout.py"), "postprocess"],
        env=replicated.mesh.env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert rollout.returncode == 0, rollout.stdout + rollout.stderr
    after = {(s, i): replicated.mesh.supervisorctl("pid", replicated.program(s, i)) for s in SERVICES for i in (0, 1)}
    changed = {key for key in before if before[key] != after[key]}
    assert changed == {("postprocess", 0), ("postprocess", 1)}


def test_make_rollout_needs_a_service(replicated: Replicated) -> None:
    bare = subprocess.run(["make", "-s", "rollout"], cwd=ROOT, capture_output=True, text=True)
    assert bare.returncode != 0 and "SERVICE=" in bare.stdout
    unknown = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "rollout.py"), "everything"],
        env=replicated.mesh.env,
        capture_output=True,
        text=True,
    )
    assert unknown.returncode == 2 and "rollout takes a service" in unknown.stderr
