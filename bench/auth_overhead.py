"""Added latency of API-key authentication + per-key rate limiting, gateway to gateway.

In one run: the fake upstream (bench/fake_openai_upstream.py, one token at
once) and two ragmesh meshes in front of it, identical but for
RAGMESH_PREPROCESS_AUTH: "off" and "on". The "on" mesh gets one key with
request and token limits far above the load (so every request runs the whole
path: key lookup, the rate-limit script, the token charge after the answer).
Non-streamed chat requests (max_tokens 1) go through each gateway at
concurrency 1 and 64, the two meshes alternating in rounds so drift hits both.

    .venv/bin/python bench/auth_overhead.py [--requests 1000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path

import httpx
from gateway_overhead import load, pct, ragmesh, responder  # bench/ is on sys.path (the script's folder)

ADMIN_KEY = "bench-admin-0123456789abcdef"


def create_key(v1: str) -> str:
    reply = httpx.post(
        f"{v1}/admin/keys",
        json={"name": "bench", "rpm": 10_000_000, "tpm": 1_000_000_000},
        headers={"Authorization": f"Bearer {ADMIN_KEY}"},
        timeout=30,
    )
    reply.raise_for_status()
    return str(reply.json()["key"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=1000, help="requests per mesh, concurrency and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", default="1,64")
    args = parser.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    latencies: dict[tuple[str, int], list[float]] = {}
    walls: dict[tuple[str, int], float] = {}
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        work = Path(tmp)
        upstream = stack.enter_context(responder())
        off = stack.enter_context(ragmesh(upstream, work, RAGMESH_PREPROCESS_AUTH="off"))
        on = stack.enter_context(
            ragmesh(upstream, work, RAGMESH_PREPROCESS_AUTH="on", RAGMESH_PREPROCESS_ADMIN_KEY=ADMIN_KEY)
        )
        key = create_key(on)
        for concurrency in levels:
            for _ in range(args.rounds):
                for name, url in (("auth off", off), ("auth on", on)):
                    lat, wall = asyncio.run(load(url, concurrency, args.requests, key))
                    latencies.setdefault((name, concurrency), []).extend(lat)
                    walls[(name, concurrency)] = walls.get((name, concurrency), 0.0) + wall

    print()
    print(
        f"non-streamed chat, max_tokens 1, {args.requests} x {args.rounds} requests per cell, through nginx; "
        "upstream: bench/fake_openai_upstream.py"
    )
    columns = (
        ("conc", 4),
        ("gateway", 8),
        ("req/s", 7),
        ("p50 ms", 7),
        ("p99 ms", 7),
        ("added p50", 9),
        ("added p99", 9),
    )
    header = " | ".join(f"{name:>{width}}" for name, width in columns)
    print(header)
    print("-" * len(header))
    verdicts = []
    for concurrency in levels:
        base = latencies[("auth off", concurrency)]
        for name in ("auth off", "auth on"):
            lat = latencies[(name, concurrency)]
            p50, p99 = pct(lat, 0.5) * 1000, pct(lat, 0.99) * 1000
            add50, add99 = p50 - pct(base, 0.5) * 1000, p99 - pct(base, 0.99) * 1000
            rate = len(lat) / walls[(name, concurrency)]
            cells = f"{p50:>7.2f} | {p99:>7.2f} | {add50:>9.2f} | {add99:>9.2f}"
            print(f"{concurrency:>4} | {name:>8} | {rate:>7.0f} | {cells}")
        verdicts.append((concurrency, add50))
    print()
    for concurrency, added in verdicts:
        verdict = "PASS" if added <= 1.0 else "FAIL"
        print(f"target: auth + rate limits add <= 1 ms p50 at concurrency {concurrency}: {added:.2f} ms -> {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
