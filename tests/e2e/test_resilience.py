"""The mesh keeps its promises when things go wrong: crashes, disconnects, shutdown."""

from __future__ import annotations

import os
import re
import signal
import socket
import time
from pathlib import Path

import httpx
import pytest

from .conftest import MODEL, Mesh, mesh_env, running_mesh

pytestmark = pytest.mark.e2e

LONG_ANSWER = {
    "model": MODEL,
    "messages": [{"role": "user", "content": "Write a very long essay about the history of the sea."}],
    "max_tokens": 1500,
    "temperature": 0,
}


def active_requests(mesh: Mesh) -> float:
    text = httpx.get(mesh.inference_metrics, timeout=5).text
    match = re.search(r"^ragmesh_inference_active_requests (\S+)$", text, re.M)
    assert match, "inference exports ragmesh_inference_active_requests"
    return float(match.group(1))


def wait_idle(mesh: Mesh, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if active_requests(mesh) == 0:
            return True
        time.sleep(0.05)
    return False


def test_client_disconnect_mid_stream_frees_the_engine(mesh: Mesh) -> None:
    with (
        httpx.Client(base_url=mesh.gateway, timeout=60) as client,
        client.stream("POST", "/v1/chat/completions", json={**LONG_ANSWER, "stream": True}) as response,
    ):
        lines = response.iter_lines()
        events = 0
        for line in lines:
            events += line.startswith("data: ")
            if events == 5:
                break
        assert active_requests(mesh) == 1
    # Connection closed: nginx drops the upstream, preprocess cancels the gRPC calls.
    assert wait_idle(mesh, timeout=2.0)


def test_client_disconnect_during_non_stream_request_frees_the_engine(mesh: Mesh) -> None:
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{mesh.gateway}/v1/chat/completions", json=LONG_ANSWER, timeout=1.0)
    assert wait_idle(mesh, timeout=2.0)


def test_crashed_service_is_restarted(mesh: Mesh) -> None:
    before = int(mesh.supervisorctl("pid", "postprocess"))
    os.kill(before, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        status = mesh.supervisorctl("status", "postprocess")
        if "RUNNING" in status and int(mesh.supervisorctl("pid", "postprocess")) != before:
            break
        time.sleep(0.2)
    else:
        pytest.fail(f"postprocess was not restarted: {status}")
    # Requests work again once it answers (the channel reconnects by itself).
    deadline = time.monotonic() + 30
    while True:
        reply = httpx.post(
            f"{mesh.gateway}/v1/chat/completions",
            json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
            timeout=30,
        )
        if reply.status_code == 200 or time.monotonic() > deadline:
            break
        assert reply.status_code == 503 and "error" in reply.json()
        time.sleep(0.2)
    assert reply.status_code == 200, reply.text


def _listening(port: str) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", int(port))) == 0


def test_down_stops_everything_up_started(tmp_path: Path) -> None:
    env = mesh_env(tmp_path)
    # running_mesh: `down` at the end, then the mesh's queues and exchanges leave the broker.
    with running_mesh(tmp_path, env):
        supervisord = int((tmp_path / "supervisord.pid").read_text())
        nginx = int((tmp_path / "nginx" / "nginx.pid").read_text())
        ports = [v for k, v in env.items() if re.fullmatch(r"RAGMESH_\w+_PORT", k)]
        assert all(_listening(p) for p in ports)
    for pid in (supervisord, nginx):
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert not any(_listening(p) for p in ports)
