"""Gateway overhead in front of an upstream: ragmesh vs calling the upstream directly vs LiteLLM proxy.

The upstream is bench/fake_openai_upstream.py (a minimal OpenAI-compatible
responder written for this benchmark: one token, at once), so the figures are
the gateways' own cost. In one run the script starts the responder, a ragmesh
mesh of its own (ports and run folder of its own; backends file: that
upstream only) and a LiteLLM proxy (`litellm[proxy]`, installed on first use
into build/litellm-venv), then sends non-streamed chat requests (max_tokens 1)
at concurrency 1, 16 and 64, alternating the three targets.

    .venv/bin/python bench/gateway_overhead.py [--requests 400]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
LITELLM_VENV = ROOT / "build" / "litellm-venv"
MODEL = "bench/echo"
# LiteLLM refuses to start without a master key; every target gets the same header.
BENCH_KEY = "sk-ragmesh-bench-0123456789abcdef0123456789abcdef"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_http(url: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise TimeoutError(url)


@contextmanager
def process(
    args: list[str], env: dict[str, str] | None = None, log: Path | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    out = open(log, "wb") if log else subprocess.DEVNULL  # noqa: SIM115 - closed below
    proc = subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
        if log:
            out.close()  # type: ignore[union-attr]


@contextmanager
def responder() -> Iterator[str]:
    port = free_port()
    with process([sys.executable, str(ROOT / "bench" / "fake_openai_upstream.py"), str(port)]):
        wait_http(f"http://127.0.0.1:{port}/v1/models")
        yield f"http://127.0.0.1:{port}/v1"


@contextmanager
def ragmesh(upstream: str, work: Path, **settings: str) -> Iterator[str]:
    """A mesh whose only backend is `upstream`; `settings` are extra environment variables."""
    backends = work / "backends.yaml"
    backends.write_text(
        f"backends:\n  - name: bench\n    type: openai\n    base_url: {upstream}\n    models: [{MODEL}]\n"
        "    max_concurrency: 128\n"
    )
    env = dict(
        os.environ,
        RAGMESH_RUN_DIR=str(work / f"mesh-{free_port()}"),
        RAGMESH_INFERENCE_BACKENDS_FILE=str(backends),
        RAGMESH_NAMESPACE=f"bench-{os.getpid()}-{free_port()}",
        # The per-address flood guard would refuse a benchmark's load from one address.
        RAGMESH_GATEWAY_RATE="100000r/s",
        RAGMESH_GATEWAY_BURST="100000",
        **settings,
    )
    for name in (
        "GATEWAY",
        "PREPROCESS_HTTP",
        "INFERENCE_HTTP",
        "RETRIEVAL_HTTP",
        "POSTPROCESS_HTTP",
        "INFERENCE_GRPC",
        "RETRIEVAL_GRPC",
        "POSTPROCESS_GRPC",
        # The admin listeners too: two meshes side by side (and the default 8081) never collide.
        "PREPROCESS_ADMIN",
        "GATEWAY_ADMIN",
    ):
        if f"RAGMESH_{name}_PORT" not in settings:  # a port the caller chose (to reach it) stays
            env[f"RAGMESH_{name}_PORT"] = str(free_port())
    launcher = [sys.executable, str(ROOT / "scripts" / "mesh.py")]
    subprocess.run([*launcher, "up", "--timeout", "240"], env=env, check=True, stdout=subprocess.DEVNULL)
    try:
        yield f"http://127.0.0.1:{env['RAGMESH_GATEWAY_PORT']}/v1"
    finally:
        subprocess.run([*launcher, "down"], env=env, check=False, stdout=subprocess.DEVNULL)


@contextmanager
def litellm(upstream: str, work: Path) -> Iterator[str]:
    binary = LITELLM_VENV / "bin" / "litellm"
    if not binary.exists():
        print("installing litellm[proxy] into build/litellm-venv (first run only)...", file=sys.stderr, flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(LITELLM_VENV)], check=True)
        subprocess.run([str(LITELLM_VENV / "bin" / "pip"), "install", "-q", "litellm[proxy]"], check=True)
    config = work / "litellm.yaml"
    config.write_text(
        "model_list:\n"
        f"  - model_name: {MODEL}\n"
        "    litellm_params:\n"
        f"      model: openai/{MODEL}\n"
        f"      api_base: {upstream}\n"
        "      api_key: bench\n"
        "litellm_settings:\n  telemetry: false\n  drop_params: true\n"
    )
    port = free_port()
    env = dict(os.environ, LITELLM_LOG="ERROR", LITELLM_TELEMETRY="False", LITELLM_MASTER_KEY=BENCH_KEY)
    with process(
        [str(binary), "--config", str(config), "--port", str(port), "--num_workers", "1"], env, work / "litellm.log"
    ):
        wait_http(f"http://127.0.0.1:{port}/health/liveliness")
        yield f"http://127.0.0.1:{port}/v1"


async def load(url: str, concurrency: int, requests: int, key: str = BENCH_KEY) -> tuple[list[float], float]:
    """(latencies, wall seconds) for `requests` chat completions, `concurrency` at a time."""
    body = {"model": MODEL, "messages": [{"role": "user", "content": "ping"}], "max_tokens": 1}
    auth = {"Authorization": f"Bearer {key}"}
    latencies: list[float] = []
    remaining = requests
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=httpx.Limits(max_connections=concurrency)) as client:

        async def worker() -> None:
            nonlocal remaining
            while remaining > 0:
                remaining -= 1
                started = time.perf_counter()
                reply = await client.post("/chat/completions", json=body, headers=auth)
                latencies.append(time.perf_counter() - started)
                if reply.status_code != 200:
                    raise RuntimeError(f"{url}: {reply.status_code} {reply.text[:200]}")

        for _ in range(min(20, requests)):  # warm up connections
            await client.post("/chat/completions", json=body, headers=auth)
        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return latencies, time.perf_counter() - started


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=400, help="requests per target and concurrency")
    parser.add_argument("--concurrency", default="1,16,64")
    args = parser.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        work = Path(tmp)
        upstream = stack.enter_context(responder())
        targets = {
            "direct": upstream,
            "ragmesh": stack.enter_context(ragmesh(upstream, work)),
            "litellm": stack.enter_context(litellm(upstream, work)),
        }
        results: dict[tuple[str, int], tuple[list[float], float]] = {}
        for concurrency in levels:
            for name, url in targets.items():
                results[(name, concurrency)] = asyncio.run(load(url, concurrency, args.requests))

    print()
    print(
        f"non-streamed chat, max_tokens 1, {args.requests} requests per cell; upstream: bench/fake_openai_upstream.py"
    )
    header = (
        f"{'conc':>4} | {'target':>8} | {'req/s':>8} | {'p50 ms':>7} | {'p99 ms':>7} | "
        f"{'added p50 ms':>12} | {'added p99 ms':>12}"
    )
    print(header)
    print("-" * len(header))
    verdicts = []
    for concurrency in levels:
        direct, _ = results[("direct", concurrency)]
        added = {}
        for name in ("direct", "ragmesh", "litellm"):
            lat, wall = results[(name, concurrency)]
            p50, p99 = pct(lat, 0.5) * 1000, pct(lat, 0.99) * 1000
            add50, add99 = p50 - pct(direct, 0.5) * 1000, p99 - pct(direct, 0.99) * 1000
            added[name] = add50
            row = f"{concurrency:>4} | {name:>8} | {len(lat) / wall:>8.0f} | {p50:>7.2f} | {p99:>7.2f} | "
            print(row + f"{add50:>12.2f} | {add99:>12.2f}")
        verdicts.append((concurrency, added["ragmesh"], added["litellm"]))
    print()
    for concurrency, ours, theirs in verdicts:
        verdict = "PASS" if ours < theirs else "FAIL"
        print(f"target: ragmesh adds less than LiteLLM at {concurrency}: {ours:.2f} vs {theirs:.2f} ms -> {verdict}")
    first = verdicts[0]
    verdict = "PASS" if first[1] <= 3 else "FAIL"
    print(f"target: ragmesh added p50 <= 3 ms at concurrency {first[0]}: {first[1]:.2f} ms -> {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
