"""The rerank part of bench/retrieval_scifact.py: hybrid, then hybrid + each reranker, side by side.

Every query goes through POST /v1/search one at a time (so latencies are per
query, not shared), the result cache off: plain hybrid (`rerank: false`), then
for each reranker and each `rerank_candidates` setting the same queries with
`rerank: <model>`. nDCG@10 is over documents (a document ranks where its best
chunk does) from the top 20 chunks, the same depth for every row. The added
latency of the rerank step is the reranked p50 minus hybrid's p50.

A reranker named by a folder (not a model the mesh serves) is scored in this
process by the mesh's own loading and scoring code (`retrieval.rerankers`) on
the fused candidates the gateway returns; its latency is the search plus that.

The built-in stage embeds the candidates' sentences through the embedding
cache: a first pass over the queries (not measured, reported as "cold")
fills it, as a corpus searched before would have; the measured pass is warm.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

CANDIDATES = (20, 40, 100)
TOP_K = 20


@dataclass
class Row:
    name: str
    candidates: int | None
    ndcg: float
    p50_ms: float
    skipped: int = 0


def p50(values: list[float]) -> float:
    return statistics.median(values) * 1000


async def rerankers_served(client: httpx.AsyncClient) -> list[str]:
    """Every model /v1/models lists with the rerank capability."""
    reply = await client.get("/v1/models")
    reply.raise_for_status()
    return [m["id"] for m in reply.json()["data"] if "rerank" in m.get("capabilities", [])]


def folder_scorer(path: str) -> Callable[[str, list[str]], Awaitable[list[float]]]:
    """The mesh's own CrossEncoder loading and scoring code, on a model folder, in this process."""
    from retrieval.rerankers import Rerankers
    from retrieval.settings import RerankerSpec

    rerankers = Rerankers.from_specs({"bench": RerankerSpec(path=path)})
    rerankers.load()

    async def score(query: str, documents: list[str]) -> list[float]:
        scores = await rerankers.score("bench", query, documents, truncate=True)
        return [float(x) for x in scores.logits]

    return score


async def run_rerank_section(
    client: httpx.AsyncClient,
    collection: str,
    queries: list[str],
    judge: Callable[[list[dict[str, Any]], int], float],
    rerankers: list[str],
    cold_pass: bool = True,
) -> list[Row]:
    """Hybrid, then every reranker at every candidates setting; `judge(results, i)` is query i's nDCG@10.

    `cold_pass`: first run each reranker once over the queries unmeasured (fills the embedding cache the
    built-in stage reads; a cross-encoder has nothing to warm).
    """

    async def one(query: str, rerank: Any, candidates: int | None) -> tuple[float, dict[str, Any]]:
        body: dict[str, Any] = {"collection": collection, "query": query, "top_k": TOP_K, "cache": False}
        body["rerank"] = rerank
        if candidates is not None:
            body["rerank_candidates"] = candidates
        started = time.perf_counter()
        reply = await client.post("/v1/search", json=body)
        if reply.status_code != 200:
            raise SystemExit(f"POST /v1/search: {reply.status_code} {reply.text}")
        return time.perf_counter() - started, reply.json()

    async def sweep(rerank: Any, candidates: int | None) -> tuple[list[float], list[dict[str, Any]]]:
        latencies, replies = [], []
        for query in queries:
            seconds, reply = await one(query, rerank, candidates)
            latencies.append(seconds)
            replies.append(reply)
        return latencies, replies

    def row(name: str, candidates: int | None, latencies: list[float], replies: list[dict[str, Any]]) -> Row:
        ndcg = statistics.mean(judge(r["results"], i) for i, r in enumerate(replies))
        skipped = sum(1 for r in replies if r.get("rerank") == "skipped")
        return Row(name, candidates, ndcg, p50(latencies), skipped)

    rows: list[Row] = []
    await sweep(False, None)  # warm the query embeddings: every row below reads them from the cache
    latencies, replies = await sweep(False, None)
    rows.append(row("hybrid", None, latencies, replies))
    print(f"  hybrid: nDCG@10 {rows[-1].ndcg:.4f}, p50 {rows[-1].p50_ms:.1f} ms", flush=True)
    folders = {r for r in rerankers if Path(r).is_dir()}  # noqa: ASYNC240 - a handful of stat calls at start
    for reranker in rerankers:
        if reranker in folders:
            rows += await _folder_rows(client, collection, queries, judge, reranker, one)
            continue
        if cold_pass:
            cold, _ = await sweep(reranker, max(CANDIDATES))
            print(f"  {reranker}: first pass (cold caches), p50 {p50(cold):.1f} ms at {max(CANDIDATES)}", flush=True)
        for candidates in CANDIDATES:
            latencies, replies = await sweep(reranker, candidates)
            rows.append(row(reranker, candidates, latencies, replies))
            print(f"  {reranker} @{candidates}: nDCG@10 {rows[-1].ndcg:.4f}, p50 {rows[-1].p50_ms:.1f} ms", flush=True)
    return rows


async def _folder_rows(
    client: httpx.AsyncClient,
    collection: str,
    queries: list[str],
    judge: Callable[[list[dict[str, Any]], int], float],
    folder: str,
    one: Callable[[str, Any, int | None], Awaitable[tuple[float, dict[str, Any]]]],
) -> list[Row]:
    score = await asyncio.to_thread(folder_scorer, folder)
    rows = []
    for candidates in CANDIDATES:
        latencies, ndcgs = [], []
        for i, query in enumerate(queries):
            started = time.perf_counter()
            body = {"collection": collection, "query": query, "top_k": candidates, "cache": False, "rerank": False}
            reply = (await client.post("/v1/search", json=body)).json()
            hits = reply["results"]
            logits = await score(query, [f"{h['title']}\n{h['text']}" if h["title"] else h["text"] for h in hits])
            order = sorted(range(len(hits)), key=lambda j: (-logits[j], j))
            latencies.append(time.perf_counter() - started)
            ndcgs.append(judge([hits[j] for j in order][:TOP_K], i))
        rows.append(Row(f"{folder} (in process)", candidates, statistics.mean(ndcgs), p50(latencies)))
        print(f"  {folder} @{candidates}: nDCG@10 {rows[-1].ndcg:.4f}, p50 {rows[-1].p50_ms:.1f} ms", flush=True)
    return rows


def print_rerank_table(rows: list[Row], queries: int) -> None:
    hybrid = rows[0]
    print()
    print(f"rerank on SciFact train ({queries} queries), POST /v1/search one query at a time, top {TOP_K} chunks")
    print(f"{'':>34} | {'candidates':>10} | {'nDCG@10':>8} | {'vs hybrid':>9} | {'p50 ms':>8} | {'added p50 ms':>12}")
    for r in rows:
        candidates = "-" if r.candidates is None else str(r.candidates)
        delta = "" if r is hybrid else f"{r.ndcg - hybrid.ndcg:+.4f}"
        added = "" if r is hybrid else f"{r.p50_ms - hybrid.p50_ms:+.1f}"
        note = f" ({r.skipped} skipped)" if r.skipped else ""
        print(f"{r.name:>34} | {candidates:>10} | {r.ndcg:>8.4f} | {delta:>9} | {r.p50_ms:>8.1f} | {added:>12}{note}")
