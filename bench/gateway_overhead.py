"""Gateway overhead in front of an upstream: ragmesh vs calling the upstream directly vs LiteLLM proxy.

The upstream is bench/fake_openai_upstream.py (a minimal OpenAI-compatible
responder written for this benchmark: one token, at once), so the figures are
the gateways' own cost. In one run the script starts the responder, a ragmesh
mesh of its own (ports and run folder of its own; backends file: that
upstream only) and a LiteLLM proxy (`litellm[proxy]`, installed on first use
into build/litellm-venv), then sends non-streamed chat requests (max_tokens 1)
at concurrency 1, 16 and 64, alternating the three targets, for --rounds rounds. It prints
ours beside the issue's table (#20) and judges the issue's targets.

    .venv/bin/python bench/gateway_overhead.py [--requests 400] [--rounds 3] [--client aiohttp|httpx]
        [--mesh-env RAGMESH_EVENT_LOOP=asyncio]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import aiohttp
import httpx
import orjson

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


def _cpu_seconds() -> float:
    """This process's CPU time (user + system, every thread): what the load generator costs."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def load(
    url: str, concurrency: int, requests: int, key: str = BENCH_KEY, client: str = "aiohttp"
) -> tuple[list[float], float, float]:
    """(latencies, wall seconds, client CPU seconds) for `requests` chat completions, `concurrency`
    at a time.

    The default client is aiohttp: on this 2-core machine httpx's pool cost the load generator
    itself about 5 ms of CPU per request at concurrency 64 (against under 1 ms at 1), CPU the
    targets then did not have; the client column shows what the generator took."""
    body = {"model": MODEL, "messages": [{"role": "user", "content": "ping"}], "max_tokens": 1}
    auth = {"Authorization": f"Bearer {key}"}
    if client == "httpx":
        return await _load_httpx(url, concurrency, requests, body, auth)
    payload = orjson.dumps(body)
    headers = {**auth, "Content-Type": "application/json"}
    latencies: list[float] = []
    remaining = requests
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as session:
        target = f"{url}/chat/completions"

        async def one() -> None:
            started = time.perf_counter()
            async with session.post(target, data=payload, headers=headers) as reply:
                text = await reply.read()
                if reply.status != 200:
                    raise RuntimeError(f"{url}: {reply.status} {text[:200]!r}")
            latencies.append(time.perf_counter() - started)

        async def worker() -> None:
            nonlocal remaining
            while remaining > 0:
                remaining -= 1
                await one()

        for _ in range(min(20, requests)):  # warm up connections
            await one()
        latencies.clear()
        cpu = _cpu_seconds()
        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return latencies, time.perf_counter() - started, _cpu_seconds() - cpu


async def _load_httpx(
    url: str, concurrency: int, requests: int, body: dict[str, object], auth: dict[str, str]
) -> tuple[list[float], float, float]:
    """The generator the issue's table was measured with (--client httpx)."""
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
        cpu = _cpu_seconds()
        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return latencies, time.perf_counter() - started, _cpu_seconds() - cpu


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


# The issue's table (#20, one run of this benchmark with the httpx client, before the fast-path
# work): (concurrency, target) -> (req/s, p50 ms, p99 ms, added p50 ms, added p99 ms).
ISSUE_TABLE: dict[tuple[int, str], tuple[float, float, float, float, float]] = {
    (1, "direct"): (654, 1.46, 3.47, 0.0, 0.0),
    (1, "ragmesh"): (123, 7.37, 19.54, 5.91, 16.07),
    (1, "litellm"): (47, 19.92, 45.61, 18.46, 42.14),
    (16, "ragmesh"): (175, 74.13, 351.73, 58.72, 153.46),
    (16, "litellm"): (56, 277.32, 382.47, 261.90, 184.21),
    (64, "ragmesh"): (113, 380.90, 1939.93, 277.83, 1579.68),
    (64, "litellm"): (54, 983.08, 3247.01, 880.01, 2886.75),
}
TARGETS = ("direct", "ragmesh", "litellm")


