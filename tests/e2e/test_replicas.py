"""Two replicas of every service: balanced calls, a crash, an empty replica, a preprocess
replica refusing connections or draining its streams, a retrieval replica draining its
queue, a rollout under load.

One mesh for the module (RAGMESH_REPLICAS, one engine thread per inference
replica), started the way `make up` starts it; every request goes through
nginx with the real openai client unless the test says otherwise. Shared
helpers (the steady load, metrics readers) are in replicas.py.
"""

from __future__ import annotations

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
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from ragmesh.v1 import retrieval_pb2

from .conftest import MODEL, ROOT, mesh_env, running_mesh
from .replicas import (
    EMBEDDING_MODEL,
    NO_EOS,
    SERVICES,
    Load,
    Replicated,
    alive,
    calls,
    chat,
    chat_body,
    consumers,
    engine_requests,
    first_tokens,
    refuses_connections,
    restart,
    search_replica,
    service_token,
    start_batch,
    stream_chat,
    wait_for_batch,
    wait_until,
)

pytestmark = pytest.mark.e2e


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
    token = service_token(mesh)
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


def test_sigkill_of_an_inference_replica_fails_only_its_requests_in_flight(replicated: Replicated) -> None:
    mesh = replicated.mesh
    client = mesh.openai(timeout=120)  # max_retries=0: a failure is seen as the mesh answered it
    count: list[Any] = [{"role": "user", "content": "Count slowly to one thousand."}]
    # The end-of-text tokens banned (logit_bias; llama.cpp's ignore_eos is refused from clients):
    # each answer lasts 400 tokens.
    long: dict[str, Any] = {"model": MODEL, "messages": count, "max_tokens": 400, "temperature": 0.8}
    long["logit_bias"] = NO_EOS
    kinds = ["stream"] * 4 + ["whole"] * 2
    started = threading.Barrier(kinds.count("stream") + 1)
    outcomes: list[Any] = [None] * len(kinds)

    def stream(slot: int) -> None:
        try:
            first = True
            for _ in client.chat.completions.create(stream=True, **long):
                if first:
                    started.wait(60)
                    first = False
            outcomes[slot] = "ok"
        except openai.APIError as exc:
            outcomes[slot] = exc

    def whole(slot: int) -> None:
        try:
            reply = client.chat.completions.create(**long)
            outcomes[slot] = "ok" if reply.choices[0].finish_reason == "length" else reply
        except openai.APIError as exc:
            outcomes[slot] = exc

    threads = [
        threading.Thread(target=stream if kind == "stream" else whole, args=(slot,)) for slot, kind in enumerate(kinds)
    ]
    tokens_before = first_tokens(replicated, 0) + first_tokens(replicated, 1)
    for thread in threads:
        thread.start()
    started.wait(60)  # every stream has its first token
    wait_until(
        lambda: engine_requests(replicated, 0) + engine_requests(replicated, 1) == len(kinds),
        60,
        "every request in an engine",
    )
    # A call that has sent nothing yet is retried on the other replica by gRPC (safe: nothing
    # reached the client), so the kill waits until every request has its first token out.
    wait_until(
        lambda: first_tokens(replicated, 0) + first_tokens(replicated, 1) == tokens_before + len(kinds),
        120,
        "every request's first token",
    )
    victim = 1
    in_flight = engine_requests(replicated, victim)
    assert in_flight >= 1 and engine_requests(replicated, 0) >= 1, "the requests landed on both replicas"
    program = replicated.program("inference", victim)
    pid = int(mesh.supervisorctl("pid", program))
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: not alive(pid), 10, "the killed process to be gone")
    # Every request started after the kill succeeds, on the other replica.
    after = [chat(client) for _ in range(4)]
    assert all(reply.choices[0].message.content is not None for reply in after)
    assert [c for c in stream_chat(client) if c.choices and c.choices[0].finish_reason]
    for thread in threads:
        thread.join(180)
    failed = [(kinds[slot], o) for slot, o in enumerate(outcomes) if o != "ok"]
    # Exactly the requests the killed engine held failed: a stream with an error event
    # after its 200, a whole answer with an OpenAI-shaped 5xx.
    assert len(failed) == in_flight, outcomes
    for kind, exc in failed:
        assert isinstance(exc, openai.APIError) and isinstance(exc.body, dict), exc
        assert exc.body["type"] == "server_error" and exc.body["code"] == "service_unavailable", exc.body
        assert {"message", "type", "param", "code"} <= set(exc.body), exc.body
        if kind == "whole":
            assert isinstance(exc, openai.APIStatusError) and exc.status_code == 503, exc
        else:
            assert not isinstance(exc, openai.APIStatusError), "a stream fails with an error event, after its 200"
    wait_until(lambda: replicated.ready("inference", victim), 120, "the killed replica restarted by the supervisor")


# --- a preprocess replica going away ----------------------------------------------------------


def test_nginx_passes_a_request_refused_by_a_preprocess_replica_to_the_other(replicated: Replicated) -> None:
    mesh = replicated.mesh
    program, port = replicated.program("preprocess", 1), replicated.replicas["preprocess"][1]["http"]
    error_log = mesh.run_dir / "logs" / "nginx-error.log"
    logged = error_log.read_text() if error_log.exists() else ""
    # Stopped without leaving nginx's rotation (a crash, or a pod gone before the
    # endpoints caught up): its port refuses connections.
    assert f"{program}: stopped" in mesh.supervisorctl("stop", program)
    try:
        assert refuses_connections(port)
        # No keep-alive: each request opens its connection, so least_conn picks afresh.
        with httpx.Client(base_url=mesh.v1, timeout=60, limits=httpx.Limits(max_keepalive_connections=0)) as http:
            for i in range(6):
                reply = http.post("/embeddings", json={"model": EMBEDDING_MODEL, "input": f"refused {i}"})
                assert reply.status_code == 200, reply.text
                assert len(reply.json()["data"][0]["embedding"]) == 384
        # nginx did try the stopped replica, and passed the POST on (it had not been sent).
        tried = error_log.read_text()[len(logged) :]
        assert re.search(rf"Connection refused\) while connecting to upstream.*127\.0\.0\.1:{port}/", tried), tried
    finally:
        restart(replicated, "preprocess", 1)


