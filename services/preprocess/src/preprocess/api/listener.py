"""A second HTTP listener in the same process: the admin API on its own port.

uvicorn's own server is kept from taking the process's signals (the public
server owns SIGTERM and stops this one from its lifespan).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Generator
from typing import Any

import uvicorn


class _QuietServer(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


class Listener:
    """Serves `app` on host:port until `close()`; `start()` returns once it listens."""

    def __init__(self, app: Any, host: str, port: int, grace: float) -> None:
        config = uvicorn.Config(
            app,
            host=host,
            port=port,
            lifespan="off",
            log_config=None,
            access_log=False,
            loop="asyncio",
            timeout_graceful_shutdown=int(grace),
        )
        self._server = _QuietServer(config)
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._server.serve())
        while not self._server.started:
            if self._task.done():
                self._task.result()  # raises why it could not listen
                raise RuntimeError("the admin listener stopped at start")
            await asyncio.sleep(0.02)

    async def close(self) -> None:
        if self._task is None:
            return
        self._server.should_exit = True
        with contextlib.suppress(BaseException):
            await self._task
