"""Hybrid search latency on SciFact, warm and cold, through the gateway and straight to retrieval.

Starts a mesh of its own (scripts/mesh.py, free ports, its own namespace),
ingests SciFact (`--docs`, default all of it) and times single searches, one at
a time (concurrency 1, result cache off: `"cache": false` / `no_cache`):

- cold: the query was never seen, so retrieval embeds it (the model's forward);
- warm: the same query again, so its embedding comes from the Redis embedding
  cache and the search itself (FAISS, BM25, fusion) runs as on a cold query.

The train queries are split in two interleaved halves: one half goes through
the gateway (POST /v1/search), the other straight to retrieval's gRPC Search
(the floor the gateway adds to), each cold and then warm, with the same number
of queries in each cell.

Baseline in the same run (`--baseline-ref`, default the commit before issue 20's
search work): the mesh is stopped and started again on the same folder (the
collection loads from disk, nothing is re-embedded) with retrieval's code (and
the shared package it was written against) taken from that git revision, the
query embeddings are deleted from the cache, and the same queries are timed
again. The run ends by checking that both codes returned the same top-k (chunk ids
in order, scores within 1e-5) for every query, and prints retrieval's own timers
(query embedding, search) per cell.

`--profile DIR` adds, per code, an untimed warm and cold pass through the
gateway under py-spy (pip install py-spy) on retrieval and preprocess, saved as
collapsed stacks in DIR/<code>/.

Usage:
    .venv/bin/python bench/search_latency.py [--docs N] [--queries N] [--top-k 10] [--baseline-ref REV|none]
        [--profile DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from io import BytesIO
from pathlib import Path
from typing import Any

import grpc
import httpx
from rag_stages import DATA, ROOT, histogram, mesh_env, scrape

# The code before issue 20's search work (retrieval's query embedding via SentenceTransformer.encode).
BEFORE = "06d7938"
TARGET_WARM_MS, TARGET_COLD_MS = 5.0, 15.0
TOLERANCE = 1e-5


def train_queries() -> list[str]:
    lines = (DATA / "queries.train.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(q)["text"] for q in lines]


def ingest(client: httpx.Client, collection: str, docs: int, batch: int = 500) -> None:
    """The first `docs` SciFact documents, `batch` per POST (a body stays under the gateway's limit)."""
    lines = (DATA / "corpus.jsonl").read_text(encoding="utf-8").splitlines()[:docs]
    documents = [{"id": d["_id"], "title": d.get("title", ""), "text": d["text"]} for d in map(json.loads, lines)]
    client.post("/v1/collections", json={"name": collection}).raise_for_status()
    jobs = []
    for begin in range(0, len(documents), batch):
        reply = client.post(
            f"/v1/collections/{collection}/documents", json={"documents": documents[begin : begin + batch]}
        )
        reply.raise_for_status()
        jobs.append(reply.json()["job_id"])
    deadline = time.monotonic() + 1800
    while jobs and time.monotonic() < deadline:
        status = client.get(f"/v1/jobs/{jobs[0]}").json()
        if status.get("status") == "failed":
            raise RuntimeError(f"ingestion failed: {status}")
        if status.get("status") == "succeeded":
            jobs.pop(0)
        else:
            time.sleep(1)
    if jobs:
        raise RuntimeError("ingestion did not finish")


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


class Targets:
    """The two ways in: the gateway's POST /v1/search and retrieval's gRPC Search."""

    def __init__(self, env: dict[str, str], run_dir: Path, collection: str, top_k: int) -> None:
        from ragmesh.context import SERVICE_TOKEN_HEADER
        from ragmesh.v1 import retrieval_pb2, retrieval_pb2_grpc

        self._pb = retrieval_pb2
        self.collection, self.top_k = collection, top_k
        self.http = httpx.Client(base_url=f"http://127.0.0.1:{env['RAGMESH_GATEWAY_PORT']}", timeout=60)
        self._channel = grpc.insecure_channel(f"127.0.0.1:{env['RAGMESH_RETRIEVAL_GRPC_PORT']}")
        self._stub = retrieval_pb2_grpc.RetrievalStub(self._channel)
        self._metadata = ((SERVICE_TOKEN_HEADER, (run_dir / "service-token").read_text().strip()),)
        self.metrics = f"http://127.0.0.1:{env['RAGMESH_RETRIEVAL_HTTP_PORT']}/metrics"

    def gateway(self, query: str) -> tuple[float, list[tuple[str, float]]]:
        body = {"collection": self.collection, "query": query, "mode": "hybrid", "top_k": self.top_k, "cache": False}
        started = time.perf_counter()
        reply = self.http.post("/v1/search", json=body)
        seconds = time.perf_counter() - started
        reply.raise_for_status()
        return seconds, [(h["chunk_id"], h["score"]) for h in reply.json()["results"]]

    def grpc(self, query: str) -> tuple[float, list[tuple[str, float]]]:
        request = self._pb.SearchRequest(
            collection=self.collection,
            query=query,
            top_k=self.top_k,
            mode=self._pb.SEARCH_MODE_HYBRID,
            no_cache=True,
        )
        started = time.perf_counter()
        reply = self._stub.Search(request, timeout=60, metadata=self._metadata)
        seconds = time.perf_counter() - started
        return seconds, [(h.chunk_id, h.score) for h in reply.hits]

    def close(self) -> None:
        self.http.close()
        self._channel.close()


def measure(targets: Targets, halves: dict[str, list[str]], warmup: list[str]) -> dict[str, Any]:
    """Cold then warm passes, the two targets interleaved query by query; retrieval's timers per pass."""
    for query in warmup:  # connections, first-call allocations (these queries are not timed again)
        targets.gateway(query)
        targets.grpc(query)
    out: dict[str, Any] = {"latency": {}, "hits": {}, "stages": {}}
    calls = {"gateway": targets.gateway, "grpc": targets.grpc}
    for kind in ("cold", "warm"):
        before = scrape(targets.metrics)
        for path in calls:
            out["latency"][(path, kind)] = []
        for i in range(max(len(v) for v in halves.values())):
            for path, call in calls.items():
                if i < len(halves[path]):
                    seconds, hits = call(halves[path][i])
                    out["latency"][(path, kind)].append(seconds)
                    out["hits"][(path, kind, i)] = hits
        after = scrape(targets.metrics)
        out["stages"][kind] = {
            "query embedding": histogram(before, after, "ragmesh_retrieval_query_embedding_seconds"),
            "search (in retrieval)": histogram(before, after, "ragmesh_retrieval_search_seconds", 'mode="hybrid"'),
        }
    return out


def query_backend(metrics_url: str) -> str:
    """What embeds queries in this retrieval (ragmesh_retrieval_query_backend; torch where the
    code predates it)."""
    for line in httpx.get(metrics_url, timeout=10).text.splitlines():
        if line.startswith("ragmesh_retrieval_query_backend{") and line.endswith(" 1.0"):
            return line.split('"')[1]
    return "torch"


def baseline_python(rev: str) -> Path:
    """A python for the launcher (RAGMESH_PYTHON) that runs retrieval from `rev`'s sources, with
    the shared package from `rev` too (that retrieval reads that revision's settings), and every
    other service from this tree. The generated stubs (not in git) are today's: proto only grows."""
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", "--format=tar", rev, "services/retrieval/src", "libs/ragmesh/src"],
        check=True,
        capture_output=True,
    ).stdout
    folder = Path(tempfile.mkdtemp(prefix="search-baseline-"))
    with tarfile.open(fileobj=BytesIO(archive)) as tar:
        tar.extractall(folder, filter="data")
    libs = folder / "libs" / "ragmesh" / "src"
    shutil.copytree(ROOT / "libs" / "ragmesh" / "src" / "ragmesh" / "v1", libs / "ragmesh" / "v1", dirs_exist_ok=True)
    path = f"{folder / 'services' / 'retrieval' / 'src'}{os.pathsep}{libs}"
    venv = Path(sys.executable).parent
    bin_dir = folder / "bin"
    bin_dir.mkdir()
    (bin_dir / "supervisord").symlink_to(venv / "supervisord")  # the launcher finds it beside the python
    python = bin_dir / "python"
    python.write_text(
        "#!/bin/sh\n"
        f'if [ "$1" = "-m" ] && [ "$2" = "retrieval" ]; then export PYTHONPATH="{path}"; fi\n'
        f'exec "{sys.executable}" "$@"\n'
    )
    python.chmod(0o755)
    return python