def test_sigterm_lets_a_preprocess_replica_finish_its_open_streams(replicated: Replicated) -> None:
    mesh = replicated.mesh
    program, port = replicated.program("preprocess", 1), replicated.replicas["preprocess"][1]["http"]
    body = chat_body(max_tokens=200, temperature=0.8, stream=True, logit_bias=NO_EOS)
    body["stream_options"] = {"include_usage": True}
    stopped: list[str] = []
    stopper = threading.Thread(target=lambda: stopped.append(mesh.supervisorctl("stop", program)))
    try:
        # Straight to the replica: the SSE stream is open on this very process.
        with (
            httpx.Client(base_url=f"http://127.0.0.1:{port}/v1", timeout=120) as http,
            http.stream("POST", "/chat/completions", json=body) as reply,
        ):
            assert reply.status_code == 200
            lines = reply.iter_lines()
            first = next(line for line in lines if line.startswith("data: "))
            stopper.start()  # SIGTERM, as supervisord (and Kubernetes) stops a process
            wait_until(lambda: refuses_connections(port), 30, "the replica to stop listening")
            # It is draining, and the answer is still being generated.
            held = engine_requests(replicated, 0) + engine_requests(replicated, 1)
            assert held >= 1, "the stream was over before the replica drained"
            rest = list(lines)
        stopper.join(120)
        assert stopped and f"{program}: stopped" in stopped[0], stopped
        events = [json.loads(line[6:]) for line in [first, *rest] if line.startswith("data: {")]
        assert not [event for event in events if "error" in event], events[-3:]
        assert "data: [DONE]" in rest
        assert [e for e in events if e["choices"] and e["choices"][0]["finish_reason"] == "length"]
        assert events[-1]["usage"]["completion_tokens"] == 200
    finally:
        if stopper.ident is not None:
            stopper.join(120)
        restart(replicated, "preprocess", 1)


# --- a retrieval replica draining its queue ------------------------------------------------------


def test_sigterm_stops_a_retrieval_replica_taking_jobs_and_its_job_in_hand_still_succeeds(
    replicated: Replicated,
) -> None:
    mesh = replicated.mesh
    program = replicated.program("retrieval", 1)
    vocabulary = ("ice", "rock", "silt", "melt", "sea", "till", "flow", "firn", "snow", "crag", "tarn", "kame", "cwm")

    def text(job: int, doc: int) -> str:
        # Every document its own words: the embedding cache must not shorten the jobs.
        return " ".join(f"{vocabulary[(doc * 7 + k * (job + 3)) % 13]}{(doc * 31 + k) % 997}" for k in range(160))

    with httpx.Client(base_url=mesh.v1, timeout=60) as http:
        assert http.post("/collections", json={"name": "drain-jobs"}).status_code == 201
        assert consumers(mesh, "ingest") == 2
        # Two long jobs at once: with a prefetch of one, each replica holds one of them.
        jobs = [
            http.post(
                "/collections/drain-jobs/documents",
                json={"documents": [{"id": f"j{j}-{i}", "text": text(j, i)} for i in range(24)]},
            ).json()["job_id"]
            for j in range(2)
        ]

        def status(job: str) -> str:
            return str(http.get(f"/jobs/{job}").json()["status"])

        wait_until(lambda: [status(job) for job in jobs] == ["running", "running"], 60, "both jobs running")
        pid = int(mesh.supervisorctl("pid", program))
        stopped: list[str] = []
        stopper = threading.Thread(target=lambda: stopped.append(mesh.supervisorctl("stop", program)))
        stopper.start()  # SIGTERM
        try:
            # The replica cancels its consumer at once, while it still works on its job.
            wait_until(lambda: consumers(mesh, "ingest") == 1, 30, "the draining replica's consumer to go")
            assert alive(pid) and [status(job) for job in jobs] == ["running", "running"]
            # A job sent now can only go to the other replica, and does.
            late = http.post(
                "/collections/drain-jobs/documents", json={"documents": [{"id": "late", "text": "After the drain."}]}
            ).json()["job_id"]
            wait_until(lambda: status(late) == "succeeded", 240, "the job sent during the drain")
            # The job in hand finishes on the draining replica (or, past the grace, goes
            # back to the queue for the other one): every job succeeds, every document once.
            wait_until(lambda: all(status(job) in ("succeeded", "failed") for job in jobs), 300, "the long jobs")
            assert [status(job) for job in jobs] == ["succeeded", "succeeded"]
            stopper.join(120)
            assert stopped and f"{program}: stopped" in stopped[0], stopped
            assert http.get("/collections/drain-jobs").json()["documents"] == 49
        finally:
            stopper.join(120)
            restart(replicated, "retrieval", 1)
    wait_until(lambda: consumers(mesh, "ingest") == 2, 60, "the restarted replica consuming again")


# --- a rollout under load -------------------------------------------------------------------------


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
    batch = start_batch(client, 200)
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
    batch = wait_for_batch(client, batch.id, 600)
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