def verdicts(stats: dict[tuple[str, int], dict[str, float]], levels: list[int]) -> list[str]:
    """The issue's gateway targets, each with the figure it was judged on."""

    def line(text: str, ok: bool) -> str:
        return f"target: {text} -> {'PASS' if ok else 'FAIL'}"

    out = []
    for c in levels:
        ours, theirs = stats[("ragmesh", c)], stats[("litellm", c)]
        out.append(
            line(
                f"ahead of LiteLLM at c={c}: p50 {ours['p50']:.2f} vs {theirs['p50']:.2f} ms, "
                f"p99 {ours['p99']:.2f} vs {theirs['p99']:.2f} ms",
                ours["p50"] < theirs["p50"] and ours["p99"] < theirs["p99"],
            )
        )
        if c == 1:
            out.append(line(f"added p50 <= 3 ms at c=1: {ours['add50']:.2f} ms", ours["add50"] <= 3))
        elif (c, "ragmesh") in ISSUE_TABLE:
            half = ISSUE_TABLE[(c, "ragmesh")][3] / 2
            text = f"added p50 <= half the table's at c={c}: {ours['add50']:.2f} <= {half:.2f} ms"
            out.append(line(text, ours["add50"] <= half))
        if c == 64:
            twice = 2 * ISSUE_TABLE[(64, "ragmesh")][0]
            out.append(line(f"req/s >= 2x the table's at c=64: {ours['rps']:.0f} >= {twice:.0f}", ours["rps"] >= twice))
            out.append(
                line(
                    f"p99 <= 3x p50 at c=64: {ours['p99']:.2f} <= {3 * ours['p50']:.2f} ms",
                    ours["p99"] <= 3 * ours["p50"],
                )
            )
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=400, help="requests per target, concurrency and round")
    parser.add_argument("--concurrency", default="1,16,64")
    parser.add_argument("--rounds", type=int, default=3, help="rounds (each runs every target at every level)")
    parser.add_argument("--client", choices=("aiohttp", "httpx"), default="aiohttp", help="the load generator")
    parser.add_argument(
        "--mesh-env", action="append", default=[], metavar="NAME=VALUE", help="a setting for the mesh (repeatable)"
    )
    args = parser.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    mesh_env = dict(item.split("=", 1) for item in args.mesh_env)
    runs: dict[tuple[str, int], list[tuple[list[float], float, float]]] = {}
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        work = Path(tmp)
        upstream = stack.enter_context(responder())
        targets = {
            "direct": upstream,
            "ragmesh": stack.enter_context(ragmesh(upstream, work, **mesh_env)),
            "litellm": stack.enter_context(litellm(upstream, work)),
        }
        for _ in range(args.rounds):
            for concurrency in levels:
                for name, url in targets.items():  # alternating: every target sees the same machine load
                    run = asyncio.run(load(url, concurrency, args.requests, client=args.client))
                    runs.setdefault((name, concurrency), []).append(run)

    stats: dict[tuple[str, int], dict[str, float]] = {}
    round_p50: dict[tuple[str, int], list[float]] = {}
    for (name, concurrency), rounds in runs.items():
        round_p50[(name, concurrency)] = [pct(lat, 0.5) * 1000 for lat, _, _ in rounds]
        latencies = [x for lat, _, _ in rounds for x in lat]
        stats[(name, concurrency)] = {
            "rps": statistics.median(len(lat) / wall for lat, wall, _ in rounds),
            "p50": pct(latencies, 0.5) * 1000,
            "p99": pct(latencies, 0.99) * 1000,
            "cpu": statistics.median(cpu / len(lat) for lat, _, cpu in rounds) * 1000,
        }
    for (_, concurrency), row in stats.items():
        direct = stats[("direct", concurrency)]
        row["add50"], row["add99"] = row["p50"] - direct["p50"], row["p99"] - direct["p99"]

    print()
    print(
        f"non-streamed chat, max_tokens 1, {args.requests} requests per cell and round, {args.rounds} rounds "
        f"(latencies pooled, req/s the median round), client {args.client}; upstream: bench/fake_openai_upstream.py"
    )
    if mesh_env:
        print(f"mesh settings: {mesh_env}")
    header = (
        f"{'conc':>4} | {'target':>8} | {'req/s':>6} | {'p50 ms':>7} | {'p99 ms':>8} | {'added p50':>9} | "
        f"{'added p99':>9} | {'client cpu ms/req':>17} | {'issue table: req/s, p50, p99, added p50':>40}"
    )
    print(header)
    print("-" * len(header))
    for concurrency in levels:
        for name in TARGETS:
            row = stats[(name, concurrency)]
            table = ISSUE_TABLE.get((concurrency, name))
            before = f"{table[0]:.0f}, {table[1]:.2f}, {table[2]:.2f}, {table[3]:.2f}" if table else "-"
            print(
                f"{concurrency:>4} | {name:>8} | {row['rps']:>6.0f} | {row['p50']:>7.2f} | {row['p99']:>8.2f} | "
                f"{row['add50']:>9.2f} | {row['add99']:>9.2f} | {row['cpu']:>17.2f} | {before:>40}"
            )
    print()
    for concurrency in levels:
        per_round = ", ".join(f"{p:.2f}" for p in round_p50[("ragmesh", concurrency)])
        print(f"ragmesh p50 per round at c={concurrency}: {per_round} ms")
    print()
    for text in verdicts(stats, levels):
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
