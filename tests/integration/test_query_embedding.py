"""The query embedding's direct path against sentence-transformers' encode, on the real model.

The interactive lane embeds a few texts by running the model's own modules
(retrieval.embedder.forward) instead of SentenceTransformer.encode: the vectors
must be encode's (within float tolerance), and searches must rank and score as
with encode's vectors.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from retrieval import embedder as embedder_module
from retrieval.embedder import Embedder, forward
from retrieval.index import ChunkRecord, Meta, Snapshot, bm25_tokens, embedding_text
from retrieval.search import Searcher
from retrieval.settings import RetrievalSettings
from retrieval.store import SearchView

from .retrieval_harness import CORPUS

DATA = Path(os.environ.get("RAGMESH_SHARED_DATA", Path(__file__).resolve().parents[3] / "shared" / "data"))
SCIFACT = DATA / "scifact"

EDGE_CASES = [
    "  leading and trailing spaces  ",
    "x",
    "Ünïcödé, emoji 🧬 and CJK 蛋白质",
    "word " * 400,  # past max_seq_length: truncated the same way
    "What is the role of p53 in apoptosis?",
]


def sample_queries(count: int) -> list[str]:
    """SciFact train queries when the data is there, else a few written here."""
    path = SCIFACT / "queries.train.jsonl"
    if path.is_file():
        lines = path.read_text(encoding="utf-8").splitlines()[:count]
        return [json.loads(line)["text"] for line in lines]
    return ["does aspirin affect memory?", "does sleep affect mood?", "does diet affect t cells?"]


@pytest.fixture(scope="module")
def embedder() -> Iterator[Embedder]:
    loaded = Embedder(RetrievalSettings(query_backend="torch"), None)  # torch's direct path is under test
    loaded.load()
    yield loaded
    loaded.close()


def model_of(embedder: Embedder) -> Any:
    return embedder._models["interactive"]  # the model the lane runs


def test_direct_path_gives_encodes_vectors(embedder: Embedder) -> None:
    model = model_of(embedder)
    for text in [*sample_queries(60), *EDGE_CASES]:
        direct = forward(model, [text])
        reference = model.encode([text], normalize_embeddings=True, convert_to_numpy=True)
        assert direct.dtype == np.float32 and direct.shape == reference.shape
        np.testing.assert_allclose(direct, reference, atol=1e-6, err_msg=text[:60])


def test_direct_path_pads_a_group_like_encode(embedder: Embedder) -> None:
    model = model_of(embedder)
    group = [*EDGE_CASES[:3], *sample_queries(4)][: embedder_module.DIRECT_TEXTS]
    direct = forward(model, group)
    reference = model.encode(group, normalize_embeddings=True, convert_to_numpy=True)
    np.testing.assert_allclose(direct, reference, atol=1e-6)


async def test_embed_takes_the_direct_path_for_a_few_texts(embedder: Embedder, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    real = embedder_module.forward

    def spy(model: Any, texts: list[str]) -> np.ndarray:
        calls.append(len(texts))
        return real(model, texts)

    monkeypatch.setattr(embedder_module, "forward", spy)
    await embedder.embed(["one query"], use_cache=False)
    many = [f"text number {i}" for i in range(embedder_module.DIRECT_TEXTS + 1)]
    await embedder.embed(many, use_cache=False)  # more than a few: encode, sorted into batches
    assert calls == [1]


def corpus_snapshot(embedder: Embedder) -> Snapshot:
    """The harness corpus plus SciFact's first documents (when present), embedded with encode."""
    docs = [(doc_id, title, text) for doc_id, title, text in CORPUS]
    path = SCIFACT / "corpus.jsonl"
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines()[:150]:
            raw = json.loads(line)
            docs.append((raw["_id"], raw.get("title", ""), raw["text"]))
    texts = [embedding_text(title, text) for _, title, text in docs]
    records = [
        ChunkRecord(f"{doc_id}#0", doc_id, title, text, {"n": i}, tokens)
        for i, ((doc_id, title, text), tokens) in enumerate(zip(docs, bm25_tokens(texts), strict=True))
    ]
    vectors = model_of(embedder).encode(texts, batch_size=64, normalize_embeddings=True, convert_to_numpy=True)
    return Snapshot.build(Meta(name="c", id="id", created=1), records, np.asarray(vectors, dtype=np.float32))


async def test_searches_rank_and_score_as_with_encode(embedder: Embedder, monkeypatch: pytest.MonkeyPatch) -> None:
    view = SearchView(corpus_snapshot(embedder), None)
    searcher = Searcher(RetrievalSettings(), embedder, None)
    queries = [*sample_queries(40), "solar power", "  cats and dogs  "]
    modes = ("hybrid", "dense", "sparse")
    direct = {(q, m): (await searcher.search(view, q, m, 10, False))[0] for q in queries for m in modes}
    monkeypatch.setattr(embedder_module, "DIRECT_TEXTS", 0)  # every text through encode: the old path
    for (query, mode), hits in direct.items():
        reference, _ = await searcher.search(view, query, mode, 10, False)
        assert [h["chunk_id"] for h in hits] == [h["chunk_id"] for h in reference], (query, mode)
        assert [h["score"] for h in hits] == pytest.approx([h["score"] for h in reference], abs=1e-6)
        assert [{k: v for k, v in h.items() if k != "score"} for h in hits] == [
            {k: v for k, v in h.items() if k != "score"} for h in reference
        ]
