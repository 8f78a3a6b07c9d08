"""RAG evaluation on SciFact claims, through the gateway.

For each train claim the RAG model is asked whether the claim is supported,
with passages from the SciFact collection. Reported in one run:
- citation recall: share of claims whose *cited* sources (markers [n] in the
  answer) include a relevant document from the qrels;
- source recall: share of claims whose retrieved sources (every citation
  record, cited or not) include one; with a 135M-parameter model that rarely
  writes markers, this is the part that measures the mesh;
- answer latency p50/p95 with RAG and without (the same claim, no sources);
- latency of the same RAG request answered from the response cache;
- the share of prompt tokens the sources took.

Needs a running mesh with the SciFact corpus in a collection (default
`bench-scifact`, which bench/retrieval_scifact.py leaves behind; or
`.venv/bin/ragmesh ingest ../shared/data/scifact/corpus.jsonl --collection scifact --create`).

    .venv/bin/python bench/rag_scifact.py [--collection bench-scifact] [--claims 200]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("RAGMESH_SHARED_DATA", ROOT.parent / "shared" / "data")) / "scifact"
MODEL = "SmolLM2-135M-Instruct"
PROMPT = (
    "Is the following claim supported by the sources? Answer yes or no, then cite the sources you used.\nClaim: {claim}"
)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def ask(
    client: httpx.Client, claim: str, rag: dict[str, Any] | None, max_tokens: int
) -> tuple[float, dict[str, Any], str]:
    body: dict[str, Any] = {
        "model": MODEL,
        "messages": [{"role": "user", "content": PROMPT.format(claim=claim)}],
        "max_tokens": max_tokens,
        "temperature": 0,
    }
    if rag is not None:
        body["rag"] = rag
    started = time.perf_counter()
    reply = client.post("/v1/chat/completions", json=body)
    seconds = time.perf_counter() - started
    if reply.status_code != 200:
        raise SystemExit(f"{reply.status_code}: {reply.text}")
    return seconds, reply.json(), reply.headers.get("x-ragmesh-cache", "")


def flush_response_cache() -> int:
    """The first RAG pass must not be answered by a previous run's cached answers."""
    import redis

    namespace = os.environ.get("RAGMESH_NAMESPACE") or "ragmesh"
    client = redis.Redis.from_url(os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"))
    keys = list(client.scan_iter(f"{namespace}:response:*", count=1000))
    deleted = int(client.delete(*keys)) if keys else 0
    client.close()
    return deleted


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gateway", default="http://127.0.0.1:8080")
    parser.add_argument("--collection", default="bench-scifact")
    parser.add_argument("--claims", type=int, default=200, help="train claims to ask (809 with judgements in all)")
    parser.add_argument("--top-k", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=48)
    args = parser.parse_args()

    queries = {q["_id"]: q["text"] for q in map(json.loads, (DATA / "queries.train.jsonl").read_text().splitlines())}
    qrels: dict[str, set[str]] = {}
    for line in (DATA / "qrels" / "train.tsv").read_text().splitlines()[1:]:
        qid, cid, score = line.split()
        if int(score) > 0:
            qrels.setdefault(qid, set()).add(cid)
    claim_ids = sorted(q for q in queries if q in qrels)[: args.claims]

    with httpx.Client(base_url=args.gateway, timeout=300) as client:
        info = client.get(f"/v1/collections/{args.collection}")
        if info.status_code != 200 or not info.json()["chunks"]:
            print(f"collection '{args.collection}' is missing or empty: see this script's help", file=sys.stderr)
            return 1
        rag = {"collection": args.collection, "top_k": args.top_k}
        print(f"response cache flushed ({flush_response_cache()} answers)", file=sys.stderr)
        rag_latency, plain_latency, cache_latency = [], [], []
        cited_hits = source_hits = 0
        context_share = []
        cache_states: dict[str, int] = {}
        for i, qid in enumerate(claim_ids, start=1):
            claim = queries[qid]
            seconds, body, state = ask(client, claim, rag, args.max_tokens)
            cache_states[state] = cache_states.get(state, 0) + 1
            rag_latency.append(seconds)
            citations = body.get("citations", [])
            cited = {c["document_id"] for c in citations if c["cited"]}
            listed = {c["document_id"] for c in citations}
            cited_hits += bool(cited & qrels[qid])
            source_hits += bool(listed & qrels[qid])
            if body["usage"]["prompt_tokens"]:
                context_share.append(body["rag"]["context_tokens"] / body["usage"]["prompt_tokens"])
            plain_seconds, _, _ = ask(client, claim, None, args.max_tokens)
            plain_latency.append(plain_seconds)
            hit_seconds, _, hit_state = ask(client, claim, rag, args.max_tokens)
            if hit_state == "hit":
                cache_latency.append(hit_seconds)
            if i % 25 == 0:
                print(f"  {i}/{len(claim_ids)} claims", file=sys.stderr, flush=True)

    n = len(claim_ids)
    print()
    print(
        f"RAG on SciFact train claims: {n} claims, collection '{args.collection}', top_k {args.top_k}, "
        f"{args.max_tokens} new tokens, temperature 0"
    )
    print(f"{'citation recall (cited sources include a relevant document)':<62} {cited_hits / n:>7.3f}")
    print(f"{'source recall (retrieved sources include a relevant document)':<62} {source_hits / n:>7.3f}")
    print(f"{'share of prompt tokens spent on sources (mean)':<62} {statistics.mean(context_share):>7.3f}")
    print(
        f"{'first RAG requests answered from cache (should be 0 on a fresh run)':<62} {cache_states.get('hit', 0):>7d}"
    )
    print()
    print(f"{'latency':<34} | {'p50 ms':>8} | {'p95 ms':>8} | {'n':>4}")
    for name, values in (
        ("without RAG", plain_latency),
        ("with RAG", rag_latency),
        ("with RAG, from the response cache", cache_latency),
    ):
        if values:
            print(f"{name:<34} | {pct(values, 0.5) * 1000:>8.1f} | {pct(values, 0.95) * 1000:>8.1f} | {len(values):>4}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
