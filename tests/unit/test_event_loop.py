"""Every service runs on the event loop its settings name (RAGMESH_EVENT_LOOP), uvloop by default.

`run_http` once made its loop with asyncio.run, which always makes asyncio's own
loop whatever uvicorn's config said. Each case runs a real service process that
reports the loop it runs on from its lifespan and stops itself with SIGTERM.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ragmesh.settings import ServiceSettings

SERVICE = """
import asyncio, os, signal, sys
from contextlib import asynccontextmanager
from starlette.applications import Starlette
from ragmesh.service import run_http
from ragmesh.settings import ServiceSettings

@asynccontextmanager
async def lifespan(app):
    loop = asyncio.get_running_loop()
    with open(sys.argv[1], "w") as out:
        out.write(f"{type(loop).__module__}.{type(loop).__name__}")
    os.kill(os.getpid(), signal.SIGTERM)  # serve no request: stop once started
    yield

run_http(Starlette(lifespan=lifespan), ServiceSettings(http_port=0, shutdown_grace=1))
"""


def loop_of_a_service(tmp_path: Path, setting: str | None) -> str:
    report = tmp_path / "loop.txt"
    env = {k: v for k, v in os.environ.items() if k != "RAGMESH_EVENT_LOOP"}
    if setting is not None:
        env["RAGMESH_EVENT_LOOP"] = setting
    # uvicorn raises the SIGTERM again once it has shut down: the process ends by that signal.
    subprocess.run([sys.executable, "-c", SERVICE, str(report)], env=env, check=False, timeout=60)
    return report.read_text()


def test_default_is_uvloop_where_installed(tmp_path: Path) -> None:
    pytest.importorskip("uvloop")
    assert loop_of_a_service(tmp_path, None).startswith("uvloop")


def test_asyncio_when_asked(tmp_path: Path) -> None:
    assert loop_of_a_service(tmp_path, "asyncio").startswith("asyncio")


def test_uvloop_when_asked(tmp_path: Path) -> None:
    pytest.importorskip("uvloop")
    assert loop_of_a_service(tmp_path, "uvloop").startswith("uvloop")


def test_an_unknown_loop_is_refused() -> None:
    with pytest.raises(ValueError, match="event_loop"):
        ServiceSettings(event_loop="twisted")  # type: ignore[arg-type]
