"""Streaming chat throughput and time to first token: the mesh vs the model served directly.

N concurrent streaming chat requests (64 new tokens, temperature 0) go through
the gateway (nginx -> preprocess -> inference -> postprocess) on the OpenAI
route (/v1/chat/completions, SSE) and on Ollama's (/api/chat, NDJSON), and, in
the same run, to llama.cpp's own OpenAI HTTP server (built into xllamacpp)
loaded with the same model, slots, context, threads and chat template as the
mesh's inference service. Rounds alternate between the three, each round in a
rotated order, so all see the same machine load and none always runs right
after another.

On a shared machine the load drifts between rounds, so besides the medians the
table gives the Ollama route's throughput as the median of its per-round ratio
to the OpenAI round next to it, and what each route costs the mesh itself: CPU
time of preprocess and postprocess per generated token (their /metrics
process_cpu_seconds_total, read around every round), which the machine's load
barely moves.

Needs a running mesh (`make up`; for a mesh on other ports, the same RAGMESH_*_PORT
variables it was started with). Usage:
    .venv/bin/python bench/chat_throughput.py [--gateway http://127.0.0.1:8080] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Any

import httpx
import orjson

TOPICS = ["a lighthouse", "a dragon", "the moon", "a robot", "a river", "a baker", "a storm", "a violin"]


@dataclass
class Result:
    ttft: float  # seconds to the first content-bearing chunk
    tokens: int


@dataclass
class Round:
    wall: float
    results: list[Result]
    # CPU seconds preprocess and postprocess spent during the round (None: /metrics unreachable).
    mesh_cpu: float | None = None

    @property
    def tokens(self) -> int:
        return sum(r.tokens for r in self.results)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.wall


async def one_request(client: httpx.AsyncClient, url: str, model: str, index: int, max_tokens: int) -> Result:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": f"Write a long story about {TOPICS[index % len(TOPICS)]}."}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
        # Measure generation, not ragmesh's response cache (llama.cpp ignores the field).
        "cache": False,
    }
    started = time.perf_counter()
    ttft = 0.0
    tokens = 0
    async with client.stream("POST", url, json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk: dict[str, Any] = orjson.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"])
            if not ttft and any((c.get("delta") or {}).get("content") for c in chunk.get("choices", ())):
                ttft = time.perf_counter() - started
            if chunk.get("usage"):
                tokens = int(chunk["usage"]["completion_tokens"])
    return Result(ttft=ttft, tokens=tokens)


async def one_ollama_request(client: httpx.AsyncClient, url: str, model: str, index: int, max_tokens: int) -> Result:
    """The same request on Ollama's /api/chat: NDJSON lines, the counts on the done line."""
    body = {
        "model": model,
        "messages": [{"role": "user", "content": f"Write a long story about {TOPICS[index % len(TOPICS)]}."}],
        "options": {"num_predict": max_tokens, "temperature": 0},
        "stream": True,
    }
    started = time.perf_counter()
    ttft = 0.0
    tokens = 0
    # Measure generation, not ragmesh's response cache.
    async with client.stream("POST", url, json=body, headers={"Cache-Control": "no-cache"}) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line:
                continue
            chunk: dict[str, Any] = orjson.loads(line)
            if "error" in chunk:
                raise RuntimeError(chunk["error"])
            if not ttft and (chunk.get("message") or {}).get("content"):
                ttft = time.perf_counter() - started
            if chunk.get("done"):
                tokens = int(chunk.get("eval_count", 0))
    return Result(ttft=ttft, tokens=tokens)


async def cpu_seconds(client: httpx.AsyncClient, metrics: list[str]) -> float | None:
    """The summed process_cpu_seconds_total of these /metrics pages (None if one is unreachable)."""
    total = 0.0
    for url in metrics:
        try:
            text = (await client.get(url, timeout=5)).text
        except httpx.HTTPError:
            return None
        line = next((x for x in text.splitlines() if x.startswith("process_cpu_seconds_total ")), None)
        if line is None:
            return None
        total += float(line.split()[1])
    return total


