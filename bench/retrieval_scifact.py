"""Retrieval on BEIR SciFact through the mesh: quality, ingestion speed, search latency.

Needs a running mesh (`make up`) and ../shared/data/scifact. In one run:

1. ingestion: the whole corpus through the public API (POST documents, poll the
   jobs) with a cold embedding cache, against `SentenceTransformer.encode` on the
   same chunks in this process (same model, batch size and torch threads);
2. re-ingestion of the same corpus into a second collection (embedding cache warm);
3. quality: nDCG@10 and Recall@10 of sparse, dense and hybrid search over the
   train queries (the only split shipped), through POST /v1/search;
4. search latency and QPS per mode at concurrency 1 and 8: cold (query never
   embedded before), warm (query embedding cached, result cache off) and cached
   (answered from the result cache);
5. the rerank step (bench/rerank_step.py): nDCG@10 and p50 latency of hybrid
   and of hybrid + each reranker (every model /v1/models lists with the rerank
   capability, or those named by --reranker: a model id, or a CrossEncoder
   folder scored in this process), and the latency the step adds, at
   rerank_candidates 20, 40 and 100.

Usage:
    .venv/bin/python bench/retrieval_scifact.py [--gateway http://127.0.0.1:8080] [--limit N]
    # the rerank part alone, on the collection a previous run left (no re-embedding):
    .venv/bin/python bench/retrieval_scifact.py --reuse --rerank-only [--reranker MODEL_OR_FOLDER ...]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import httpx
from rerank_step import print_rerank_table, rerankers_served, run_rerank_section

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("RAGMESH_SHARED_DATA", ROOT.parent / "shared" / "data")) / "scifact"
MODES = ("sparse", "dense", "hybrid")


def load_scifact(limit: int | None) -> tuple[list[dict[str, Any]], dict[str, str], dict[str, dict[str, int]]]:
    corpus = [json.loads(line) for line in (DATA / "corpus.jsonl").read_text(encoding="utf-8").splitlines()]
    query_lines = (DATA / "queries.train.jsonl").read_text(encoding="utf-8").splitlines()
    queries = {q["_id"]: q["text"] for q in map(json.loads, query_lines)}
    qrels: dict[str, dict[str, int]] = {}
    for line in (DATA / "qrels" / "train.tsv").read_text(encoding="utf-8").splitlines()[1:]:
        qid, cid, score = line.split()
        qrels.setdefault(qid, {})[cid] = int(score)
    if limit:
        corpus = corpus[:limit]
        kept = {d["_id"] for d in corpus}
        qrels = {q: r for q, r in qrels.items() if set(r) & kept}
    queries = {q: t for q, t in queries.items() if q in qrels}
    return corpus, queries, qrels


# --- metrics -------------------------------------------------------------------------


def ndcg_at_10(ranked: list[str], relevant: dict[str, int]) -> float:
    dcg = sum(1 / math.log2(i + 2) for i, d in enumerate(ranked[:10]) if relevant.get(d, 0) > 0)
    ideal = sum(1 / math.log2(i + 2) for i in range(min(10, sum(1 for v in relevant.values() if v > 0))))
    return dcg / ideal if ideal else 0.0


def recall_at_10(ranked: list[str], relevant: dict[str, int]) -> float:
    wanted = {d for d, v in relevant.items() if v > 0}
    return len(wanted & set(ranked[:10])) / len(wanted) if wanted else 0.0


def documents_in_order(results: list[dict[str, Any]]) -> list[str]:
    """Chunk hits to a document ranking (a document ranks where its best chunk does)."""
    seen: list[str] = []
    for hit in results:
        if hit["document_id"] not in seen:
            seen.append(hit["document_id"])
    return seen


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


# --- mesh calls --------------------------------------------------------------------------


async def check(reply: httpx.Response) -> dict[str, Any]:
    if reply.status_code >= 400:
        raise SystemExit(f"{reply.request.method} {reply.request.url}: {reply.status_code} {reply.text}")
    body: dict[str, Any] = reply.json()
    return body


async def ingest(client: httpx.AsyncClient, name: str, corpus: list[dict[str, Any]], batch: int) -> tuple[float, int]:
    """(seconds from the first POST until every job succeeded, chunks)."""
    await client.delete(f"/v1/collections/{name}")
    await check(await client.post("/v1/collections", json={"name": name}))
    started = time.perf_counter()
    jobs = []
    for begin in range(0, len(corpus), batch):
        docs = [{"id": d["_id"], "title": d["title"], "text": d["text"]} for d in corpus[begin : begin + batch]]
        jobs.append(await check(await client.post(f"/v1/collections/{name}/documents", json={"documents": docs})))
    pending = {j["job_id"] for j in jobs}
    while pending:
        for job_id in list(pending):
            status = await check(await client.get(f"/v1/jobs/{job_id}"))
            if status["status"] == "failed":
                raise SystemExit(f"job {job_id} failed: {status['error']}")
            if status["status"] == "succeeded":
                pending.discard(job_id)
        await asyncio.sleep(0.25)
    return time.perf_counter() - started, sum(int(j["chunks"]) for j in jobs)


async def search(
    client: httpx.AsyncClient, collection: str, query: str, mode: str, top_k: int, cache: bool
) -> tuple[float, dict[str, Any]]:
    started = time.perf_counter()
    body = {"collection": collection, "query": query, "mode": mode, "top_k": top_k, "cache": cache}
    reply = await check(await client.post("/v1/search", json=body))
    return time.perf_counter() - started, reply


async def run_queries(
    client: httpx.AsyncClient, collection: str, queries: list[str], mode: str, concurrency: int, top_k: int, cache: bool
) -> tuple[list[float], float, list[dict[str, Any]]]:
    """(latencies, wall seconds, replies in query order)."""
    replies: list[dict[str, Any]] = [{} for _ in queries]
    latencies: list[float] = []
    next_index = 0

    async def worker() -> None:
        nonlocal next_index
        while next_index < len(queries):
            i = next_index
            next_index += 1
            seconds, reply = await search(client, collection, queries[i], mode, top_k, cache)
            latencies.append(seconds)
            replies[i] = reply

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies, time.perf_counter() - started, replies


# --- baseline ----------------------------------------------------------------------------


def raw_encode_seconds(corpus: list[dict[str, Any]]) -> tuple[float, int]:
    """SentenceTransformer.encode on the chunks the mesh makes, with the mesh's settings."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from sentence_transformers import SentenceTransformer

    from preprocess.documents import Chunker, clean_text, load_tokenizer
    from preprocess.settings import PreprocessSettings
    from retrieval.embedder import model_path
    from retrieval.index import embedding_text
    from retrieval.settings import RetrievalSettings

    pre, ret = PreprocessSettings(), RetrievalSettings()
    torch.set_num_threads(ret.torch_threads)
    chunker = Chunker(load_tokenizer(), pre.chunk_tokens, pre.chunk_overlap)
    texts = [
        embedding_text(c.title, c.text)
        for d in corpus
        for c in chunker.chunk(d["_id"], clean_text(d["title"]), clean_text(d["text"]), {})
    ]
    model = SentenceTransformer(model_path(ret), device="cpu")
    model.encode(["warm up"])
    started = time.perf_counter()
    model.encode(texts, batch_size=ret.encode_batch_size, normalize_embeddings=True, show_progress_bar=False)
    return time.perf_counter() - started, len(texts)


