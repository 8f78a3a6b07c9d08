"""Scale-out: 1 against 2 replicas of retrieval and inference, and a rollout under load.

In one run, two meshes one after the other (started like `make up`, on ports of
their own), both on the same cores:

- "1 replica":  one inference replica with 2 engine threads, one retrieval
  replica with 2 torch threads;
- "2 replicas": two of each with 1 thread apiece (the same 2 cores in all).

Both run two preprocess and two postprocess replicas. Through the gateway, each
mesh answers: search QPS (`--search-clients` clients, result cache off) and
chat tokens/s (`--streams` streams of `--tokens` tokens, EOS ignored so every
answer is as long). On the 2-replica mesh the bench also reads each replica's
share of the calls from its /metrics, then measures p99 latency of a steady mixed
load (chat and search) for `--steady` seconds, and again while `rollout.py all`
(what `make rollout SERVICE=all` runs) restarts every replica one at a time.

Targets: no failed request during the rollout; rollout p99 <= 2x steady p99.

    .venv/bin/python bench/scale_out.py [--seconds 20] [--steady 40]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
SCIFACT = Path(os.environ.get("RAGMESH_SHARED_DATA", ROOT.parent / "shared" / "data")) / "scifact"
MODEL = "SmolLM2-135M-Instruct"
COLLECTION = "scale-out"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Mesh:
    env: dict[str, str]
    v1: str
    replicas: dict[str, list[dict[str, object]]]

    def metrics(self, service: str, index: int) -> str:
        return httpx.get(f"http://127.0.0.1:{self.replicas[service][index]['http']}/metrics", timeout=10).text


@contextmanager
def mesh(work: Path, replicas: str, threads: int) -> Iterator[Mesh]:
    run_dir = work / f"mesh-{free_port()}"
    env = dict(
        os.environ,
        RAGMESH_RUN_DIR=str(run_dir),
        RAGMESH_NAMESPACE=f"bench-scale-{os.getpid()}-{free_port()}",
        RAGMESH_REPLICAS=replicas,
        RAGMESH_INFERENCE_N_THREADS=str(threads),
        RAGMESH_INFERENCE_N_THREADS_BATCH=str(threads),
        RAGMESH_RETRIEVAL_TORCH_THREADS=str(threads),
        # The per-address flood guard would refuse a benchmark's load from one address.
        RAGMESH_GATEWAY_RATE="100000r/s",
        RAGMESH_GATEWAY_BURST="100000",
        OMP_NUM_THREADS="1",
    )
    # Every port its own, the admin listeners' too (8081 and 8004 belong to `make up`).
    for name in (
        "GATEWAY",
        "GATEWAY_ADMIN",
        "PREPROCESS_HTTP",
        "PREPROCESS_ADMIN",
        "INFERENCE_HTTP",
        "RETRIEVAL_HTTP",
        "POSTPROCESS_HTTP",
        "INFERENCE_GRPC",
        "RETRIEVAL_GRPC",
        "POSTPROCESS_GRPC",
    ):
        env[f"RAGMESH_{name}_PORT"] = str(free_port())
    # Peer addresses follow from the ports above, not from the caller's environment.
    for peer in ("INFERENCE", "RETRIEVAL", "POSTPROCESS"):
        env.pop(f"RAGMESH_PREPROCESS_{peer}_ADDR", None)
    env.pop("RAGMESH_RETRIEVAL_PEERS", None)
    launcher = [sys.executable, str(ROOT / "scripts" / "mesh.py")]
    print(f"starting a mesh: {replicas}, {threads} thread(s) per engine", file=sys.stderr, flush=True)
    subprocess.run([*launcher, "up", "--timeout", "300"], env=env, check=True, stdout=subprocess.DEVNULL)
    try:
        layout = json.loads((run_dir / "mesh.json").read_text())["replicas"]
        yield Mesh(env, f"http://127.0.0.1:{env['RAGMESH_GATEWAY_PORT']}/v1", layout)
    finally:
        subprocess.run([*launcher, "down"], env=env, check=False, stdout=subprocess.DEVNULL)


def corpus(limit: int) -> tuple[list[dict[str, str]], list[str]]:
    """SciFact abstracts and claims when ../shared/data has them, else generated notes."""
    if (SCIFACT / "corpus.jsonl").is_file():
        with open(SCIFACT / "corpus.jsonl") as lines:
            docs = [json.loads(line) for _, line in zip(range(limit), lines, strict=False)]
        with open(SCIFACT / "queries.train.jsonl") as lines:
            queries = [json.loads(line)["text"] for _, line in zip(range(200), lines, strict=False)]
        return [{"id": d["_id"], "title": d["title"], "text": d["text"][:1500]} for d in docs], queries
    topics = ["tides", "volcanoes", "bread", "rockets", "glaciers", "bees", "comets", "rivers"]
    docs = [
        {"id": f"n{i}", "title": topics[i % 8], "text": f"Note {i} about {topics[i % 8]} and {topics[(i * 3) % 8]}."}
        for i in range(limit)
    ]
    return docs, [f"what about {t} and {u}" for t in topics for u in topics]


def seed(m: Mesh, docs: list[dict[str, str]]) -> None:
    with httpx.Client(base_url=m.v1, timeout=120) as http:
        created = http.post("/collections", json={"name": COLLECTION})
        assert created.status_code == 201, f"creating the collection: {created.status_code} {created.text}"
        job = http.post(f"/collections/{COLLECTION}/documents", json={"documents": docs}).json()["job_id"]
        while (status := http.get(f"/jobs/{job}").json()["status"]) not in ("succeeded", "failed"):
            time.sleep(0.5)
        assert status == "succeeded", status
        # Every retrieval replica has it (index.events) before anything is measured.
        for replica in m.replicas["retrieval"]:
            url = f"http://127.0.0.1:{replica['http']}/v1/health/ready"
            while httpx.get(url, timeout=10).status_code != 200:
                time.sleep(0.5)
        while http.get(f"/collections/{COLLECTION}").json().get("chunks", 0) == 0:
            time.sleep(0.5)


@dataclass
class Tally:
    latencies: list[float] = field(default_factory=list)
    tokens: int = 0
    failures: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def ok(self, seconds: float, tokens: int = 0) -> None:
        with self.lock:
            self.latencies.append(seconds)
            self.tokens += tokens

    def failed(self, why: str) -> None:
        with self.lock:
            self.failures.append(why)


def search_once(http: httpx.Client, query: str) -> int:
    reply = http.post("/search", json={"collection": COLLECTION, "query": query, "top_k": 10, "cache": False})
    if reply.status_code != 200 or not reply.json()["results"]:
        raise RuntimeError(f"search: {reply.status_code} {reply.text[:200]}")
    return 0


def chat_once(http: httpx.Client, max_tokens: int) -> int:
    """A streamed answer of exactly max_tokens tokens; the tokens it carried."""
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Tell me about the sea."}],
        "max_tokens": max_tokens,
        "temperature": 0.8,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    usage = None
    with http.stream("POST", "/chat/completions", json=body) as reply:
        if reply.status_code != 200:
            raise RuntimeError(f"chat: {reply.status_code} {reply.read()[:200]!r}")
        for line in reply.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                raise RuntimeError(f"chat stream: {event['error']}")
            usage = event.get("usage") or usage
    if usage is None:
        raise RuntimeError("chat stream ended without its usage chunk")
    return int(usage["completion_tokens"])


def drive(v1: str, clients: int, until: Callable[[], bool], work: Callable[[httpx.Client, int], int]) -> Tally:
    """`clients` threads calling `work` back to back until `until()`; latencies and failures."""
    tally = Tally()

    def loop(index: int) -> None:
        with httpx.Client(base_url=v1, timeout=300) as http:
            n = index
            while not until():
                started = time.perf_counter()
                try:
                    tokens = work(http, n)
                except Exception as exc:  # noqa: BLE001 - counted, the load goes on
                    tally.failed(repr(exc))
                else:
                    tally.ok(time.perf_counter() - started, tokens)
                n += clients

    threads = [threading.Thread(target=loop, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return tally


def for_seconds(seconds: float) -> Callable[[], bool]:
    deadline = time.monotonic() + seconds
    return lambda: time.monotonic() >= deadline


def calls(metrics: str, method: str) -> float:
    pattern = rf'^ragmesh_grpc_server_requests_total\{{[^}}]*method="/ragmesh\.v1\.{method}"[^}}]*\}} (\S+)$'
    return sum(float(v) for v in re.findall(pattern, metrics, re.M))


def shares(m: Mesh, service: str, method: str, before: list[float]) -> list[float]:
    counts = [calls(m.metrics(service, i), method) - before[i] for i in range(len(m.replicas[service]))]
    total = sum(counts) or 1.0
    return [c / total for c in counts]


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] if ordered else float("nan")


@dataclass
class Throughput:
    search_qps: float
    search_p50: float
    tokens_s: float
    failures: int
    retrieval_share: list[float]
    inference_share: list[float]


@dataclass
class Rollout:
    steady_p99: float
    steady_n: int
    steady_failures: int
    rollout_p99: float
    rollout_n: int
    rollout_failures: list[str]
    rc: int
    seconds: float
    log: str


def throughput(m: Mesh, args: argparse.Namespace, queries: list[str]) -> Throughput:
    counted = {
        (s, i): calls(m.metrics(s, i), meth)
        for s, meth in (("retrieval", "Retrieval/Search"), ("inference", "Inference/Generate"))
        for i in range(len(m.replicas[s]))
    }
    searched = drive(
        m.v1, args.search_clients, for_seconds(args.seconds), lambda h, n: search_once(h, queries[n % len(queries)])
    )
    chatted = drive(m.v1, args.streams, for_seconds(args.seconds), lambda h, n: chat_once(h, args.tokens))

    def before(service: str) -> list[float]:
        return [counted[(service, i)] for i in range(len(m.replicas[service]))]

    return Throughput(
        search_qps=len(searched.latencies) / args.seconds,
        search_p50=pct(searched.latencies, 0.5),
        tokens_s=chatted.tokens / args.seconds,
        failures=len(searched.failures) + len(chatted.failures),
        retrieval_share=shares(m, "retrieval", "Retrieval/Search", before("retrieval")),
        inference_share=shares(m, "inference", "Inference/Generate", before("inference")),
    )


def mixed(v1: str, until: Callable[[], bool], queries: list[str]) -> Tally:
    """Steady mixed load: two streamed chats of 16 tokens, two searches, back to back."""
    results: list[Tally] = []

    def part(clients: int, work: Callable[[httpx.Client, int], int]) -> None:
        results.append(drive(v1, clients, until, work))

    threads = [
        threading.Thread(target=part, args=(2, lambda h, n: chat_once(h, 16))),
        threading.Thread(target=part, args=(2, lambda h, n: search_once(h, queries[n % len(queries)]))),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    merged = Tally()
    for tally in results:
        merged.latencies += tally.latencies
        merged.failures += tally.failures
    return merged


def rollout_under_load(m: Mesh, args: argparse.Namespace, queries: list[str]) -> Rollout:
    steady = mixed(m.v1, for_seconds(args.steady), queries)
    done = threading.Event()
    outcome: list[subprocess.CompletedProcess[str]] = []
    started = time.monotonic()

    def roll() -> None:
        run = subprocess.run(
            [sys.executable, str(ROOT / "scripts" / "rollout.py"), "all"],
            env=m.env,
            capture_output=True,
            text=True,
        )
        outcome.append(run)
        done.set()

    roller = threading.Thread(target=roll)
    roller.start()
    during = mixed(m.v1, done.is_set, queries)
    roller.join()
    return Rollout(
        steady_p99=pct(steady.latencies, 0.99),
        steady_n=len(steady.latencies),
        steady_failures=len(steady.failures),
        rollout_p99=pct(during.latencies, 0.99),
        rollout_n=len(during.latencies),
        rollout_failures=during.failures,
        rc=outcome[0].returncode,
        seconds=time.monotonic() - started,
        log=outcome[0].stdout + outcome[0].stderr,
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=20, help="length of each throughput measurement")
    parser.add_argument("--search-clients", type=int, default=8)
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--docs", type=int, default=1000, help="documents in the searched collection")
    parser.add_argument("--steady", type=float, default=40, help="seconds of steady load before the rollout")
    args = parser.parse_args()
    docs, queries = corpus(args.docs)
    cores = os.cpu_count() or 2
    results: dict[str, Throughput] = {}
    roll: Rollout | None = None
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for name, replicas, threads in (
            ("1 replica", "inference=1,retrieval=1,postprocess=2,preprocess=2", 2),
            ("2 replicas", "inference=2,retrieval=2,postprocess=2,preprocess=2", 1),
        ):
            with mesh(work, replicas, threads) as m:
                seed(m, docs)
                results[name] = throughput(m, args, queries)
                if name == "2 replicas":
                    roll = rollout_under_load(m, args, queries)
    assert roll is not None
    one, two = results["1 replica"], results["2 replicas"]
    print()
    print(
        f"through the gateway on {cores} cores; {len(docs)} documents; search: {args.search_clients} clients, "
        f"top_k 10, cache off; chat: {args.streams} streams of {args.tokens} tokens; {args.seconds:g} s each"
    )
    print(f"{'':34} | {'1 replica':>10} | {'2 replicas':>10}")
    print("-" * 61)
    print(f"{'threads per engine (and torch)':34} | {2:>10} | {1:>10}")
    print(f"{'search QPS':34} | {one.search_qps:>10.1f} | {two.search_qps:>10.1f}")
    print(f"{'search p50 ms':34} | {one.search_p50 * 1000:>10.1f} | {two.search_p50 * 1000:>10.1f}")
    print(f"{'chat tokens/s':34} | {one.tokens_s:>10.1f} | {two.tokens_s:>10.1f}")
    print(f"{'failed requests':34} | {one.failures:>10} | {two.failures:>10}")
    for service, share in (("retrieval", two.retrieval_share), ("inference", two.inference_share)):
        print(f"{f'{service} calls per replica':34} | {'100%':>10} | {'/'.join(f'{s:.0%}' for s in share):>10}")
    print()
    ratio = roll.rollout_p99 / roll.steady_p99
    print("mixed load (2 chat streams of 16 tokens, 2 search clients), 2-replica mesh, `rollout all` (8 replicas)")
    print(f"{'':34} | {'requests':>8} | {'failed':>6} | {'p99 ms':>8}")
    print("-" * 64)
    print(f"{'steady':34} | {roll.steady_n:>8} | {roll.steady_failures:>6} | {roll.steady_p99 * 1000:>8.0f}")
    during = f"during rollout all ({roll.seconds:.0f} s)"
    failed = len(roll.rollout_failures)
    print(f"{during:34} | {roll.rollout_n:>8} | {failed:>6} | {roll.rollout_p99 * 1000:>8.0f}")
    print()
    print(f"target: no failed request during the rollout: {failed} -> {'PASS' if not failed else 'FAIL'}")
    print(f"target: rollout p99 <= 2x steady p99: {ratio:.2f}x -> {'PASS' if ratio <= 2 else 'FAIL'}")
    if roll.rc != 0:
        print(f"the rollout itself failed:\n{roll.log}")
    for failure in roll.rollout_failures[:10]:
        print(f"  failed: {failure}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
