"""`make up` uses the Redis credentials the environment gives it (private redis-servers on free ports)."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import redis

from ..conftest import free_port, load_launcher

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def launcher() -> ModuleType:
    return load_launcher("ragmesh_launcher_credentials")


@pytest.fixture
def guarded_redis() -> Iterator[int]:
    """A redis-server with a password, as compose and Kubernetes run it."""
    port = free_port()
    server = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--requirepass", "s3cret"],
        stdout=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                redis.Redis(port=port, password="s3cret").ping()
                break
            except redis.ConnectionError:
                assert time.monotonic() < deadline, "redis-server did not start"
                time.sleep(0.05)
        yield port
    finally:
        server.terminate()
        server.wait(10)


def test_a_running_redis_is_used_with_the_environments_password(
    launcher: ModuleType, guarded_redis: int, tmp_path: Path
) -> None:
    plan = launcher.make_plan({}, tmp_path)
    launcher.ensure_redis({"RAGMESH_REDIS_URL": f"redis://:s3cret@127.0.0.1:{guarded_redis}/0"}, plan)
    with pytest.raises(SystemExit) as refused:
        launcher.ensure_redis({"RAGMESH_REDIS_URL": f"redis://:wrong@127.0.0.1:{guarded_redis}/0"}, plan)
    assert "refuses the credentials" in str(refused.value)
    with pytest.raises(SystemExit):
        launcher.ensure_redis({"RAGMESH_REDIS_URL": f"redis://127.0.0.1:{guarded_redis}/0"}, plan)


def test_a_redis_started_by_make_up_takes_the_urls_password(launcher: ModuleType, tmp_path: Path) -> None:
    port = free_port()
    plan = launcher.make_plan({}, tmp_path)
    plan.log_dir.mkdir(parents=True, exist_ok=True)
    try:
        launcher.ensure_redis({"RAGMESH_REDIS_URL": f"redis://:p%40ss@127.0.0.1:{port}/0"}, plan)
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(port=port).ping()
        assert redis.Redis(port=port, password="p@ss").ping()
    finally:
        launcher.stop_started_dependencies(plan)


def test_the_service_token_is_made_once_per_run_folder(launcher: ModuleType, tmp_path: Path) -> None:
    plan = launcher.make_plan({}, tmp_path)
    first = launcher.service_env(plan, {})["RAGMESH_SERVICE_TOKEN"]
    assert len(first) >= 32 and launcher.service_env(plan, {})["RAGMESH_SERVICE_TOKEN"] == first
    assert (tmp_path / "service-token").stat().st_mode & 0o077 == 0
    assert launcher.service_env(plan, {"RAGMESH_SERVICE_TOKEN": "mine"})["RAGMESH_SERVICE_TOKEN"] == "mine"
