"""Collection snapshots: adding, replacing, searching, saving and loading."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from retrieval.index import ChunkRecord, IndexParams, Meta, Snapshot, bm25_tokens, top_scores

PARAMS = IndexParams(hnsw_threshold=1000, hnsw_m=16, hnsw_ef_construction=40, hnsw_ef_search=64)


def records(doc: str, texts: list[str]) -> list[ChunkRecord]:
    return [
        ChunkRecord(f"{doc}#{i}", doc, f"title {doc}", text, {"doc": doc}, tokens)
        for i, (text, tokens) in enumerate(zip(texts, bm25_tokens(texts), strict=True))
    ]


def unit_vectors(n: int, seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal((n, 8)).astype(np.float32)
    unit: np.ndarray = v / np.linalg.norm(v, axis=1, keepdims=True)
    return unit


@pytest.fixture
def empty() -> Snapshot:
    return Snapshot(Meta(name="c", id="id1", created=1))


def test_add_then_dense_and_sparse_search(empty: Snapshot) -> None:
    vectors = unit_vectors(3, 0)
    snap = empty.with_chunks(
        records("a", ["cats purr softly", "dogs bark loudly", "rockets reach orbit"]),
        vectors,
        PARAMS,
        version=1,
        job_id="j1",
    )
    assert snap.meta.version == 1 and snap.meta.applied_jobs == ("j1",)
    position, score = snap.dense(vectors[2], 2)[0]
    assert position == 2 and score == pytest.approx(1.0, abs=1e-5)
    sparse = snap.sparse(bm25_tokens(["barking dogs"])[0], 3)
    assert [p for p, _ in sparse] == [1]  # only the chunk sharing a term
    assert snap.sparse(bm25_tokens(["zebra"])[0], 3) == []


def test_same_document_again_replaces_its_chunks(empty: Snapshot) -> None:
    snap = empty.with_chunks(
        records("a", ["one", "two"]) + records("b", ["three"]), unit_vectors(3, 1), PARAMS, version=1, job_id="j1"
    )
    snap = snap.with_chunks(records("a", ["new text"]), unit_vectors(1, 2), PARAMS, version=2, job_id="j2")
    assert sorted(c.text for c in snap.chunks) == ["new text", "three"]
    assert len(snap.vectors) == 2 and len(snap.chunks) == 2
    assert snap.documents == 2


def test_hnsw_past_the_threshold(empty: Snapshot) -> None:
    small = IndexParams(hnsw_threshold=10, hnsw_m=8, hnsw_ef_construction=40, hnsw_ef_search=64)
    snap = empty.with_chunks(
        records("a", [f"t{i}" for i in range(8)]), unit_vectors(8, 3), small, version=1, job_id="j1"
    )
    assert snap.index_type == "flat" and not snap.needs_hnsw(small)
    snap = snap.with_chunks(
        records("b", [f"u{i}" for i in range(8)]), unit_vectors(8, 4), small, version=2, job_id="j2"
    )
    # Past the threshold the graph is built in the background (the store's HnswBuilder), not by the job.
    assert snap.index_type == "flat" and snap.needs_hnsw(small)
    snap = snap.with_hnsw(snap.build_hnsw(small))
    assert snap.index_type == "hnsw" and snap.hnsw is not None and snap.hnsw.index.ntotal == 16
    assert not snap.needs_hnsw(small)


def test_save_and_load_round_trip(empty: Snapshot, tmp_path: Path) -> None:
    vectors = unit_vectors(2, 5)
    snap = empty.with_chunks(records("a", ["alpha beta", "gamma delta"]), vectors, PARAMS, version=3, job_id="j9")
    snap = snap.save(tmp_path / "c")
    loaded = Snapshot.load(tmp_path / "c", PARAMS)
    assert loaded is not None
    assert loaded.meta == snap.meta and loaded.saved == snap.saved
    assert loaded.chunks == snap.chunks
    assert np.array_equal(loaded.vectors, snap.vectors)
    assert loaded.dense(vectors[1], 1)[0][0] == 1
    assert [p for p, _ in loaded.sparse(bm25_tokens(["gamma"])[0], 2)] == [1]
    # Only the live generation is left on disk.
    assert snap.saved is not None
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == ["CURRENT", snap.saved.generation]


def test_a_folder_without_current_loads_as_nothing(tmp_path: Path) -> None:
    (tmp_path / "c" / ".tmp-v1-1").mkdir(parents=True)
    assert Snapshot.load(tmp_path / "c", PARAMS) is None


def test_top_scores_is_the_full_sorts_head() -> None:
    rng = np.random.default_rng(7)
    for trial in range(200):
        n = int(rng.integers(1, 400))
        # Few distinct values: many ties, zeros (no shared term) left out.
        scores = rng.integers(0, 6, n).astype(np.float64) * rng.choice([1.0, 0.37], n)
        k = int(rng.integers(1, 50))
        positive = np.flatnonzero(scores > 0)
        full = np.lexsort((positive, -scores[positive]))[:k]  # the order every score sorted gives
        expected = [(int(positive[i]), float(scores[positive[i]])) for i in full]
        assert top_scores(scores, k) == expected, trial
