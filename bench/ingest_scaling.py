"""Ingestion cost against collection size: SciFact in 100 jobs against one job, this code and the old.

What an ingestion job costs a retrieval replica once its chunks are embedded:
the BM25 tokens (`records_from`), the new snapshot (`Snapshot.with_chunks`)
and its files (`save`, fsynced), through `CollectionStore.add_chunks` as the
`ingest` consumer calls it. Embedding is left out: it is O(job) by nature and
the same in every arm, and it would take minutes per arm on a shared machine;
random unit vectors cost the index what embeddings cost it.

Arms, each in a fresh subprocess and data folder:
- ours, 1 job with every document (the baseline the target names);
- ours, `--jobs` jobs (100: about 52 documents each);
- old: the same two on the code of `--base` (default: just before chunk_log.py came), loaded
  from git into a temporary folder: every job rebuilt BM25 over the collection,
  cloned FAISS and rewrote every file.

Printed: total time per arm and the ratio jobs/one-job (target <= 1.3x), the
per-job time at growing collection sizes, and a check that after the jobs
every query gives bit-identical results (positions and scores) to a full
rebuild, to a reload from disk and to a catch-up copy (ExportCollection parts
imported), plus the agreement of the sparse top 10 with the old code's bm25s.

Usage:
    .venv/bin/python bench/ingest_scaling.py [--jobs 100] [--limit N] [--no-old]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("RAGMESH_SHARED_DATA", ROOT.parent / "shared" / "data")) / "scifact"
DIMS = 384
QUERIES = 200


def load_chunks(limit: int | None) -> tuple[list[dict[str, Any]], list[str]]:
    """SciFact documents chunked as preprocess chunks them (200 tokens, 40 shared), and query texts."""
    from preprocess.documents import Chunker, clean_text, load_tokenizer

    chunker = Chunker(load_tokenizer(), 200, 40)
    lines = (DATA / "corpus.jsonl").read_text(encoding="utf-8").splitlines()
    docs = [json.loads(line) for line in lines][: limit or None]
    chunks = []
    for doc in docs:
        for c in chunker.chunk(doc["_id"], doc.get("title", ""), clean_text(doc["text"]), {}):
            chunks.append({"chunk_id": c.chunk_id, "document_id": c.document_id, "title": c.title, "text": c.text})
    queries = [json.loads(q)["text"] for q in (DATA / "queries.train.jsonl").read_text().splitlines()[:QUERIES]]
    return chunks, queries


def unit_vectors(count: int) -> np.ndarray:
    """Random unit vectors: they cost the index what embeddings cost it (embedding is left out)."""
    v = np.random.default_rng(0).standard_normal((count, DIMS)).astype(np.float32)
    unit: np.ndarray = v / np.linalg.norm(v, axis=1, keepdims=True)
    return unit


# --- one arm, in its own process ------------------------------------------------------------


def job_protos(chunks: list[dict[str, Any]], jobs: int) -> list[list[Any]]:
    """The chunks as ingest_pb2.Chunk, cut into `jobs` jobs of whole documents."""
    from ragmesh.v1 import ingest_pb2

    documents: dict[str, list[dict[str, Any]]] = {}
    for c in chunks:
        documents.setdefault(c["document_id"], []).append(c)
    ordered = list(documents.values())
    per_job = -(-len(ordered) // jobs)
    out = []
    for begin in range(0, len(ordered), per_job):
        out.append([ingest_pb2.Chunk(**c) for doc in ordered[begin : begin + per_job] for c in doc])
    return out


async def run_arm(args: argparse.Namespace, payload: dict[str, Any], vectors: np.ndarray) -> dict[str, Any]:
    from retrieval.index import Snapshot, bm25_tokens
    from retrieval.ingestion import records_from
    from retrieval.settings import RetrievalSettings
    from retrieval.store import CollectionStore

    chunks, queries = payload["chunks"], payload["queries"]
    data_dir = tempfile.mkdtemp(prefix="ingest-scaling-")
    store = CollectionStore(RetrievalSettings(data_dir=data_dir, replica_id="bench"), None)
    snapshot = await store.ensure_local("scifact", "bench-id", 1)
    assert snapshot is not None
    per_job: list[tuple[int, float]] = []
    row = 0
    started, cpu_started = time.perf_counter(), time.process_time()
    for i, job in enumerate(job_protos(chunks, args.jobs)):
        t0 = time.perf_counter()
        records = await asyncio.to_thread(records_from, job)
        snapshot = await store.add_chunks(
            snapshot, records, vectors[row : row + len(job)], version=i + 1, job_id=f"job-{i}"
        )
        per_job.append((len(snapshot.chunks), time.perf_counter() - t0))
        row += len(job)
    total, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    if hasattr(store, "close"):
        await store.close()
    rng = np.random.default_rng(1)
    picks = rng.integers(0, len(vectors), 50)
    noise = rng.standard_normal((len(picks), vectors.shape[1])).astype(np.float32)
    dense_queries: list[np.ndarray] = list(vectors[picks] + 0.05 * noise)
    tokens = [bm25_tokens([q])[0] for q in queries]

    def results(snap: Any) -> list[Any]:
        out: list[Any] = [snap.sparse(t, 10) for t in tokens]
        out += [snap.dense(q.astype(np.float32), 10) for q in dense_queries]
        return out

    mine = results(snapshot)
    report: dict[str, Any] = {
        "total": total,
        "cpu": cpu,
        "per_job": per_job,
        "chunks": len(snapshot.chunks),
        "sparse_top10": [[snapshot.chunks[p].chunk_id for p, _ in hits] for hits in mine[: len(tokens)]],
    }
    if args.check:
        from retrieval.catchup import export_parts, import_parts

        meta = snapshot.meta
        rebuilt = Snapshot.build(meta, list(snapshot.chunks), np.array(snapshot.vectors), store.params)
        loaded = Snapshot.load(Path(data_dir) / "collections" / "scifact", store.params)
        parts = export_parts(snapshot)
        copy = import_parts(parts[0].state, [p.chunks for p in parts[1:]], store)
        report["identical"] = {
            "full rebuild": results(rebuilt) == mine,
            "reload from disk": loaded is not None and results(loaded) == mine,
            "catch-up copy": results(copy) == mine,
        }
    return report


# --- the orchestra ----------------------------------------------------------------------------


def old_code(base: str) -> Path:
    """The retrieval package at `base`, written into a temporary folder."""
    folder = Path(tempfile.mkdtemp(prefix="ingest-old-"))
    package = folder / "retrieval"
    package.mkdir()
    names = subprocess.run(
        ["git", "ls-tree", "--name-only", base, "services/retrieval/src/retrieval/"],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    for name in names:
        source = subprocess.run(["git", "show", f"{base}:{name}"], cwd=ROOT, check=True, capture_output=True).stdout
        (package / Path(name).name).write_bytes(source)
    return folder


def old_revision() -> str:
    """The commit before append-only collections came (the parent of the one adding chunk_log.py)."""
    added = subprocess.run(
        ["git", "log", "--format=%H", "--diff-filter=A", "--", "services/retrieval/src/retrieval/chunk_log.py"],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    if not added:
        raise SystemExit("no commit adds chunk_log.py: pass --base")
    return f"{added[-1]}^"


def arm(label: str, jobs: int, files: tuple[Path, Path], python_path: Path | None, check: bool) -> dict[str, Any]:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if python_path is not None:
        env["PYTHONPATH"] = f"{python_path}{os.pathsep}{env.get('PYTHONPATH', '')}"
    command = [sys.executable, __file__, "--arm", "--jobs", str(jobs), "--input", str(files[0])]
    command += ["--vectors", str(files[1])] + (["--check"] if check else [])
    print(f"  running {label} ...", file=sys.stderr, flush=True)
    done = subprocess.run(command, env=env, check=True, capture_output=True, text=True)
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def by_size(per_job: list[list[float]], buckets: int = 5) -> list[tuple[int, float]]:
    """(collection size after the job, median job ms) for `buckets` stretches of the run."""
    step = max(1, len(per_job) // buckets)
    out = []
    for begin in range(0, len(per_job), step):
        part = per_job[begin : begin + step]
        out.append((int(part[-1][0]), statistics.median(t for _, t in part) * 1000))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=100)
    parser.add_argument("--limit", type=int, default=0, help="only the first N documents")
    parser.add_argument(
        "--base",
        default="",
        help="git revision of the old code (default: the parent of the commit adding chunk_log.py)",
    )
    parser.add_argument("--no-old", action="store_true", help="skip the old code's arms")
    parser.add_argument("--arm", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--input", help=argparse.SUPPRESS)
    parser.add_argument("--vectors", help=argparse.SUPPRESS)
    parser.add_argument("--check", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.arm:
        payload = json.loads(Path(args.input).read_text())
        print(json.dumps(asyncio.run(run_arm(args, payload, np.load(args.vectors)))))
        return

    chunks, queries = load_chunks(args.limit or None)
    work = Path(tempfile.mkdtemp(prefix="ingest-bench-"))
    files = (work / "input.json", work / "vectors.npy")
    files[0].write_text(json.dumps({"chunks": chunks, "queries": queries}))
    vectors = unit_vectors(len(chunks))
    np.save(files[1], vectors)
    documents = len({c["document_id"] for c in chunks})
    print(
        f"SciFact: {documents} documents, {len(chunks)} chunks, {args.jobs} jobs of ~{documents / args.jobs:.0f} docs"
    )
    print(f"vectors: random unit ({vectors.shape[1]} dims); embedding left out (O(job), the same in every arm)\n")

    runs: dict[str, dict[str, Any]] = {}
    runs["ours, 1 job"] = arm("ours, 1 job", 1, files, None, False)
    runs[f"ours, {args.jobs} jobs"] = arm(f"ours, {args.jobs} jobs", args.jobs, files, None, True)
    if not args.no_old:
        base = args.base or old_revision()
        old = old_code(base)
        runs["old, 1 job"] = arm("old, 1 job", 1, files, old, False)
        runs[f"old, {args.jobs} jobs"] = arm(f"old, {args.jobs} jobs", args.jobs, files, old, False)
        print(f"old code: {base[:12]}\n")

    print("| code | arm | wall s | x one job | CPU s | x one job |")
    print("|---|---|---|---|---|---|")
    for label, run in runs.items():
        code, what = label.split(", ")
        one = runs[f"{code}, 1 job"]
        print(
            f"| {code} | {what} | {run['total']:.2f} | {run['total'] / one['total']:.2f}x "
            f"| {run['cpu']:.2f} | {run['cpu'] / one['cpu']:.2f}x |"
        )
    ours, one = runs[f"ours, {args.jobs} jobs"], runs["ours, 1 job"]
    for what in ("total", "cpu"):
        ratio = ours[what] / one[what]
        verdict = "met" if ratio <= 1.3 else "NOT met"
        print(
            f"\ntarget ({'wall' if what == 'total' else 'CPU'}): {args.jobs} jobs <= 1.3x one job: "
            f"{ratio:.2f}x -> {verdict}"
        )
    print("(wall time includes two fsyncs per job: on a shared disk each costs what the other tenants make it)\n")

    print("per-job ms (median over a fifth of the run) against the collection's size after the job:")
    print("| chunks | " + " | ".join(k for k in runs if not k.endswith("1 job")) + " |")
    print("|---|" + "---|" * sum(1 for k in runs if not k.endswith("1 job")))
    series = [by_size(run["per_job"]) for k, run in runs.items() if not k.endswith("1 job")]
    for row in zip(*series, strict=False):
        print(f"| {row[0][0]} | " + " | ".join(f"{ms:.1f}" for _, ms in row) + " |")

    checks = runs[f"ours, {args.jobs} jobs"].get("identical", {})
    print(
        "\nsearch results after the jobs, bit-identical (positions, scores; "
        f"{len(queries)} sparse + 50 dense queries) to:"
    )
    for name, same in checks.items():
        print(f"  {name}: {'yes' if same else 'NO'}")
    if not args.no_old:
        ours = runs[f"ours, {args.jobs} jobs"]["sparse_top10"]
        theirs = runs[f"old, {args.jobs} jobs"]["sparse_top10"]
        overlap = [len(set(a) & set(b)) / max(1, len(b)) for a, b in zip(ours, theirs, strict=True) if b]
        same_order = sum(a == b for a, b in zip(ours, theirs, strict=True))
        print(
            f"  sparse top 10 against the old code's bm25s: {statistics.mean(overlap):.1%} overlap, "
            f"{same_order}/{len(ours)} queries in the same order"
        )


if __name__ == "__main__":
    main()