def forget_query_embeddings(env: dict[str, str], queries: list[str]) -> int:
    """Delete these queries' cached embeddings (the bench's own namespace), so they are cold again."""
    import hashlib

    import redis

    client = redis.Redis.from_url(env.get("REDIS_URL", "redis://127.0.0.1:6379/0"))
    digests = {hashlib.sha256(q.encode()).hexdigest() for q in queries}
    doomed = [
        key
        for key in client.scan_iter(f"{env['RAGMESH_NAMESPACE']}:emb:*", count=1000)
        if key.decode().rsplit(":", 1)[-1] in digests
    ]
    deleted = int(client.delete(*doomed)) if doomed else 0
    client.close()
    return deleted


def service_pid(env: dict[str, str], module: str) -> int:
    """The process of `python -m module` that runs with this bench's namespace."""
    for entry in Path("/proc").iterdir():
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            if (
                argv[1:3] == [b"-m", module.encode()]
                and env["RAGMESH_NAMESPACE"].encode() in (entry / "environ").read_bytes()
            ):
                return int(entry.name)
        except (OSError, ValueError, IndexError):
            continue
    raise RuntimeError(f"no {module} process of this mesh")


def profile(env: dict[str, str], targets: Targets, queries: list[str], folder: Path) -> None:
    """py-spy (collapsed stacks, 250 Hz) on retrieval and preprocess over an untimed warm pass
    through the gateway, then a cold one (the queries' embeddings deleted from the cache first)."""
    folder.mkdir(parents=True, exist_ok=True)
    spy = str(Path(sys.executable).parent / "py-spy")
    pids = {module: service_pid(env, module) for module in ("retrieval", "preprocess")}
    for kind in ("warm", "cold"):
        if kind == "cold":
            forget_query_embeddings(env, queries)
        spies = [
            subprocess.Popen(
                [spy, "record", "-p", str(pid), "-r", "250", "-f", "raw", "-o", str(folder / f"{kind}-{module}.txt")],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            for module, pid in pids.items()
        ]
        time.sleep(1)  # attached
        for query in queries:
            targets.gateway(query)
        for process in spies:
            process.send_signal(signal.SIGINT)
        for process in spies:
            process.wait()
    print(f"profiles in {folder}", flush=True)


def run_phase(
    label: str,
    env: dict[str, str],
    run_dir: Path,
    args: argparse.Namespace,
    halves: dict[str, list[str]],
    warmup: list[str],
    first: bool,
) -> dict[str, Any]:
    mesh = [sys.executable, str(ROOT / "scripts" / "mesh.py")]
    print(f"[{label}] starting the mesh...", flush=True)
    subprocess.run([*mesh, "up", "--timeout", "600"], env=env, check=True)
    try:
        targets = Targets(env, run_dir, "scifact-latency", args.top_k)
        try:
            if first:
                started = time.perf_counter()
                ingest(targets.http, "scifact-latency", args.docs)
                print(f"[{label}] ingested {args.docs} documents in {time.perf_counter() - started:.0f} s", flush=True)
            info = targets.http.get("/v1/collections/scifact-latency").json()
            print(f"[{label}] collection: {info.get('documents')} documents, {info.get('chunks')} chunks", flush=True)
            print(f"[{label}] query embedding runtime: {query_backend(targets.metrics)}", flush=True)
            load = os.getloadavg()[0]
            result = measure(targets, halves, warmup)
            result["load"] = (load, os.getloadavg()[0])
            if args.profile:
                profile(env, targets, halves["gateway"], args.profile / label)
            return result
        finally:
            targets.close()
    finally:
        subprocess.run([*mesh, "down"], env=env, check=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=int, default=5183, help="SciFact documents to ingest (all: 5183)")
    parser.add_argument("--queries", type=int, default=800, help="train queries timed (split between the paths)")
    parser.add_argument("--top-k", type=int, default=10)
    parser.add_argument("--baseline-ref", default=BEFORE, help="git revision of the baseline retrieval, or 'none'")
    parser.add_argument(
        "--profile", type=Path, default=None, help="folder: py-spy profiles of an extra untimed pass per code"
    )
    args = parser.parse_args()

    run_dir = Path(tempfile.mkdtemp(prefix="search-latency-"))
    env = mesh_env(run_dir)
    texts = train_queries()
    timed, warmup = texts[: args.queries], texts[-5:]
    halves = {"gateway": timed[0::2], "grpc": timed[1::2]}
    phases: dict[str, dict[str, Any]] = {}
    try:
        phases["ours"] = run_phase("ours", env, run_dir, args, halves, warmup, first=True)
        if args.baseline_ref != "none":
            python = baseline_python(args.baseline_ref)
            deleted = forget_query_embeddings(env, timed + warmup)
            print(f"[baseline] {deleted} query embeddings deleted from the cache; retrieval via {python}", flush=True)
            old_env = dict(env, RAGMESH_PYTHON=str(python))
            try:
                phases["baseline"] = run_phase("baseline", old_env, run_dir, args, halves, warmup, first=False)
            except subprocess.CalledProcessError as exc:
                # An old revision that no longer starts here: this branch's figures are still reported.
                print(f"[baseline] did not start ({exc}); see {run_dir}/logs; reporting this branch alone", flush=True)
    finally:
        sys.path.insert(0, str(ROOT))
        from tests.conftest import delete_bench_topology

        delete_bench_topology(env)
    report(args, phases, halves)


def report(args: argparse.Namespace, phases: dict[str, dict[str, Any]], halves: dict[str, list[str]]) -> None:
    n = {path: len(queries) for path, queries in halves.items()}
    print(
        f"\nhybrid search, top_k {args.top_k}, {args.docs} SciFact documents, one query at a time, result cache off; "
        f"{n['gateway']} queries through the gateway, {n['grpc']} others straight to retrieval's gRPC Search\n"
    )
    for phase, result in phases.items():
        print(
            f"{phase}: machine load average {result['load'][0]:.1f} before the timed passes, "
            f"{result['load'][1]:.1f} after"
        )
    print()
    print("| code | path | cold p50 ms | cold p99 ms | cold mean ms | warm p50 ms | warm p99 ms | warm mean ms |")
    print("|---|---|---|---|---|---|---|---|")
    labels = {"ours": "this branch", "baseline": f"baseline {args.baseline_ref}"}
    for phase, result in phases.items():
        for path, name in (("gateway", "POST /v1/search (gateway)"), ("grpc", "gRPC Search (direct)")):
            cells = []
            for kind in ("cold", "warm"):
                lat = result["latency"][(path, kind)]
                cells += [f"{x * 1000:.2f}" for x in (pct(lat, 0.5), pct(lat, 0.99), statistics.mean(lat))]
            print(f"| {labels[phase]} | {name} | " + " | ".join(cells) + " |")
    print("\nretrieval's own timers (both paths' queries; p50 interpolated in the histogram's buckets)\n")
    print("| code | stage | cold mean ms | cold p50 ms | warm mean ms | warm p50 ms |")
    print("|---|---|---|---|---|---|")
    for phase, result in phases.items():
        for stage in result["stages"]["cold"]:
            cold, warm = result["stages"]["cold"][stage], result["stages"]["warm"][stage]
            cells = [f"{x * 1000:.2f}" for x in (cold["mean"], cold["p50"], warm["mean"], warm["p50"])]
            print(f"| {labels[phase]} | {stage} | " + " | ".join(cells) + " |")
    ours = phases["ours"]["latency"]
    warm, cold = pct(ours[("gateway", "warm")], 0.5) * 1000, pct(ours[("gateway", "cold")], 0.5) * 1000
    print(
        f"\ntarget: gateway p50 warm <= {TARGET_WARM_MS:g} ms: {warm:.2f} -> "
        f"{'met' if warm <= TARGET_WARM_MS else 'NOT met'}; cold <= {TARGET_COLD_MS:g} ms: {cold:.2f} -> "
        f"{'met' if cold <= TARGET_COLD_MS else 'NOT met'}"
    )
    if "baseline" in phases:
        compare(phases["ours"]["hits"], phases["baseline"]["hits"])


def compare(ours: dict[Any, list[tuple[str, float]]], base: dict[Any, list[tuple[str, float]]]) -> None:
    """Same chunk ids in the same order, and scores within TOLERANCE, for every query and pass."""
    same_ids = close = 0
    worst = 0.0
    for key, hits in ours.items():
        other = base[key]
        if [c for c, _ in hits] == [c for c, _ in other]:
            same_ids += 1
            diff = max((abs(a - b) for (_, a), (_, b) in zip(hits, other, strict=True)), default=0.0)
            worst = max(worst, diff)
            close += diff <= TOLERANCE
    print(
        f"results vs baseline: same top-k ids in the same order for {same_ids}/{len(ours)} searches, "
        f"scores within {TOLERANCE:g} for {close}/{len(ours)} (largest difference {worst:.2e})"
    )


if __name__ == "__main__":
    main()
