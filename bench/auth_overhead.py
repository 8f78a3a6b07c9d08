"""Added latency of API-key authentication + per-key rate limiting, gateway to gateway, and of
the service credential on the gRPC hops.

gRPC hops (`--grpc-only` runs just this part): one real grpc.aio server built by
ragmesh.grpc_server.create_server, with and without a service token, and a client channel
from ragmesh.grpc_client sending call_metadata() (which carries the token once
use_service_token set it). A unary call and a server-streaming call of 16 messages (the
shape of Generate / Process) at concurrency 1, the two servers alternating in rounds. A
chat request crosses three such hops (Generate, Process, and Tokenize or Replay), so the
total added p50 is three times the larger per-hop figure.

In one run: the fake upstream (bench/fake_openai_upstream.py, one token at
once) and two ragmesh meshes in front of it, identical but for
RAGMESH_PREPROCESS_AUTH: "off" and "on". The "on" mesh gets one key (made through
its admin listener, RAGMESH_GATEWAY_ADMIN_PORT) with request, token and in-flight
limits far above the load (so every request runs the whole
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
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
from gateway_overhead import free_port, load, pct, ragmesh, responder  # bench/ is on sys.path (the script's folder)

ADMIN_KEY = "bench-admin-0123456789abcdef"


def create_key(admin: str) -> str:
    """A key through the admin listener (`admin`: the gateway's admin server; the public one has no /v1/admin)."""
    reply = httpx.post(
        f"{admin}/v1/admin/keys",
        # Limits far above the load, in flight too (the default 32 would refuse part of c=64).
        json={"name": "bench", "rpm": 10_000_000, "tpm": 1_000_000_000, "max_in_flight": 100_000},
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
    parser.add_argument("--grpc-calls", type=int, default=2000, help="gRPC calls per server, shape and round")
    parser.add_argument("--grpc-only", action="store_true", help="only the service-credential figures")
    args = parser.parse_args()
    grpc_ok = asyncio.run(grpc_hops(args.grpc_calls, args.rounds))
    if args.grpc_only:
        return 0 if grpc_ok else 1
    levels = [int(c) for c in args.concurrency.split(",")]
    latencies: dict[tuple[str, int], list[float]] = {}
    walls: dict[tuple[str, int], float] = {}
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        work = Path(tmp)
        upstream = stack.enter_context(responder())
        off = stack.enter_context(ragmesh(upstream, work, RAGMESH_PREPROCESS_AUTH="off"))
        admin_port = free_port()
        on = stack.enter_context(
            ragmesh(
                upstream,
                work,
                RAGMESH_PREPROCESS_AUTH="on",
                RAGMESH_PREPROCESS_ADMIN_KEY=ADMIN_KEY,
                RAGMESH_GATEWAY_ADMIN_PORT=str(admin_port),
            )
        )
        key = create_key(f"http://127.0.0.1:{admin_port}")
        for concurrency in levels:
            for _ in range(args.rounds):
                for name, url in (("auth off", off), ("auth on", on)):
                    lat, wall, _ = asyncio.run(load(url, concurrency, args.requests, key))
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


HOPS_PER_CHAT = 3
TOKEN = "bench-service-token-0123456789abcdef0123456789"


async def grpc_hops(calls: int, rounds: int) -> bool:
    """Per-call p50 of a unary and a streaming call, without and with the service credential."""
    import grpc

    from ragmesh import grpc_client, grpc_server

    async def unary(request: bytes, context: object) -> bytes:
        return request

    async def stream(request: bytes, context: object) -> object:
        for _ in range(16):
            yield request

    handler = grpc.method_handlers_generic_handler(
        "bench.Echo",
        {
            "Unary": grpc.unary_unary_rpc_method_handler(unary),
            "Stream": grpc.unary_stream_rpc_method_handler(stream),
        },
    )
    servers: dict[str, tuple[grpc.aio.Server, int]] = {}
    for name, token in (("no credential", ""), ("credential", TOKEN)):
        server = grpc_server.create_server(service_token=token)
        server.add_generic_rpc_handlers((handler,))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        servers[name] = (server, port)
    latencies: dict[tuple[str, str], list[float]] = {}
    try:
        for _ in range(rounds):
            for name, (_, port) in servers.items():
                grpc_client.use_service_token(TOKEN if name == "credential" else "")
                async with grpc_client.create_channel(f"127.0.0.1:{port}", health_checked=False) as channel:
                    call_unary: Any = channel.unary_unary("/bench.Echo/Unary")
                    call_stream: Any = channel.unary_stream("/bench.Echo/Stream")
                    await call_unary(b"warm", metadata=grpc_client.call_metadata())
                    for _ in range(calls):
                        started = time.perf_counter()
                        await call_unary(b"x" * 64, metadata=grpc_client.call_metadata())
                        latencies.setdefault((name, "unary"), []).append(time.perf_counter() - started)
                    for _ in range(calls):
                        started = time.perf_counter()
                        async for _item in call_stream(b"x" * 64, metadata=grpc_client.call_metadata()):
                            pass
                        latencies.setdefault((name, "stream x16"), []).append(time.perf_counter() - started)
    finally:
        grpc_client.use_service_token("")
        for server, _ in servers.values():
            await server.stop(None)
    print()
    print(f"gRPC hop, concurrency 1, {calls} x {rounds} calls per cell (ragmesh create_server / create_channel)")
    header = f"{'call':>10} | {'server':>13} | {'p50 ms':>7} | {'p99 ms':>7} | {'added p50':>9}"
    print(header)
    print("-" * len(header))
    added = 0.0
    for shape in ("unary", "stream x16"):
        base = pct(latencies[("no credential", shape)], 0.5) * 1000
        for name in ("no credential", "credential"):
            lat = latencies[(name, shape)]
            p50, p99 = pct(lat, 0.5) * 1000, pct(lat, 0.99) * 1000
            print(f"{shape:>10} | {name:>13} | {p50:>7.3f} | {p99:>7.3f} | {p50 - base:>9.3f}")
        added = max(added, pct(latencies[("credential", shape)], 0.5) * 1000 - base)
    total = HOPS_PER_CHAT * max(0.0, added)
    verdict = "PASS" if total <= 1.0 else "FAIL"
    print(
        f"target: the service credential adds <= 1 ms p50 at c=1 over a chat request's {HOPS_PER_CHAT} hops: "
        f"{HOPS_PER_CHAT} x {max(0.0, added):.3f} = {total:.3f} ms -> {verdict}"
    )
    return total <= 1.0


if __name__ == "__main__":
    sys.exit(main())