async def run_round(
    client: httpx.AsyncClient, url: str, model: str, n: int, max_tokens: int, metrics: list[str] | None = None
) -> Round:
    before = await cpu_seconds(client, metrics) if metrics else None
    started = time.perf_counter()
    request = one_ollama_request if url.endswith("/api/chat") else one_request
    results = await asyncio.gather(*(request(client, url, model, i, max_tokens) for i in range(n)))
    wall = time.perf_counter() - started
    after = await cpu_seconds(client, metrics) if metrics else None
    used = after - before if before is not None and after is not None else None
    return Round(wall=wall, results=list(results), mesh_cpu=used)


@dataclass
class Cell:
    """One side at one N: medians over its rounds."""

    tps: float
    p50: float  # TTFT, ms
    p95: float
    cpu: float | None  # preprocess + postprocess CPU per token, microseconds
    paired: float = 1.0  # Ollama only: median of its per-round ratio to the OpenAI route


def cpu_per_token(rounds: list[Round]) -> float | None:
    """Microseconds of preprocess + postprocess CPU per generated token over these rounds."""
    if any(r.mesh_cpu is None for r in rounds):
        return None
    return sum(r.mesh_cpu or 0.0 for r in rounds) / max(1, sum(r.tokens for r in rounds)) * 1e6


