"""Big embeddings batches through the gateway while preprocess replicas are SIGKILLed and Redis is
paused: every line has exactly one result, counts equal the total, the batch completes, one
output file.

The mesh runs on a Redis of its own (a private redis-server on a free port), so `CLIENT PAUSE`
stalls this mesh only. Faults are injected at known progress points (after N results are
counted, read from that Redis), never on a timer.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import openai
import pytest
import redis

from ..conftest import free_port, private_redis_server
from .conftest import ROOT, Mesh, mesh_env, running_mesh
from .conftest import launcher as load_launcher

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def private_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A redis-server of this module's own: the only one a test may pause."""
    with private_redis_server(tmp_path_factory.mktemp("redis")) as server:
        yield server.url


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory, private_redis: str) -> Iterator[Mesh]:
    run_dir = tmp_path_factory.mktemp("faults")
    env = mesh_env(
        run_dir,
        RAGMESH_REDIS_URL=private_redis,
        RAGMESH_INFERENCE_N_THREADS="1",
        RAGMESH_INFERENCE_N_THREADS_BATCH="1",
        RAGMESH_PREPROCESS_BATCH_BACKOFF_BASE="0.5",
    )
    with running_mesh(run_dir, env) as started:
        yield started


@dataclass
class ExtraReplicas:
    """Preprocess replicas beside the mesh's own: same namespace, Redis and broker, ports of their own."""

    mesh: Mesh
    processes: dict[int, subprocess.Popen[bytes]] = field(default_factory=dict)

    def start(self) -> int:
        launcher = load_launcher()
        env = launcher.service_env(launcher.make_plan(self.mesh.env, self.mesh.run_dir), self.mesh.env)
        port = free_port()
        env["RAGMESH_PREPROCESS_HTTP_PORT"] = str(port)
        env["RAGMESH_PREPROCESS_ADMIN_PORT"] = "0"  # the mesh's own replica has the admin listener
        log = open(self.mesh.run_dir / "logs" / f"preprocess-extra-{port}.log", "wb")  # noqa: SIM115 - the process writes it
        self.processes[port] = subprocess.Popen(
            [sys.executable, "-m", "preprocess"], env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT
        )
        return port

    def wait_ready(self, port: int) -> None:
        deadline = time.monotonic() + 120
        while True:
            try:
                reply = httpx.get(f"http://127.0.0.1:{port}/v1/health/ready", timeout=5)
                if reply.status_code == 200 and reply.json()["dependencies"].get("batch_workers") == "ok":
                    return
            except httpx.HTTPError:
                pass
            assert self.processes[port].poll() is None, "extra preprocess replica died at start"
            assert time.monotonic() < deadline, "extra preprocess replica not ready"
            time.sleep(0.2)

    def kill(self, port: int) -> None:
        process = self.processes.pop(port)
        process.send_signal(signal.SIGKILL)
        process.wait(10)

    def stop_all(self) -> None:
        for port in list(self.processes):
            self.kill(port)


@pytest.fixture
def extra(mesh: Mesh) -> Iterator[ExtraReplicas]:
    replicas = ExtraReplicas(mesh)
    yield replicas
    replicas.stop_all()


def embedding_lines(n: int) -> list[dict[str, Any]]:
    return [
        {
            "custom_id": f"e{i}",
            "method": "POST",
            "url": "/v1/embeddings",
            "body": {"model": "all-MiniLM-L6-v2", "input": f"line {i}: the quick brown fox {i % 97}"},
        }
        for i in range(n)
    ]


def create_batch(mesh: Mesh, lines: list[dict[str, Any]]) -> str:
    client = mesh.openai(timeout=120)
    data = b"".join(json.dumps(line).encode() + b"\n" for line in lines)
    uploaded = client.files.create(file=("lines.jsonl", io.BytesIO(data)), purpose="batch")
    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/embeddings", completion_window="24h")
    return batch.id


