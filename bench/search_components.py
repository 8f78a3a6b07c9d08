"""Where a hybrid search's time goes inside retrieval, step by step, in this process (no mesh).

Builds SciFact's snapshot the way ingestion does (preprocess's chunker, BM25
tokens; the vectors are random unit vectors: FAISS's cost does not depend on
their values) and times, per train query, one at a time on one thread:

- the query embedding: SentenceTransformer.encode (the old path) beside the
  direct path (retrieval.embedder.forward), same model, same thread count, and
  ONNX Runtime (retrieval.onnx_query) when the graph is in its cache (`make onnx`);
- BM25 tokens of the query, dense search (FAISS exact inner product), sparse
  search (BM25 scored from the postings, then the top: the full sort of the old
  code beside the partial selection), fusion (RRF), result shaping (hit dicts,
  then the gRPC response with its Struct metadata, serialised).

Usage:
    .venv/bin/python bench/search_components.py [--queries 300]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("RAGMESH_SHARED_DATA", ROOT.parent / "shared" / "data")) / "scifact"


def timed(label: str, queries: list[str], step: Callable[[int, str], object]) -> tuple[str, float, float]:
    for i, query in enumerate(queries[:10]):  # first-call allocations
        step(i, query)
    seconds = []
    for i, query in enumerate(queries):
        started = time.perf_counter()
        step(i, query)
        seconds.append(time.perf_counter() - started)
    ordered = sorted(seconds)
    return label, statistics.median(seconds) * 1000, ordered[int(0.99 * (len(ordered) - 1))] * 1000


def old_sparse_top(scores: np.ndarray, k: int) -> list[tuple[int, float]]:
    """The code before: every positive score sorted."""
    positive = np.flatnonzero(scores > 0)
    order = np.lexsort((positive, -scores[positive]))[:k]
    return [(int(positive[i]), float(scores[positive[i]])) for i in order]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--queries", type=int, default=300)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import torch
    from sentence_transformers import SentenceTransformer

    from preprocess.documents import Chunker, clean_text, load_tokenizer
    from preprocess.settings import PreprocessSettings
    from ragmesh.v1 import retrieval_pb2
    from retrieval.embedder import forward, model_path
    from retrieval.index import ChunkRecord, Meta, Snapshot, bm25_tokens, embedding_text, top_scores
    from retrieval.onnx_query import OnnxQueryEncoder, default_cache_dir, graph_path
    from retrieval.search import _hit_dict, rrf
    from retrieval.servicer import add_hits
    from retrieval.settings import RetrievalSettings

    settings, pre = RetrievalSettings(), PreprocessSettings()
    torch.set_num_threads(settings.torch_threads)
    chunker = Chunker(load_tokenizer(), pre.chunk_tokens, pre.chunk_overlap)
    corpus = [json.loads(line) for line in (DATA / "corpus.jsonl").read_text(encoding="utf-8").splitlines()]
    chunks = [c for d in corpus for c in chunker.chunk(d["_id"], clean_text(d["title"]), clean_text(d["text"]), {})]
    tokens = bm25_tokens([embedding_text(c.title, c.text) for c in chunks])
    records = [
        ChunkRecord(c.chunk_id, c.document_id, c.title, c.text, dict(c.metadata), t)
        for c, t in zip(chunks, tokens, strict=True)
    ]
    model = SentenceTransformer(model_path(settings), device="cpu")
    dims = int(model.get_embedding_dimension() or 0)
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((len(records), dims)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    snapshot = Snapshot.build(Meta("bench", "bench", 0), records, vectors)
    lines = (DATA / "queries.train.jsonl").read_text(encoding="utf-8").splitlines()[: args.queries]
    queries = [json.loads(line)["text"] for line in lines]
    k = max(10, settings.fusion_candidates)

    graph = graph_path(model_path(settings), settings.onnx_cache_dir or default_cache_dir())
    onnx = OnnxQueryEncoder(graph, model.tokenizer, int(model.max_seq_length or 256)) if graph.is_file() else None
    query_vectors = [forward(model, [q])[0] for q in queries]
    query_tokens = bm25_tokens(queries)
    dense = [snapshot.dense(v, k) for v in query_vectors]
    log = snapshot.log
    assert log is not None
    bm25 = [log.bm25(t, snapshot.n, snapshot.total_length) for t in query_tokens]
    sparse = [top_scores(s, k) for s in bm25]
    fused = [
        rrf([(d, settings.dense_weight), (s, settings.sparse_weight)], settings.rrf_k, 10)
        for d, s in zip(dense, sparse, strict=True)
    ]
    shaped = [[_hit_dict(snapshot, h) for h in hits] for hits in fused]

    def response(i: int, _: str) -> bytes:
        reply = retrieval_pb2.SearchResponse()
        add_hits(reply, shaped[i])
        return reply.SerializeToString()

    rows = [
        timed(
            "query embedding: SentenceTransformer.encode (before)",
            queries,
            lambda i, q: model.encode([q], normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False),
        ),
        timed("query embedding: torch, direct forward", queries, lambda i, q: forward(model, [q])),
        *([timed("query embedding: ONNX Runtime (now)", queries, lambda i, q: onnx([q]))] if onnx else []),
        timed("BM25 tokens of the query", queries, lambda i, q: bm25_tokens([q])),
        timed(f"dense: FAISS exact, top {k}", queries, lambda i, q: snapshot.dense(query_vectors[i], k)),
        timed(
            "sparse: BM25 scores from the postings",
            queries,
            lambda i, q: log.bm25(query_tokens[i], snapshot.n, snapshot.total_length),
        ),
        timed(f"sparse: top {k}, full sort (before)", queries, lambda i, q: old_sparse_top(bm25[i], k)),
        timed(f"sparse: top {k}, partial selection (now)", queries, lambda i, q: top_scores(bm25[i], k)),
        timed("fusion (RRF), top 10", queries, lambda i, q: rrf([(dense[i], 0.5), (sparse[i], 0.5)], 60, 10)),
        timed("result shaping: hit dicts", queries, lambda i, q: [_hit_dict(snapshot, h) for h in fused[i]]),
        timed("result shaping: gRPC response, serialised", queries, response),
    ]
    same = all(old_sparse_top(s, k) == top_scores(s, k) for s in bm25)
    print(f"\nSciFact: {len(records)} chunks, {dims} dimensions, {len(queries)} train queries, one thread\n")
    print("| step | p50 ms | p99 ms |")
    print("|---|---|---|")
    for label, p50, p99 in rows:
        print(f"| {label} | {p50:.3f} | {p99:.3f} |")
    print(f"\nsparse top {k}: partial selection == full sort for every query: {same}")
    diffs = [
        float(np.abs(forward(model, [q]) - model.encode([q], normalize_embeddings=True, convert_to_numpy=True)).max())
        for q in queries
    ]
    print(f"direct forward vs encode: largest difference of a vector component {max(diffs):.2e}")
    if onnx is not None:
        worst = max(float(np.abs(onnx([q]) - forward(model, [q])).max()) for q in queries)
        print(f"ONNX Runtime vs torch: largest difference of a vector component {worst:.2e}")
    else:
        print(f"no ONNX graph at {graph} (make onnx): its row is left out")


if __name__ == "__main__":
    main()