async def flush_embedding_cache() -> int:
    """Delete cached embeddings so that the first ingestion really embeds (namespace from the env)."""
    import redis.asyncio as aioredis

    namespace = os.environ.get("RAGMESH_NAMESPACE") or "ragmesh"
    redis = aioredis.Redis.from_url(os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"))
    deleted = 0
    async for key in redis.scan_iter(f"{namespace}:emb:*", count=1000):
        deleted += await redis.delete(key)
    await redis.aclose()
    return deleted


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gateway", default="http://127.0.0.1:8080")
    parser.add_argument("--limit", type=int, default=None, help="first N documents only (a quick run)")
    parser.add_argument("--batch", type=int, default=500, help="documents per POST")
    parser.add_argument("--latency-queries", type=int, default=120, help="queries per latency cell")
    parser.add_argument(
        "--reuse", action="store_true", help="keep a complete bench-scifact collection and the embedding cache"
    )
    parser.add_argument("--rerank-only", action="store_true", help="only the rerank comparison (with --reuse)")
    parser.add_argument(
        "--reranker",
        action="append",
        default=None,
        help="PATH_OR_MODEL: a reranking model the mesh serves, or a CrossEncoder folder (repeatable; "
        "default: every model /v1/models lists with the rerank capability)",
    )
    parser.add_argument("--rerank-queries", type=int, default=None, help="train queries in the rerank part (all)")
    parser.add_argument(
        "--no-cold-pass", action="store_true", help="no unmeasured first pass per reranker (nothing to warm)"
    )
    args = parser.parse_args()
    if not DATA.is_dir():
        print(f"{DATA} is absent: this benchmark needs ../shared/data/scifact", file=sys.stderr)
        return 1
    corpus, queries, qrels = load_scifact(args.limit)
    query_ids = sorted(queries)
    print(f"SciFact: {len(corpus)} documents, {len(query_ids)} train queries with judgements", flush=True)

    async with httpx.AsyncClient(base_url=args.gateway, timeout=600, limits=httpx.Limits(max_connections=32)) as client:
        if (await client.get("/v1/health/ready")).status_code != 200:
            print(f"the mesh is not ready at {args.gateway}: run `make up` first", file=sys.stderr)
            return 1
        if args.reuse and await complete(client, "bench-scifact", len(corpus)):
            print("bench-scifact is complete: ingestion not measured (--reuse)", flush=True)
            if args.rerank_only:
                return await rerank_part(client, args, queries, qrels, query_ids)
            raise SystemExit("--reuse without --rerank-only: nothing else runs without ingesting")
        flushed = await flush_embedding_cache()
        print(f"embedding cache flushed ({flushed} keys); ingesting (cold cache)...", flush=True)
        cold_seconds, chunks = await ingest(client, "bench-scifact", corpus, args.batch)
        print(f"  {chunks} chunks in {cold_seconds:.1f} s", flush=True)
        print("re-ingesting the same corpus (warm embedding cache)...", flush=True)
        warm_seconds, _ = await ingest(client, "bench-scifact-again", corpus, args.batch)
        await client.delete("/v1/collections/bench-scifact-again")
        print("raw SentenceTransformer.encode on the same chunks...", flush=True)
        raw_seconds, raw_chunks = await asyncio.to_thread(raw_encode_seconds, corpus)

        # Latency, cold first (each cell gets queries no other cell embedded).
        cells = [(mode, c) for mode in MODES for c in (1, 8)]
        per_cell = min(args.latency_queries, len(query_ids) // len(cells))
        texts = [queries[q] for q in query_ids]
        latency: dict[tuple[str, int, str], tuple[list[float], float]] = {}
        for n, (mode, concurrency) in enumerate(cells):
            subset = texts[n * per_cell : (n + 1) * per_cell]
            lat, wall, _ = await run_queries(client, "bench-scifact", subset, mode, concurrency, 10, cache=False)
            latency[(mode, concurrency, "cold")] = (lat, wall)

        # Quality over every train query.
        quality: dict[str, tuple[float, float]] = {}
        for mode in MODES:
            _, _, replies = await run_queries(client, "bench-scifact", texts, mode, 8, 30, cache=False)
            ranked = [documents_in_order(r["results"]) for r in replies]
            quality[mode] = (
                statistics.mean(ndcg_at_10(r, qrels[q]) for r, q in zip(ranked, query_ids, strict=True)),
                statistics.mean(recall_at_10(r, qrels[q]) for r, q in zip(ranked, query_ids, strict=True)),
            )

        subset = texts[:per_cell]
        for mode, concurrency in cells:
            latency[(mode, concurrency, "warm")] = (
                await run_queries(client, "bench-scifact", subset, mode, concurrency, 10, cache=False)
            )[:2]
            await run_queries(client, "bench-scifact", subset, mode, concurrency, 10, cache=True)  # fill the cache
            latency[(mode, concurrency, "cached")] = (
                await run_queries(client, "bench-scifact", subset, mode, concurrency, 10, cache=True)
            )[:2]
        await rerank_part(client, args, queries, qrels, query_ids)

    print()
    print(f"quality on SciFact train ({len(query_ids)} queries), through POST /v1/search (top 30 chunks -> documents)")
    print(f"{'mode':>8} | {'nDCG@10':>8} | {'Recall@10':>9}")
    for mode in MODES:
        print(f"{mode:>8} | {quality[mode][0]:>8.4f} | {quality[mode][1]:>9.4f}")
    print("anchors (BEIR test split, nDCG@10): BM25 0.665, all-MiniLM-L6-v2 ~0.645, OpenSearch hybrid 0.673")
    best_single = max(quality["sparse"][0], quality["dense"][0])
    hybrid = quality["hybrid"][0]
    print(
        f"target: hybrid >= 0.70 and above both single modes: {hybrid:.4f} vs best single {best_single:.4f} -> "
        f"{'PASS' if hybrid >= 0.70 and hybrid > best_single else 'FAIL'}"
    )

    print()
    print(f"ingestion of {len(corpus)} documents ({chunks} chunks)")
    mesh_rate, raw_rate = chunks / cold_seconds, raw_chunks / raw_seconds
    print(f"{'':>34} | {'seconds':>8} | {'chunks/s':>8}")
    print(f"{'mesh, cold embedding cache':>34} | {cold_seconds:>8.1f} | {mesh_rate:>8.1f}")
    print(f"{'raw SentenceTransformer.encode':>34} | {raw_seconds:>8.1f} | {raw_rate:>8.1f}")
    print(f"{'mesh, re-ingestion (cache warm)':>34} | {warm_seconds:>8.1f} | {chunks / warm_seconds:>8.1f}")
    ratio, speedup = mesh_rate / raw_rate, cold_seconds / warm_seconds
    print(f"target: mesh >= 0.8x raw encode: {ratio:.2f}x -> {'PASS' if ratio >= 0.8 else 'FAIL'}")
    print(f"target: re-ingestion >= 10x faster: {speedup:.1f}x -> {'PASS' if speedup >= 10 else 'FAIL'}")

    print()
    print(f"search latency, top_k 10, {per_cell} queries per cell (ms)")
    print(
        f"{'mode':>8} | {'conc':>4} | {'cold p50/p95':>15} | {'cold QPS':>8} | "
        f"{'warm p50/p95':>15} | {'warm QPS':>8} | {'cached p50/p95':>15} | {'cached QPS':>10}"
    )
    for mode, concurrency in cells:
        row = f"{mode:>8} | {concurrency:>4}"
        for kind, width in (("cold", 8), ("warm", 8), ("cached", 10)):
            lat, wall = latency[(mode, concurrency, kind)]
            row += f" | {pct(lat, 0.5) * 1000:>6.1f} / {pct(lat, 0.95) * 1000:>6.1f} | {len(lat) / wall:>{width}.1f}"
        print(row)
    return 0


async def complete(client: httpx.AsyncClient, name: str, documents: int) -> bool:
    """Whether the collection holds the whole corpus already."""
    reply = await client.get(f"/v1/collections/{name}")
    return reply.status_code == 200 and int(reply.json()["documents"]) == documents


async def rerank_part(
    client: httpx.AsyncClient,
    args: argparse.Namespace,
    queries: dict[str, str],
    qrels: dict[str, dict[str, int]],
    query_ids: list[str],
) -> int:
    chosen = query_ids[: args.rerank_queries] if args.rerank_queries else query_ids
    rerankers = args.reranker or await rerankers_served(client)
    print(f"rerank step: {len(chosen)} queries, rerankers {rerankers}", flush=True)

    def judge(results: list[dict[str, Any]], i: int) -> float:
        return ndcg_at_10(documents_in_order(results), qrels[chosen[i]])

    rows = await run_rerank_section(
        client, "bench-scifact", [queries[q] for q in chosen], judge, rerankers, not args.no_cold_pass
    )
    print_rerank_table(rows, len(chosen))
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
