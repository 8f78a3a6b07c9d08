"""RAG per stage, from the services' own timers: what the mesh adds beside the model's prefill and decode.

Starts a mesh of its own (scripts/mesh.py, free ports, its own namespace),
ingests the first `--docs` SciFact documents into a collection, then sends
`--requests` chat requests one at a time through the gateway: first without
RAG (the baseline), then with `"rag": {"collection", "top_k"}`. Each service's
/metrics is read before and after each round, and the deltas of its histograms
give per-stage means and p50s (interpolated in the buckets):

- query embedding (retrieval: `ragmesh_retrieval_query_embedding_seconds`),
- search as preprocess waits for it (`ragmesh_preprocess_rag_stage_seconds{stage="search"}`),
- prompt fitting (`...{stage="fit"}`: the token counts, TokenizeBatch + the exact count),
- prefill and decode (the engine's own timings: `ragmesh_inference_prefill_seconds`, `..._decode_seconds`),
- the engine's own time before the first token beyond prefill (its time to first token,
  `ragmesh_inference_time_to_first_token_seconds`, minus prefill, by means): the chat template,
  tokenization and slot choice of a longer prompt,
- postprocess (`ragmesh_postprocess_processing_seconds`: handling the chunks and storing the answer),
- the request end to end as the client sees it.

"Mesh" = end to end - prefill - decode, per round (means subtract exactly):
everything that is not the model reading and writing, the target being <= 50 ms
p50 with RAG. The same figure without RAG is the baseline beside it.

Usage:
    .venv/bin/python bench/rag_stages.py [--docs 300] [--requests 30] [--top-k 4] [--max-tokens 16]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("RAGMESH_SHARED_DATA", ROOT.parent / "shared" / "data")) / "scifact"
MODEL = "SmolLM2-135M-Instruct"
PORTS = (
    "PREPROCESS_HTTP",
    "PREPROCESS_ADMIN",
    "GATEWAY_ADMIN",
    "INFERENCE_HTTP",
    "RETRIEVAL_HTTP",
    "POSTPROCESS_HTTP",
    "INFERENCE_GRPC",
    "RETRIEVAL_GRPC",
    "POSTPROCESS_GRPC",
    "GATEWAY",
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def mesh_env(run_dir: Path) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for name in PORTS:
        env[f"RAGMESH_{name}_PORT"] = str(free_port())
    for key in ("RAGMESH_PREPROCESS_INFERENCE_ADDR", "RAGMESH_PREPROCESS_RETRIEVAL_ADDR"):
        env.pop(key, None)
    env.pop("RAGMESH_PREPROCESS_POSTPROCESS_ADDR", None)
    env["RAGMESH_RUN_DIR"] = str(run_dir)
    env["RAGMESH_NAMESPACE"] = f"bench-{uuid.uuid4().hex[:10]}"
    return env


# --- Prometheus histograms ---------------------------------------------------------------------


def scrape(url: str) -> dict[tuple[str, str], float]:
    """{(sample name with labels, le): value} of every histogram bucket, sum and count."""
    out: dict[tuple[str, str], float] = {}
    for line in httpx.get(url, timeout=10).text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        name, _, value = line.rpartition(" ")
        out[(name, "")] = float(value)
    return out


def histogram(before: dict[Any, float], after: dict[Any, float], metric: str, labels: str = "") -> dict[str, float]:
    """count, mean and interpolated p50 of what a histogram gained between two scrapes."""

    def delta(key: str) -> float:
        return after.get((key, ""), 0.0) - before.get((key, ""), 0.0)

    suffix = f"{{{labels}}}" if labels else ""
    count = delta(f"{metric}_count{suffix}")
    if count <= 0:
        return {"count": 0, "mean": float("nan"), "p50": float("nan")}
    total = delta(f"{metric}_sum{suffix}")
    buckets = []
    for (name, _), _value in after.items():
        if name.startswith(f"{metric}_bucket{{") and (not labels or labels in name):
            le = name.split('le="')[1].split('"')[0]
            buckets.append((float("inf") if le == "+Inf" else float(le), delta(name)))
    buckets.sort()
    half, previous_le, previous_n = count / 2, 0.0, 0.0
    p50 = float("nan")
    for le, n in buckets:
        if n >= half:
            p50 = (
                le
                if le == float("inf") or n == previous_n
                else previous_le + (le - previous_le) * (half - previous_n) / (n - previous_n)
            )
            break
        previous_le, previous_n = le, n
    return {"count": count, "mean": total / count, "p50": p50}


# --- the run -------------------------------------------------------------------------------------


def ingest(client: httpx.Client, collection: str, docs: int) -> None:
    lines = (DATA / "corpus.jsonl").read_text(encoding="utf-8").splitlines()[:docs]
    documents = [{"id": d["_id"], "title": d.get("title", ""), "text": d["text"]} for d in map(json.loads, lines)]
    client.post("/v1/collections", json={"name": collection}).raise_for_status()
    job = client.post(f"/v1/collections/{collection}/documents", json={"documents": documents})
    job.raise_for_status()
    job_id = job.json()["job_id"]
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        status = client.get(f"/v1/jobs/{job_id}").json()
        if status.get("status") in ("succeeded", "failed"):
            if status["status"] != "succeeded":
                raise RuntimeError(f"ingestion failed: {status}")
            return
        time.sleep(1)
    raise RuntimeError("ingestion did not finish")


def questions(count: int) -> list[str]:
    lines = (DATA / "queries.train.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(q)["text"] for q in lines[:count]]


def run_round(
    client: httpx.Client, metrics: dict[str, str], texts: list[str], rag: dict[str, Any] | None, max_tokens: int
) -> dict[str, Any]:
    before = {name: scrape(url) for name, url in metrics.items()}
    latencies: list[float] = []
    failures: list[str] = []
    for text in texts:
        body: dict[str, Any] = {
            "model": MODEL,
            "messages": [{"role": "user", "content": text}],
            "max_tokens": max_tokens,
            "temperature": 0,
        }
        if rag is not None:
            body["rag"] = rag
        started = time.perf_counter()
        reply = client.post("/v1/chat/completions", json=body)
        if reply.status_code != 200:  # counted and shown, not timed (the stage timers may hold part of it)
            failures.append(f"{reply.status_code}: {reply.text[:160]}")
            continue
        latencies.append(time.perf_counter() - started)
    after = {name: scrape(url) for name, url in metrics.items()}
    stages = {
        "query embedding": histogram(
            before["retrieval"], after["retrieval"], "ragmesh_retrieval_query_embedding_seconds"
        ),
        "search (preprocess)": histogram(
            before["preprocess"], after["preprocess"], "ragmesh_preprocess_rag_stage_seconds", 'stage="search"'
        ),
        "prompt fitting": histogram(
            before["preprocess"], after["preprocess"], "ragmesh_preprocess_rag_stage_seconds", 'stage="fit"'
        ),
        "prefill (engine)": histogram(before["inference"], after["inference"], "ragmesh_inference_prefill_seconds"),
        "decode (engine)": histogram(before["inference"], after["inference"], "ragmesh_inference_decode_seconds"),
        "postprocess": histogram(before["postprocess"], after["postprocess"], "ragmesh_postprocess_processing_seconds"),
    }
    ttft = histogram(before["inference"], after["inference"], "ragmesh_inference_time_to_first_token_seconds")
    stages["engine before 1st token, not prefill"] = {
        "count": ttft["count"],
        "mean": ttft["mean"] - stages["prefill (engine)"]["mean"],
        "p50": float("nan"),  # a difference of means: no p50
    }
    e2e = {"count": len(latencies), "mean": statistics.mean(latencies), "p50": statistics.median(latencies)}
    model_mean = stages["prefill (engine)"]["mean"] + stages["decode (engine)"]["mean"]
    return {"stages": stages, "e2e": e2e, "mesh_mean": e2e["mean"] - model_mean, "failures": failures}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=int, default=300)
    parser.add_argument("--requests", type=int, default=30)
    parser.add_argument("--top-k", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=16)
    args = parser.parse_args()

    run_dir = Path(tempfile.mkdtemp(prefix="rag-stages-"))
    env = mesh_env(run_dir)
    mesh = [sys.executable, str(ROOT / "scripts" / "mesh.py")]
    subprocess.run([*mesh, "up", "--timeout", "300"], env=env, check=True)
    try:
        metrics = {
            name: f"http://127.0.0.1:{env[f'RAGMESH_{name.upper()}_HTTP_PORT']}/metrics"
            for name in ("preprocess", "retrieval", "inference", "postprocess")
        }
        with httpx.Client(base_url=f"http://127.0.0.1:{env['RAGMESH_GATEWAY_PORT']}", timeout=300) as client:
            ingest(client, "scifact-bench", args.docs)
            texts = questions(args.requests + 3)
            rag = {"collection": "scifact-bench", "top_k": args.top_k}
            run_round(client, metrics, texts[:3], rag, args.max_tokens)  # warm up both paths
            plain = run_round(client, metrics, texts[3:], None, args.max_tokens)
            with_rag = run_round(client, metrics, texts[3:], rag, args.max_tokens)
    finally:
        subprocess.run([*mesh, "down"], env=env, check=False)
        sys.path.insert(0, str(ROOT))
        from tests.conftest import delete_bench_topology

        delete_bench_topology(env)

    print(
        f"\n{args.requests} chat requests, one at a time, max_tokens {args.max_tokens}, "
        f"RAG top_k {args.top_k} over {args.docs} SciFact documents\n"
    )
    print("| stage | without RAG: mean ms | p50 ms | with RAG: mean ms | p50 ms |")
    print("|---|---|---|---|---|")

    def row(label: str, a: dict[str, float], b: dict[str, float]) -> None:
        cells = [f"{x * 1000:.1f}" for x in (a["mean"], a["p50"], b["mean"], b["p50"])]
        print(f"| {label} | " + " | ".join(cells) + " |")

    for stage in with_rag["stages"]:
        row(stage, plain["stages"][stage], with_rag["stages"][stage])
    row("end to end (client)", plain["e2e"], with_rag["e2e"])
    mesh_plain, mesh_rag = plain["mesh_mean"] * 1000, with_rag["mesh_mean"] * 1000
    print(f"| **mesh = e2e - prefill - decode** | {mesh_plain:.1f} | | {mesh_rag:.1f} | |")
    print(f"| RAG's addition to the mesh | | | {mesh_rag - mesh_plain:.1f} | |")
    for label, run in (("without RAG", plain), ("with RAG", with_rag)):
        for failure in run["failures"]:
            print(f"failed request ({label}): {failure}")
    non_model = with_rag["mesh_mean"] * 1000
    print(
        f"\ntarget: everything but prefill and decode <= 50 ms with RAG (mean): {non_model:.1f} ms -> "
        f"{'met' if non_model <= 50 else 'NOT met'}"
    )
    print("(p50s come from histogram buckets, interpolated; means are exact)")


if __name__ == "__main__":
    main()
