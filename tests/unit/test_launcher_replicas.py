"""scripts/mesh.py with replicas: one program per replica on ports of its own, peers' address lists."""

from __future__ import annotations

import configparser
import errno
import http.server
import os
import socket
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import grpc
import pytest

from ragmesh.grpc_server import GRPC_OPTIONS

from ..conftest import load_launcher

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def mesh() -> ModuleType:
    return load_launcher("ragmesh_launcher")


def test_replica_counts_default_to_one_and_refuse_what_they_cannot_read(mesh: ModuleType) -> None:
    assert mesh.replica_counts({}) == dict.fromkeys(mesh.SERVICES, 1)
    counts = mesh.replica_counts({"RAGMESH_REPLICAS": "inference=2, preprocess=3"})
    assert counts == {"inference": 2, "retrieval": 1, "postprocess": 1, "preprocess": 3}
    for bad in ("gateway=2", "inference=0", "inference", "inference=two"):
        with pytest.raises(SystemExit):
            mesh.replica_counts({"RAGMESH_REPLICAS": bad})


def test_every_replica_is_a_program_on_its_own_ports(mesh: ModuleType, tmp_path: Path) -> None:
    env = {"RAGMESH_REPLICAS": "inference=2,retrieval=2,postprocess=2,preprocess=2", "RAGMESH_DATA_DIR": "/d"}
    plan = mesh.make_plan(env, tmp_path)
    conf = configparser.ConfigParser(interpolation=None)
    conf.read(mesh.render_supervisord(plan, tmp_path / "nginx.conf", env))
    programs = [s.removeprefix("program:") for s in conf.sections() if s.startswith("program:")]
    assert programs == [f"{s}-{i}" for s in mesh.SERVICES for i in (0, 1)] + ["nginx"]
    ports = [r.http_port for s in mesh.SERVICES for r in plan.replicas[s]]
    ports += [r.grpc_port for s in mesh.SERVICES for r in plan.replicas[s] if r.grpc_port]
    assert len(ports) == len(set(ports)) == 14
    second = conf["program:retrieval-1"]["environment"]
    assert f'RAGMESH_RETRIEVAL_GRPC_PORT="{plan.replicas["retrieval"][1].grpc_port}"' in second
    assert 'RAGMESH_RETRIEVAL_DATA_DIR="/d/retrieval-1"' in second and "RAGMESH_RETRIEVAL_REPLICA_ID=" in second
    # supervisord waits out a replica's drain before it kills it.
    assert int(conf["program:inference-0"]["stopwaitsecs"]) > 25 + 1
    peers = mesh.service_env(plan, env)
    assert peers["RAGMESH_PREPROCESS_INFERENCE_ADDR"] == ",".join(
        f"127.0.0.1:{r.grpc_port}" for r in plan.replicas["inference"]
    )
    assert peers["RAGMESH_RETRIEVAL_PEERS"] == peers["RAGMESH_PREPROCESS_RETRIEVAL_ADDR"]
    assert peers["RAGMESH_INFERENCE_N_THREADS"] == str(max(1, (os.cpu_count() or 2) // 2))
    servers = mesh.nginx_servers(plan, down=plan.replicas["preprocess"][1].program)
    first, second_port = (r.http_port for r in plan.replicas["preprocess"])
    assert servers.split() == ["server", f"127.0.0.1:{first};", "server", f"127.0.0.1:{second_port}", "down;"]


def test_one_replica_keeps_the_single_process_layout(mesh: ModuleType, tmp_path: Path) -> None:
    plan = mesh.make_plan({}, tmp_path)
    conf = configparser.ConfigParser(interpolation=None)
    conf.read(mesh.render_supervisord(plan, tmp_path / "nginx.conf", {}))
    assert "program:inference" in conf and "environment" not in conf["program:inference"]
    assert mesh.service_env(plan, {})["RAGMESH_PREPROCESS_INFERENCE_ADDR"] == "127.0.0.1:50051"


class _Probe(http.server.BaseHTTPRequestHandler):
    """Answers every GET with the status its server was given."""

    def do_GET(self) -> None:  # http.server calls it by this name
        self.send_response(self.server.status)  # type: ignore[attr-defined]
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def probes() -> Iterator[dict[int, int]]:
    """Two real HTTP servers on loopback: status -> port (200 ready, 503 not yet)."""
    servers = []
    for status in (200, 503):
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Probe)
        server.status = status  # type: ignore[attr-defined]
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
    yield {s.status: s.server_address[1] for s in servers}  # type: ignore[attr-defined]
    for server in servers:
        server.shutdown()
        server.server_close()


def test_up_waits_for_every_replica_not_only_the_one_behind_the_gateway(
    mesh: ModuleType, tmp_path: Path, probes: dict[int, int]
) -> None:
    def plan_with(preprocess_1: int) -> object:
        replicas = {
            service: [mesh.Replica(service, i, 2, probes[200], None) for i in range(2)] for service in mesh.SERVICES
        }
        replicas["preprocess"][1] = mesh.Replica("preprocess", 1, 2, preprocess_1, None)
        return mesh.Plan(tmp_path, Path(sys.executable), "127.0.0.1", probes[200], {}, replicas)

    assert mesh.not_ready(plan_with(probes[200])) == []
    # The gateway answers ready (through preprocess-0), preprocess-1 does not yet.
    assert mesh.gateway_ready(plan_with(probes[503]))
    assert mesh.not_ready(plan_with(probes[503])) == ["preprocess-1"]
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        nothing = unused.getsockname()[1]
    assert mesh.not_ready(plan_with(nothing)) == ["preprocess-1"]  # not listening yet


def test_ports_picked_for_replicas_stay_theirs_until_released(mesh: ModuleType, tmp_path: Path) -> None:
    # The race: a port picked free, then bound by someone else before the replica binds it.
    # Here "someone else" binds each planned port at the worst moment (right after the plan);
    # it must be refused, while the replica's own listener (SO_REUSEADDR, as uvicorn and gRPC
    # bind) gets the port.
    env = {"RAGMESH_REPLICAS": "inference=2,retrieval=2,postprocess=2,preprocess=2"}
    plan = mesh.make_plan(env, tmp_path)
    try:
        extra = [
            port
            for service in mesh.SERVICES
            for r in plan.replicas[service][1:]
            for port in (r.http_port, r.grpc_port, r.admin_port)
            if port is not None
        ]
        assert len(extra) == 8
        for port in extra:
            with socket.socket() as rival, pytest.raises(OSError) as refused:
                rival.bind(("127.0.0.1", port))
            assert refused.value.errno == errno.EADDRINUSE
            with socket.socket() as replica:
                replica.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                replica.bind(("127.0.0.1", port))
                replica.listen()
    finally:
        mesh.release_ports()
    with socket.socket() as anyone:
        anyone.bind(("127.0.0.1", extra[0]))  # let go once the replicas are up


async def test_a_grpc_server_listens_on_a_held_port(mesh: ModuleType) -> None:
    port = mesh.free_port()
    try:
        server = grpc.aio.server(options=GRPC_OPTIONS)
        assert server.add_insecure_port(f"127.0.0.1:{port}") == port
        await server.start()
        await server.stop(None)
    finally:
        mesh.release_ports()


def test_a_restarting_replica_s_port_is_held_until_it_listens_again(mesh: ModuleType) -> None:
    with socket.socket() as old:
        old.bind(("127.0.0.1", 0))
        port = old.getsockname()[1]
    try:
        assert mesh.hold_port(port)
        with socket.socket() as rival, pytest.raises(OSError):
            rival.bind(("127.0.0.1", port))
    finally:
        mesh.release_ports()