def start_direct_server() -> tuple[Any, str]:
    """llama.cpp's own server with the mesh's inference settings (same env, same defaults)."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import xllamacpp

    from inference.settings import InferenceSettings, apply_cpu_params

    settings = InferenceSettings()
    params = xllamacpp.CommonParams()
    params.model.path = settings.resolved_model_path()
    params.n_parallel = settings.n_parallel
    params.n_ctx = settings.n_ctx
    # The engine's chat template settings, as inference.engine sets them.
    params.use_jinja = True
    template = settings.resolved_chat_template()
    if template:
        params.chat_template = template
    apply_cpu_params(params, settings)
    params.cache_ram_mib = settings.prompt_cache_mib  # llama.cpp's host-memory prompt cache, as the engine sets it
    params.verbosity = 0
    server = xllamacpp.Server(params)
    print(
        f"engine settings (both sides): slots={settings.n_parallel} n_ctx={settings.n_ctx} "
        f"threads={settings.n_threads}/{settings.n_threads_batch} poll={settings.cpu_poll} "
        f"priority={settings.cpu_priority} prompt_cache_mib={settings.prompt_cache_mib}",
        flush=True,
    )
    return server, str(server.listening_address)


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


def service_metrics() -> list[str]:
    """preprocess's and postprocess's /metrics, on the ports the launcher gives them (same variables)."""
    ports = (
        os.environ.get("RAGMESH_PREPROCESS_HTTP_PORT", "8000"),
        os.environ.get("RAGMESH_POSTPROCESS_HTTP_PORT", "8003"),
    )
    return [f"http://127.0.0.1:{port}/metrics" for port in ports]


def fmt_cpu(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0f}"


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gateway", default="http://127.0.0.1:8080")
    parser.add_argument("--model", default="SmolLM2-135M-Instruct")
    parser.add_argument("--concurrency", default="1,4,8")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=6, help="rounds per side and N (alternating)")
    args = parser.parse_args()

    async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=64)) as client:
        try:
            ready = await client.get(f"{args.gateway}/v1/health/ready")
        except httpx.HTTPError:
            ready = None
        if ready is None or ready.status_code != 200:
            print(f"the mesh is not ready at {args.gateway}: run `make up` first", file=sys.stderr)
            return 1
        metrics = service_metrics()
        if await cpu_seconds(client, metrics) is None:
            print(f"no process_cpu_seconds_total at {metrics}: the CPU columns are left out", file=sys.stderr)
        server, direct_base = start_direct_server()
        targets = {
            "direct": f"{direct_base}/v1/chat/completions",
            "mesh": f"{args.gateway}/v1/chat/completions",
            "ollama": f"{args.gateway}/api/chat",
        }
        for url in targets.values():  # warm up both (first-call allocations, prompt cache)
            await run_round(client, url, args.model, 2, 8)

        rows = []
        sides = list(targets)
        for n in (int(x) for x in args.concurrency.split(",")):
            rounds: dict[str, list[Round]] = {side: [] for side in targets}
            for i in range(args.rounds):
                # Rotated order: no side always runs right after another (a warm or a busy predecessor).
                for side in sides[i % len(sides) :] + sides[: i % len(sides)]:
                    url = targets[side]
                    watched = metrics if side != "direct" else None
                    rounds[side].append(await run_round(client, url, args.model, n, args.max_tokens, watched))
            stats: dict[str, Cell] = {}
            for side, rs in rounds.items():
                ttfts = [r.ttft for rnd in rs for r in rnd.results]
                stats[side] = Cell(
                    tps=statistics.median(rnd.tokens_per_second for rnd in rs),
                    p50=pct(ttfts, 0.5) * 1000,
                    p95=pct(ttfts, 0.95) * 1000,
                    cpu=cpu_per_token(rs),
                )
            # Each Ollama round against the OpenAI round of the same rotation (same minute of load).
            pairs = zip(rounds["ollama"], rounds["mesh"], strict=True)
            stats["ollama"].paired = statistics.median(o.tokens_per_second / m.tokens_per_second for o, m in pairs)
            rows.append((n, stats))
        del server

    print()
    print(f"streaming chat, {args.max_tokens} new tokens, temperature 0, median of {args.rounds} rounds per cell")
    header = (
        f"{'N':>3} | {'direct tok/s':>12} | {'mesh tok/s':>10} | {'mesh/direct':>11} | "
        f"{'direct TTFT p50/p95 ms':>22} | {'mesh TTFT p50/p95 ms':>20} | {'TTFT p50 overhead ms':>20} | "
        f"{'ollama tok/s':>12} | {'ollama/mesh':>11} | {'paired':>6} | {'ollama TTFT p50/p95 ms':>22} | "
        f"{'pre+post CPU us/token mesh / ollama':>35}"
    )
    print(header)
    print("-" * len(header))
    for n, row in rows:
        d, m, o = row["direct"], row["mesh"], row["ollama"]
        print(
            f"{n:>3} | {d.tps:>12.1f} | {m.tps:>10.1f} | {m.tps / d.tps:>11.2f} | "
            f"{d.p50:>10.1f} / {d.p95:>9.1f} | {m.p50:>8.1f} / {m.p95:>9.1f} | "
            f"{m.p50 - d.p50:>20.1f} | {o.tps:>12.1f} | {o.tps / m.tps:>11.2f} | "
            f"{o.paired:>6.2f} | {o.p50:>10.1f} / {o.p95:>9.1f} | "
            f"{fmt_cpu(m.cpu):>16} / {fmt_cpu(o.cpu):>16}"
        )
    n_min, s_min = rows[0]
    # Issue #20's targets: the mesh at >= 0.95x llama.cpp's own server at every N, and at most
    # 8 ms of TTFT overhead (p50) where it shows, at the lowest concurrency (with more requests
    # than slots, TTFT is mostly queueing behind other requests).
    print()
    for n, row in rows:
        ratio = row["mesh"].tps / row["direct"].tps
        print(
            f"target: mesh throughput >= 0.95x direct at N={n}: {ratio:.2f}x -> {'PASS' if ratio >= 0.95 else 'FAIL'}"
        )
    overhead = s_min["mesh"].p50 - s_min["direct"].p50
    print(f"target: TTFT p50 overhead <= 8 ms at N={n_min}: {overhead:.1f} ms -> {'PASS' if overhead <= 8 else 'FAIL'}")
    # At every N: the median of per-round ratios (the load drifts between rounds; a pair shares it).
    for n, row in rows:
        paired = row["ollama"].paired
        print(
            f"target: Ollama /api/chat throughput >= 0.95x the OpenAI route at N={n} (paired rounds): "
            f"{paired:.2f}x -> {'PASS' if paired >= 0.95 else 'FAIL'}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
