"""Batch vs interactive: throughput of the same requests, and interactive TTFT while a batch runs.

In one run, against a running mesh (`make up`):
1. 1,000 short chat requests (max_tokens 16) sent interactively at the best of
   a few concurrency levels, vs the same requests as one OpenAI batch;
2. 5,000 embedding requests the same way (batch texts differ from the
   interactive ones, so the embedding cache does not favour either);
3. streaming TTFT p50/p95 of interactive requests with the mesh idle, and
   while a chat batch runs.

    .venv/bin/python bench/batch_throughput.py [--chat 1000] [--embeddings 5000]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import statistics
import sys
import time
import uuid
from typing import Any

import httpx
import openai

MODEL = "SmolLM2-135M-Instruct"
EMBEDDER = "all-MiniLM-L6-v2"
# Every run's texts are its own: no cache (embeddings, responses) carries over from an earlier run.
RUN = uuid.uuid4().hex[:8]
TOPICS = ["rivers", "bread", "robots", "the moon", "violins", "storms", "bees", "glaciers"]


def chat_body(i: int, tag: str) -> dict[str, Any]:
    text = f"Write one sentence about {TOPICS[i % len(TOPICS)]} ({tag} {i} {RUN})."
    return {"model": MODEL, "messages": [{"role": "user", "content": text}], "max_tokens": 16}


def embed_body(i: int, tag: str) -> dict[str, Any]:
    return {"model": EMBEDDER, "input": f"A short sentence about {TOPICS[i % len(TOPICS)]}, number {i} ({tag} {RUN})."}


async def interactive(url: str, path: str, bodies: list[dict[str, Any]], concurrency: int) -> float:
    """Requests per second sending `bodies` with `concurrency` in flight."""
    pending = list(reversed(bodies))
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=httpx.Limits(max_connections=concurrency)) as client:

        async def worker() -> None:
            while pending:
                reply = await client.post(path, json=pending.pop())
                reply.raise_for_status()

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return len(bodies) / (time.perf_counter() - started)


def best_interactive(url: str, path: str, make: Any, total: int, levels: list[int], probe: int) -> tuple[int, float]:
    rates = {c: asyncio.run(interactive(url, path, [make(i, f"probe{c}") for i in range(probe)], c)) for c in levels}
    best = max(rates, key=lambda c: rates[c])
    return best, asyncio.run(interactive(url, path, [make(i, "interactive") for i in range(total)], best))


def run_batch(client: openai.OpenAI, path: str, bodies: list[dict[str, Any]]) -> tuple[float, Any]:
    lines = b"".join(
        json.dumps({"custom_id": f"r{i}", "method": "POST", "url": path, "body": b}).encode() + b"\n"
        for i, b in enumerate(bodies)
    )
    uploaded = client.files.create(file=("bench.jsonl", io.BytesIO(lines)), purpose="batch")
    started = time.perf_counter()
    batch = client.batches.create(input_file_id=uploaded.id, endpoint=path, completion_window="24h")  # type: ignore[arg-type]
    while batch.status not in ("completed", "failed", "cancelled", "expired"):
        time.sleep(0.5)
        batch = client.batches.retrieve(batch.id)
    return len(bodies) / (time.perf_counter() - started), batch


def ttfts(url: str, n: int) -> list[float]:
    out = []
    with httpx.Client(base_url=url, timeout=120) as client:
        for i in range(n):
            body = {**chat_body(i, "ttft"), "stream": True, "max_tokens": 8}
            started = time.perf_counter()
            first: float | None = None
            with client.stream("POST", "/chat/completions", json=body) as reply:
                for line in reply.iter_lines():  # read to the end: the answer finishes as a client's would
                    content = line.startswith("data: {") and '"content":"' in line and '"content":""' not in line
                    if first is None and content:
                        first = time.perf_counter() - started
            if first is not None:
                out.append(first)
    return out


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gateway", default="http://127.0.0.1:8080")
    parser.add_argument("--chat", type=int, default=1000)
    parser.add_argument("--embeddings", type=int, default=5000)
    parser.add_argument("--ttft-only", action="store_true", help="measure TTFT idle vs under batch load only")
    args = parser.parse_args()
    url = f"{args.gateway}/v1"
    client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0)
    if not args.ttft_only:
        throughput(url, client, args.chat, args.embeddings)
    ttft_under_batch(url, client)
    return 0


def throughput(url: str, client: openai.OpenAI, n_chat: int, n_embeddings: int) -> None:
    """Lines/s of the same requests sent interactively (best concurrency) and as one batch."""
    chat_c, chat_interactive = best_interactive(url, "/chat/completions", chat_body, n_chat, [2, 4, 8], 48)
    chat_batch, chat_result = run_batch(client, "/v1/chat/completions", [chat_body(i, "batch") for i in range(n_chat)])
    emb_c, emb_interactive = best_interactive(url, "/embeddings", embed_body, n_embeddings, [4, 8, 16], 200)
    emb_batch, emb_result = run_batch(client, "/v1/embeddings", [embed_body(i, "batch") for i in range(n_embeddings)])

    print()
    print(f"{'requests':<34} | {'interactive lines/s':>20} | {'batch lines/s':>13} | {'batch/interactive':>17}")
    for name, rate_i, c, rate_b, batch in (
        (f"{n_chat} chat (max_tokens 16)", chat_interactive, chat_c, chat_batch, chat_result),
        (f"{n_embeddings} embeddings", emb_interactive, emb_c, emb_batch, emb_result),
    ):
        counts = batch.request_counts
        label = f"{rate_i:.1f} (c={c})"
        print(
            f"{name:<34} | {label:>20} | {rate_b:>13.1f} | {rate_b / rate_i:>17.2f}   "
            f"[{batch.status}: {counts.completed} ok, {counts.failed} failed]",
            flush=True,
        )
    for name, rate_i, rate_b in (("chat", chat_interactive, chat_batch), ("embeddings", emb_interactive, emb_batch)):
        verdict = "PASS" if rate_b >= rate_i else "FAIL"
        print(f"target: batch throughput >= interactive ({name}): {rate_b / rate_i:.2f}x -> {verdict}")


def ttft_under_batch(url: str, client: openai.OpenAI) -> None:
    """Streaming TTFT of interactive requests with the mesh idle, and while a chat batch runs."""
    idle = ttfts(url, 20)
    uploaded_lines = [chat_body(i, "load") for i in range(400)]
    lines = b"".join(
        json.dumps({"custom_id": f"l{i}", "method": "POST", "url": "/v1/chat/completions", "body": b}).encode() + b"\n"
        for i, b in enumerate(uploaded_lines)
    )
    load_file = client.files.create(file=("load.jsonl", io.BytesIO(lines)), purpose="batch")
    load = client.batches.create(input_file_id=load_file.id, endpoint="/v1/chat/completions", completion_window="24h")
    time.sleep(3)  # let the batch fill its slots
    loaded = ttfts(url, 20)
    client.batches.cancel(load.id)

    print()
    for name, values in (("idle", idle), ("batch running", loaded)):
        p50, p95 = pct(values, 0.5) * 1000, pct(values, 0.95) * 1000
        print(f"interactive streaming TTFT, {name + ':':<14} p50 {p50:7.1f} ms  p95 {p95:7.1f} ms")
    ratio = statistics.median(loaded) / statistics.median(idle)
    print(f"target: TTFT under batch load <= 2x idle: {ratio:.2f}x -> {'PASS' if ratio <= 2 else 'FAIL'}")


if __name__ == "__main__":
    sys.exit(main())
