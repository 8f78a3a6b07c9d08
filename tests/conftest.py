"""Fixtures shared by every test layer: free ports, and the Redis / RabbitMQ servers."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from urllib.parse import urlparse

import aio_pika
import pytest
import redis

from ragmesh.amqp import Topology


def free_port() -> int:
    """A TCP port nobody listens on right now (the kernel picks it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# Every namespace this session handed out, with the retrieval replicas known to have run in it
# (each declares events queues of its own): what `broker_left_clean` checks at the end.
_namespaces: dict[str, set[str]] = {}
# Replicas run in a namespace whose queues `delete_topology` has not removed yet.
_replicas_run: dict[str, set[str]] = {}
_amqp_urls: set[str] = set()


def unique_namespace() -> str:
    """A queue/key prefix of its own, so tests never see another run's messages."""
    namespace = f"test-{uuid.uuid4().hex[:10]}"
    _namespaces[namespace] = set()
    return namespace


def remember_replica(namespace: str, replica_id: str) -> None:
    """Note a retrieval replica a test starts, so `delete_topology` removes its queues too."""
    _replicas_run.setdefault(namespace, set()).add(replica_id)
    _namespaces.setdefault(namespace, set()).add(replica_id)


async def delete_topology(amqp_url: str, namespace: str, replica_ids: Sequence[str] = ()) -> None:
    """Remove a namespace's queues and exchanges from the shared broker: tests delete what they
    (or the services they ran) declared, the events queues of `replica_ids` and of every replica
    noted with `remember_replica`. Names that do not exist are fine."""
    _amqp_urls.add(amqp_url)
    topology = Topology(namespace)
    replicas = tuple(sorted({*replica_ids, *_replicas_run.pop(namespace, set())}))
    _namespaces.setdefault(namespace, set()).update(replicas)
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        for kind, names in (("queue", topology.queues(replicas)), ("exchange", topology.exchanges())):
            for name in names:
                channel = await connection.channel()  # a failed delete closes its channel
                with contextlib.suppress(Exception):
                    if kind == "queue":
                        await channel.queue_delete(name)
                    else:
                        await channel.exchange_delete(name)
                with contextlib.suppress(Exception):
                    await channel.close()


async def queues_left(amqp_url: str, namespaces: dict[str, set[str]]) -> list[str]:
    """The queues of these namespaces' topologies (with those replicas) still on the broker."""
    left: list[str] = []
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        for namespace, replicas in namespaces.items():
            for name in Topology(namespace).queues(tuple(sorted(replicas))):
                channel = await connection.channel()  # a passive declare of an absent queue closes it
                try:
                    await channel.declare_queue(name, passive=True)
                    left.append(name)
                except aio_pika.exceptions.ChannelClosed:
                    continue
                with contextlib.suppress(Exception):
                    await channel.close()
    return left


@pytest.fixture(scope="session", autouse=True)
def broker_left_clean() -> Iterator[None]:
    """Tests delete the queues and exchanges they declare: after the session, none of the
    namespaces it handed out may still have a queue on the shared broker."""
    yield
    if not _amqp_urls or not _namespaces:
        return
    left = asyncio.run(queues_left(next(iter(_amqp_urls)), _namespaces))
    assert not left, f"queues the tests declared and left on the broker: {left}"


def delete_topology_now(amqp_url: str, namespace: str, replica_ids: Sequence[str] = ()) -> None:
    """delete_topology for synchronous fixtures."""
    asyncio.run(delete_topology(amqp_url, namespace, replica_ids))


def load_launcher(name: str = "ragmesh_launcher") -> ModuleType:
    """scripts/mesh.py as a module named `name` (the launcher's own plan: ports, replicas,
    environments); a module of its own per caller, so one test file's patches stay in it."""
    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parents[1] / "scripts" / "mesh.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def delete_bench_topology(env: dict[str, str]) -> None:
    """Delete, best effort, the queues and exchanges of a mesh a benchmark started with `env`
    (the broker is shared: a benchmark must not leave its topology behind)."""
    import socket

    amqp = env.get("RAGMESH_AMQP_URL") or env.get("AMQP_URL") or "amqp://guest:guest@127.0.0.1:5672/"
    replica = env.get("RAGMESH_RETRIEVAL_REPLICA_ID") or socket.gethostname()
    try:
        delete_topology_now(amqp, env["RAGMESH_NAMESPACE"], (replica,))
    except Exception as exc:  # noqa: BLE001 - cleanup of the shared broker is best effort
        print(f"(topology of {env['RAGMESH_NAMESPACE']} not deleted: {exc!r})", file=sys.stderr)


def close_own_connections(namespace: str, reason: str = "closed by a test") -> int:
    """Drop, broker side, the AMQP connections of one namespace's services (their client-given
    names start with the namespace), never anyone else's; how many were closed."""
    listed = subprocess.run(
        ["rabbitmqctl", "-q", "list_connections", "pid", "client_properties"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    closed = 0
    for line in listed.splitlines():
        pid, _, properties = line.partition("\t")
        if f'{{"connection_name","{namespace}.' in properties:
            subprocess.run(["rabbitmqctl", "-q", "close_connection", pid, reason], capture_output=True, check=True)
            closed += 1
    return closed


@dataclass
class PrivateRedis:
    """A redis-server of a test's own, the only kind a test may pause, freeze or stop (never the
    shared one other helpers' tests use)."""

    url: str
    process: subprocess.Popen[bytes]

    def pause(self, millis: int) -> None:
        """CLIENT PAUSE (every client's commands wait `millis`)."""
        client = redis.Redis.from_url(self.url)
        client.client_pause(millis, all=True)
        client.close()

    def freeze(self) -> None:
        """SIGSTOP: connections stay open, nothing answers (every command times out)."""
        self.process.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        self.process.send_signal(signal.SIGCONT)


@contextlib.contextmanager
def private_redis_server(folder: Path) -> Iterator[PrivateRedis]:
    """Start a redis-server on a free loopback port (no persistence), stop it afterwards."""
    port = free_port()
    server = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        cwd=folder,
        stdout=subprocess.DEVNULL,
    )
    client = redis.Redis(port=port)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                assert server.poll() is None and time.monotonic() < deadline, "private redis-server did not start"
                time.sleep(0.05)
        yield PrivateRedis(f"redis://127.0.0.1:{port}/0", server)
    finally:
        client.close()
        server.send_signal(signal.SIGCONT)  # a frozen server cannot take the SIGTERM
        server.terminate()
        server.wait(10)


def _reachable(url: str, default_port: int) -> bool:
    parsed = urlparse(url)
    try:
        with socket.create_connection((parsed.hostname or "127.0.0.1", parsed.port or default_port), timeout=1):
            return True
    except OSError:
        return False


def _service_url(env_name: str, default: str, default_port: int, container: str) -> str:
    """The URL of a running server: from the environment, the local default, or a testcontainer."""
    url = os.environ.get(env_name)
    if url:
        return url
    if _reachable(default, default_port):
        return default
    try:
        if container == "redis":
            from testcontainers.redis import RedisContainer

            redis = RedisContainer("redis:7").start()
            return f"redis://{redis.get_container_host_ip()}:{redis.get_exposed_port(6379)}/0"
        from testcontainers.rabbitmq import RabbitMqContainer

        rabbit = RabbitMqContainer("rabbitmq:3.13").start()
        return f"amqp://guest:guest@{rabbit.get_container_host_ip()}:{rabbit.get_exposed_port(5672)}/"
    except Exception as exc:  # noqa: BLE001 - no Docker engine: the reason is reported
        pytest.skip(f"{env_name} is not set, nothing answers at {default}, and no container could start: {exc}")


@pytest.fixture(scope="session")
def redis_url() -> str:
    return _service_url("REDIS_URL", "redis://127.0.0.1:6379/0", 6379, "redis")


@pytest.fixture(scope="session")
def amqp_url() -> str:
    url = _service_url("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/", 5672, "rabbitmq")
    _amqp_urls.add(url)
    return url
