"""SIGTERM drains a real service process (postprocess, started as `python -m postprocess`):
health NOT_SERVING at once, new calls refused, a stream in flight finishes, then the process exits."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ragmesh.v1 import common_pb2, postprocess_pb2, postprocess_pb2_grpc

from ..conftest import free_port, unique_namespace


@pytest.fixture
def service(redis_url: str, tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], int, Path]]:
    grpc_port, http_port = free_port(), free_port()
    env = {
        **os.environ,
        "RAGMESH_REDIS_URL": redis_url,
        "RAGMESH_NAMESPACE": unique_namespace(),
        "RAGMESH_POSTPROCESS_GRPC_PORT": str(grpc_port),
        "RAGMESH_POSTPROCESS_HTTP_PORT": str(http_port),
        "RAGMESH_POSTPROCESS_SHUTDOWN_GRACE": "30",
        "RAGMESH_POSTPROCESS_DRAIN_DELAY": "0.5",
    }
    log = tmp_path / "postprocess.log"
    process = subprocess.Popen([sys.executable, "-m", "postprocess"], env=env, stderr=log.open("wb"))
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{http_port}/v1/health/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline and process.poll() is None, "postprocess did not start"
            time.sleep(0.2)
        yield process, grpc_port, log
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()


def start() -> postprocess_pb2.ProcessRequest:
    return postprocess_pb2.ProcessRequest(
        start=postprocess_pb2.ProcessStart(id="chatcmpl-d", model="m", created=1, n=1, stream=True)
    )


def chunk(
    text: str, finish: common_pb2.FinishReason.ValueType = common_pb2.FINISH_REASON_UNSPECIFIED
) -> postprocess_pb2.ProcessRequest:
    return postprocess_pb2.ProcessRequest(
        chunk=common_pb2.GenerationChunk(text=text, completion_tokens=1, prompt_tokens=1, finish_reason=finish)
    )


async def test_sigterm_drains_calls_in_flight_and_refuses_new_ones(
    service: tuple[subprocess.Popen[bytes], int, Path],
) -> None:
    process, port, log = service
    # One plain connection per use (no retries, no balancing): what this one server does.
    async with (
        grpc.aio.insecure_channel(f"127.0.0.1:{port}") as streams,
        grpc.aio.insecure_channel(f"127.0.0.1:{port}") as watching,
    ):
        stub = postprocess_pb2_grpc.PostprocessStub(streams)
        call = stub.Process(timeout=60)
        await call.write(start())
        await call.write(chunk("Hello"))
        first = await call.read()
        assert isinstance(first, postprocess_pb2.ProcessResponse) and first.chunk_json  # under way
        watch = health_pb2_grpc.HealthStub(watching).Watch(health_pb2.HealthCheckRequest(service=""))
        assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING

        process.send_signal(signal.SIGTERM)
        # Health goes NOT_SERVING at once: balancing clients stop sending new calls here.
        assert (await asyncio.wait_for(watch.read(), 10)).status == health_pb2.HealthCheckResponse.NOT_SERVING
        # After the drain delay, new calls are refused (a balancing client retries them elsewhere)...
        refused = None
        for _ in range(100):
            try:
                fresh = postprocess_pb2_grpc.PostprocessStub(streams).Replay(
                    postprocess_pb2.ProcessStart(id="x", model="m", cache_key="none"), timeout=5
                )
                await fresh.read()
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.UNAVAILABLE:
                    refused = exc
                    break
            await asyncio.sleep(0.1)
        assert refused is not None, "new calls were still taken"
        # ...while the stream that was in flight goes on to its end.
        await call.write(chunk(" world", common_pb2.FINISH_REASON_STOP))
        done = False
        while not done:
            reply = await call.read()
            assert isinstance(reply, postprocess_pb2.ProcessResponse), "the stream ended unfinished"
            done = reply.generation_done
        await call.done_writing()
        assert await call.code() == grpc.StatusCode.OK
    # uvicorn ends by raising the signal it caught again, once the shutdown is complete.
    assert await asyncio.to_thread(process.wait, 30) == -signal.SIGTERM
    lines = log.read_text()
    assert "Application shutdown complete" in lines and "timeout graceful shutdown exceeded" not in lines