class Progress:
    """Lines counted so far, read from the mesh's Redis (it answers while preprocess is down)."""

    def __init__(self, mesh: Mesh, url: str, batch_id: str) -> None:
        self._client = redis.Redis.from_url(url, socket_timeout=10)
        self._key = f"{mesh.env['RAGMESH_NAMESPACE']}:batch:{batch_id}:state"

    def done(self) -> int:
        completed, failed = self._client.hmget(self._key, ["completed", "failed"])
        return int(completed or 0) + int(failed or 0)

    def wait_for(self, lines: int, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while self.done() < lines:
            assert time.monotonic() < deadline, f"stuck at {self.done()} lines"
            time.sleep(0.05)

    def close(self) -> None:
        self._client.close()


def pause_redis(url: str, millis: int) -> None:
    """CLIENT PAUSE on the mesh's private Redis (never the shared one)."""
    client = redis.Redis.from_url(url)
    client.client_pause(millis, all=True)
    client.close()


def kill_mesh_preprocess(mesh: Mesh) -> None:
    os.kill(int(mesh.supervisorctl("pid", "preprocess")), signal.SIGKILL)


def sigkills(mesh: Mesh) -> int:
    """How many times supervisord saw the mesh's preprocess die of SIGKILL (and restarted it)."""
    log = mesh.run_dir / "logs" / "supervisord.log"
    return log.read_text().count("exited: preprocess (terminated by SIGKILL") if log.exists() else 0


def finished(mesh: Mesh, batch_id: str, timeout: float = 600) -> Any:
    """The batch once final, polled through the gateway (tolerating a replica being restarted)."""
    client = mesh.openai(timeout=30)
    deadline = time.monotonic() + timeout
    while True:
        try:
            batch = client.batches.retrieve(batch_id)
            if batch.status in ("completed", "failed", "cancelled", "expired"):
                return batch
        except (openai.APIStatusError, openai.APIConnectionError):
            pass
        assert time.monotonic() < deadline, "the batch did not finish"
        time.sleep(0.3)


def check_exactly_once(mesh: Mesh, batch: Any, lines: list[dict[str, Any]]) -> None:
    client = mesh.openai(timeout=120)
    assert batch.status == "completed", batch
    counts = batch.request_counts
    assert (counts.total, counts.completed, counts.failed) == (len(lines), len(lines), 0)
    assert batch.error_file_id is None
    records = [json.loads(x) for x in client.files.content(batch.output_file_id).text.splitlines()]
    assert [r["custom_id"] for r in records] == [line["custom_id"] for line in lines], "one result each, in order"
    assert all(r["response"]["status_code"] == 200 for r in records)
    outputs = [f for f in client.files.list(purpose="batch_output") if f.filename.startswith(batch.id)]
    assert [f.id for f in outputs] == [batch.output_file_id], "one output file"


def no_unsettled_callbacks(mesh: Mesh) -> None:
    """The reproduction's symptom: handlers that raised out of the consumer callback."""
    for log in (mesh.run_dir / "logs").glob("preprocess*.log"):
        assert "Consumer callback failed" not in log.read_text(errors="replace"), log.name


def test_kills_and_a_redis_pause_mid_batch_lose_nothing_and_stick_nowhere(mesh: Mesh, private_redis: str) -> None:
    """The reproduction: 2,000 lines, preprocess SIGKILLed three times (supervisord restarts it),
    then Redis paused for 4 s; an HTTP request during the pause is a 503, not a 500."""
    lines = embedding_lines(2000)
    killed_before = sigkills(mesh)
    batch_id = create_batch(mesh, lines)
    progress = Progress(mesh, private_redis, batch_id)
    try:
        for point in (300, 650, 950):
            progress.wait_for(point)
            kill_mesh_preprocess(mesh)
        progress.wait_for(1086)
        pause_redis(private_redis, 4000)
        during = httpx.get(f"{mesh.v1}/batches/{batch_id}", timeout=30)
        assert during.status_code == 503, during.text
        assert during.json()["error"]["type"] == "server_error" and during.headers.get("retry-after")
    finally:
        progress.close()
    check_exactly_once(mesh, finished(mesh, batch_id), lines)
    no_unsettled_callbacks(mesh)
    assert sigkills(mesh) == killed_before + 3, "the kills were real"


def test_three_replicas_killed_in_turn_and_a_redis_pause_lose_nothing(
    mesh: Mesh, private_redis: str, extra: ExtraReplicas
) -> None:
    """3,000 lines consumed by three replicas; one is SIGKILLed at each of six progress points (in
    turn: the mesh's own, restarted by supervisord, and two started here, restarted here), and
    Redis is paused once."""
    ports = [extra.start(), extra.start()]
    for port in ports:
        extra.wait_ready(port)
    first = list(ports)
    lines = embedding_lines(3000)
    killed_before = sigkills(mesh)
    batch_id = create_batch(mesh, lines)
    progress = Progress(mesh, private_redis, batch_id)

    def kill_extra(slot: int) -> Callable[[], None]:
        def kill() -> None:
            extra.kill(ports[slot])
            ports[slot] = extra.start()  # as a process manager would

        return kill

    kills = [lambda: kill_mesh_preprocess(mesh), kill_extra(0), kill_extra(1)] * 2
    try:
        for n, point in enumerate((300, 700, 1100, 1500, 1900, 2300)):
            progress.wait_for(point)
            kills[n]()
            if point == 1100:
                pause_redis(private_redis, 3000)
    finally:
        progress.close()
    check_exactly_once(mesh, finished(mesh, batch_id), lines)
    no_unsettled_callbacks(mesh)
    assert sigkills(mesh) == killed_before + 2, "the mesh's own replica was killed twice"
    for port in first:
        assert "consuming" in (mesh.run_dir / "logs" / f"preprocess-extra-{port}.log").read_text()
