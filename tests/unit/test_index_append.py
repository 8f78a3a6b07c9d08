"""Append-only collections: a job costs O(job), and search results equal a full rebuild's.

Compared bit for bit (positions and float scores) with `Snapshot.build` over the
same chunks: after many jobs, after a restart (save + load), on a replica that
copied the collection (ExportCollection's parts imported), after a crash
mid-append, and once an HNSW graph is built over part of the rows.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import numpy as np
import pytest

from retrieval import index_files
from retrieval.catchup import export_parts, import_parts
from retrieval.chunk_log import ChunkRecord
from retrieval.index import IndexParams, Meta, Snapshot, bm25_tokens, embedding_text
from retrieval.settings import RetrievalSettings
from retrieval.store import CollectionStore

PARAMS = IndexParams(hnsw_threshold=10_000, hnsw_m=16, hnsw_ef_construction=40, hnsw_ef_search=64)
WORDS = [f"w{i}" for i in range(300)] + ["protein", "cell", "cancer", "gene", "virus", "immune", "dose", "risk"]
DIMS = 16


def corpus(docs: int, seed: int) -> tuple[list[ChunkRecord], np.ndarray]:
    """`docs` documents of 1-3 chunks of Zipf-ish random words, and unit vectors."""
    rng = np.random.default_rng(seed)
    texts, owners = [], []
    for d in range(docs):
        for _ in range(int(rng.integers(1, 4))):
            picks = np.minimum(rng.zipf(1.3, int(rng.integers(5, 40))) - 1, len(WORDS) - 1)
            texts.append(" ".join(WORDS[i] for i in picks))
            owners.append(f"doc{seed}-{d}")
    # Tokens of the title and the text, as ingestion (and a catch-up copy) makes them.
    tokens = bm25_tokens([embedding_text(f"t{owner}", text) for owner, text in zip(owners, texts, strict=True)])
    chunks = [
        ChunkRecord(f"{owner}#{i}", owner, f"t{owner}", text, {"i": i}, toks)
        for i, (owner, text, toks) in enumerate(zip(owners, texts, tokens, strict=True))
    ]
    v = rng.standard_normal((len(chunks), DIMS)).astype(np.float32)
    return chunks, v / np.linalg.norm(v, axis=1, keepdims=True)


def jobs(count: int, docs: int) -> list[tuple[list[ChunkRecord], np.ndarray]]:
    return [corpus(docs, seed) for seed in range(count)]


def incremental(parts: list[tuple[list[ChunkRecord], np.ndarray]]) -> Snapshot:
    snap = Snapshot(Meta(name="c", id="id1", created=1))
    for i, (chunks, vectors) in enumerate(parts):
        snap = snap.with_chunks(chunks, vectors, PARAMS, version=i + 1, job_id=f"j{i}")
    return snap


def rebuilt(parts: list[tuple[list[ChunkRecord], np.ndarray]], meta: Meta) -> Snapshot:
    chunks = [c for part, _ in parts for c in part]
    return Snapshot.build(meta, chunks, np.concatenate([v for _, v in parts]))


QUERIES = ["protein cell", "cancer risk dose", "w1 w2 w3", "w0", "gene virus immune w7 w7", "unknownword", "w250"]


def results(snap: Snapshot) -> list[object]:
    rng = np.random.default_rng(99)
    out: list[object] = []
    for query in QUERIES:
        out.append(snap.sparse(bm25_tokens([query])[0], 20))
    for _ in range(10):
        q = rng.standard_normal(DIMS).astype(np.float32)
        out.append(snap.dense(q / np.linalg.norm(q), 20))
    out.append([(c.chunk_id, c.document_id) for c in snap.chunks])
    return out


def test_many_jobs_search_exactly_like_one_rebuild() -> None:
    parts = jobs(30, 8)
    snap = incremental(parts)
    full = rebuilt(parts, snap.meta)
    assert results(snap) == results(full)
    assert snap.documents == full.documents == 240
    assert snap.total_length == full.total_length
    assert any(results(snap)[: len(QUERIES)])  # the queries do match something


def test_an_older_snapshot_still_searches_what_it_saw() -> None:
    parts = jobs(6, 5)
    old = incremental(parts[:3])
    before = results(old)
    new = old
    for i, (chunks, vectors) in enumerate(parts[3:]):
        new = new.with_chunks(chunks, vectors, PARAMS, version=10 + i, job_id=f"n{i}")
    assert new.log is old.log  # shared, not copied
    assert results(old) == before == results(rebuilt(parts[:3], old.meta))
    # A change from the older snapshot again branches off; both stay right.
    branch = old.with_chunks(*parts[5], PARAMS, version=20, job_id="b")
    assert branch.log is not old.log
    assert results(branch) == results(rebuilt([*parts[:3], parts[5]], branch.meta))
    assert results(new) == results(rebuilt(parts, new.meta))


def test_replacing_a_document_equals_a_rebuild_of_what_is_left() -> None:
    parts = jobs(5, 6)
    snap = incremental(parts)
    again = parts[2][0][:2]
    vectors = parts[2][1][:2][::-1].copy()
    renamed = [ChunkRecord(c.chunk_id + "v2", c.document_id, c.title, c.text, c.metadata, c.tokens) for c in again]
    snap = snap.with_chunks(renamed, vectors, PARAMS, version=9, job_id="r")
    gone = {c.document_id for c in renamed}
    kept = [(c, v) for chunks, vs in parts for c, v in zip(chunks, vs, strict=True) if c.document_id not in gone]
    full = Snapshot.build(
        snap.meta, [c for c, _ in kept] + renamed, np.concatenate([np.array([v for _, v in kept]), vectors])
    )
    assert results(snap) == results(full)


def test_restart_and_catch_up_copy_search_exactly_the_same(tmp_path: Path) -> None:
    parts = jobs(12, 6)
    snap = Snapshot(Meta(name="c", id="id1", created=1)).save(tmp_path / "c")
    for i, (chunks, vectors) in enumerate(parts):
        snap = snap.with_chunks(chunks, vectors, PARAMS, version=i + 1, job_id=f"j{i}").save(tmp_path / "c")
    expected = results(rebuilt(parts, snap.meta))
    loaded = Snapshot.load(tmp_path / "c", PARAMS)
    assert loaded is not None and loaded.meta == snap.meta
    assert results(loaded) == results(snap) == expected

    class Store:
        params = PARAMS

    export = export_parts(snap)
    copy = import_parts(export[0].state, [p.chunks for p in export[1:]], Store())  # type: ignore[arg-type]
    assert copy.meta == snap.meta
    assert results(copy) == expected
    # The restarted copy goes on appending where it stopped.
    more = corpus(4, 77)
    after = loaded.with_chunks(*more, PARAMS, version=50, job_id="m").save(tmp_path / "c")
    again = Snapshot.load(tmp_path / "c", PARAMS)
    assert again is not None and results(again) == results(after) == results(rebuilt([*parts, more], after.meta))


def test_a_job_appends_to_the_files(tmp_path: Path) -> None:
    snap = Snapshot(Meta(name="c", id="id1", created=1)).save(tmp_path / "c")
    assert snap.saved is not None
    folder = tmp_path / "c" / snap.saved.generation
    sizes = []
    for i, (chunks, vectors) in enumerate(jobs(4, 5)):
        before = (folder / "chunks.jsonl").read_bytes()
        snap = snap.with_chunks(chunks, vectors, PARAMS, version=i + 1, job_id=f"j{i}").save(tmp_path / "c")
        after = (folder / "chunks.jsonl").read_bytes()
        assert after.startswith(before)  # earlier rows untouched
        sizes.append((folder / "vectors.f32").stat().st_size)
    assert sizes[-1] == snap.n * DIMS * 4
    assert snap.saved is not None and snap.saved.generation == folder.name


def test_a_crash_mid_append_leaves_the_previous_state(tmp_path: Path) -> None:
    parts = jobs(3, 5)
    snap = incremental(parts[:2]).save(tmp_path / "c")
    assert snap.saved is not None
    folder = tmp_path / "c" / snap.saved.generation
    # Killed after writing rows, before their commit line:
    whole_line = json.dumps(parts[2][0][0].to_json()).encode() + b"\n"
    with open(folder / "chunks.jsonl", "ab") as out:
        out.write(whole_line + b'{"half a line')
    with open(folder / "vectors.f32", "ab") as out:
        out.write(b"\x00" * 10)
    loaded = Snapshot.load(tmp_path / "c", PARAMS)
    assert loaded is not None and results(loaded) == results(snap) and loaded.meta == snap.meta
    # The next append cuts the leftovers off first.
    after = loaded.with_chunks(*parts[2], PARAMS, version=3, job_id="j2").save(tmp_path / "c")
    again = Snapshot.load(tmp_path / "c", PARAMS)
    assert again is not None and results(again) == results(after) == results(rebuilt(parts, after.meta))


def test_the_layout_before_generations_still_loads(tmp_path: Path) -> None:
    chunks, vectors = corpus(5, 3)
    folder = tmp_path / "c" / "v4"
    folder.mkdir(parents=True)
    meta = Meta(name="c", id="id1", created=1, version=4, applied_jobs=("a",), dimensions=DIMS)
    (folder / "meta.json").write_text(json.dumps(meta.to_json()))
    (folder / "chunks.jsonl").write_text("".join(json.dumps(c.to_json()) + "\n" for c in chunks))
    np.save(folder / "vectors.npy", vectors)
    (tmp_path / "c" / "CURRENT").write_text("v4")
    loaded = Snapshot.load(tmp_path / "c", PARAMS)
    assert loaded is not None and loaded.meta == meta
    assert results(loaded) == results(Snapshot.build(meta, chunks, vectors))
    saved = loaded.with_chunks(*corpus(2, 4), PARAMS, version=5, job_id="b").save(tmp_path / "c")
    assert saved.saved is not None
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == ["CURRENT", saved.saved.generation]


def test_hnsw_over_the_first_rows_plus_the_exact_tail(tmp_path: Path) -> None:
    small = IndexParams(hnsw_threshold=50, hnsw_m=16, hnsw_ef_construction=80, hnsw_ef_search=200)
    parts = jobs(20, 5)
    snap = incremental(parts[:12]).save(tmp_path / "c")
    assert snap.needs_hnsw(small)
    base = snap.build_hnsw(small)
    assert index_files.save_hnsw(snap, base, tmp_path / "c")
    snap = snap.with_hnsw(base, saved_rows=base.rows).save(tmp_path / "c")
    for i, (chunks, vectors) in enumerate(parts[12:]):
        snap = snap.with_chunks(chunks, vectors, PARAMS, version=100 + i, job_id=f"t{i}").save(tmp_path / "c")
    assert snap.hnsw is not None and snap.hnsw.rows == base.rows < snap.n
    # Every row is found by its own vector: graph rows through HNSW, newer rows exactly.
    for row in range(0, snap.n, 7):
        assert snap.dense(snap.vectors[row], 1)[0][0] == row
    loaded = Snapshot.load(tmp_path / "c", small)
    assert loaded is not None and loaded.hnsw is not None and loaded.hnsw.rows == base.rows
    assert results(loaded) == results(snap)
    # Once the graph is rebuilt over every row, it equals a full rebuild's graph.
    full = rebuilt(parts, snap.meta)
    assert results(snap.with_hnsw(snap.build_hnsw(small))) == results(full.with_hnsw(full.build_hnsw(small)))


async def test_a_jobs_save_writes_only_its_own_chunks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The cost of a job does not grow with the collection: its save serializes its own chunks.

    (Before append-only files every job rewrote every chunk of the collection.)"""
    written: list[int] = []
    original = ChunkRecord.to_json

    def counted(self: ChunkRecord) -> dict[str, object]:
        written[-1] += 1
        return original(self)

    monkeypatch.setattr(ChunkRecord, "to_json", counted)
    store = CollectionStore(RetrievalSettings(data_dir=str(tmp_path), replica_id="r1"), None)
    snap = await store.ensure_local("c", "id1", 1)
    assert snap is not None
    sizes = []
    for i, (chunks, vectors) in enumerate(jobs(8, 6)):
        written.append(0)
        snap = await store.add_chunks(snap, chunks, vectors, version=i + 1, job_id=f"j{i}")
        sizes.append(len(chunks))
    assert written == sizes
    assert store.local("c") is snap
    await store.close()


def test_bm25_tokens_are_bm25s_tokens() -> None:
    import bm25s
    import Stemmer

    texts = [
        "The Cells were DIVIDING rapidly; mitochondria's role (in vivo) is unclear.",
        "",
        "!! ?? a",
        "the and of",
        "Naïve Bayes über-fast 2024 results: p<0.05, IL-6 and TNF-α levels",
        "running runs ran runner's",
    ]
    expected = bm25s.tokenize(
        texts, stopwords="en", stemmer=Stemmer.Stemmer("english"), return_ids=False, show_progress=False
    )
    assert bm25_tokens(texts) == expected
    assert bm25_tokens(texts) == expected  # stems remembered from the first call
    assert [bm25_tokens([t])[0] for t in texts] == expected  # one text at a time


async def test_the_store_builds_the_graph_in_the_background_and_keeps_it(tmp_path: Path) -> None:
    settings = RetrievalSettings(data_dir=str(tmp_path), replica_id="r1", hnsw_threshold=40, hnsw_m=16)
    store = CollectionStore(settings, None)
    snap = await store.ensure_local("c", "id1", 1)
    assert snap is not None
    parts = jobs(12, 5)
    crossed: Snapshot | None = None
    for i, (chunks, vectors) in enumerate(parts):
        async with store.lock("c"):  # as the ingest consumer: the live snapshot, under the lock
            live = store.local("c")
            assert live is not None
            snap = await store.add_chunks(live, chunks, vectors, version=i + 1, job_id=f"j{i}")
        if snap.n > 40 and crossed is None:
            crossed = snap
        await asyncio.sleep(0)
    assert crossed is not None and crossed.hnsw is None
    # Built between jobs, by the store: a job never builds one (the one that crossed did not).
    await store.hnsw.idle()
    live = store.local("c")
    assert live is not None and live.hnsw is not None and 40 < live.hnsw.rows <= live.n == snap.n
    assert live.index_type == "hnsw" and live.meta == snap.meta
    # Saved with the collection: a restart loads the graph instead of building it.
    reloaded = CollectionStore(settings, None)
    await asyncio.to_thread(reloaded.load_all)
    loaded = reloaded.local("c")
    assert loaded is not None and loaded.hnsw is not None and loaded.hnsw.rows == live.hnsw.rows
    assert loaded.meta == live.meta
    assert results(loaded) == results(live)
    # A job after it appends as before; the graph stays and the new rows are searched exactly.
    more = corpus(3, 55)
    async with store.lock("c"):
        after = await store.add_chunks(live, *more, version=50, job_id="m")
    assert after.hnsw is live.hnsw and after.n > live.n
    assert after.dense(after.vectors[-1], 1)[0][0] == after.n - 1
    await store.close()
    await reloaded.close()


async def test_a_graph_built_for_a_deleted_collection_is_dropped(tmp_path: Path) -> None:
    settings = RetrievalSettings(data_dir=str(tmp_path), replica_id="r1", hnsw_threshold=10, hnsw_m=16)
    store = CollectionStore(settings, None)
    snap = await store.ensure_local("c", "id1", 1)
    assert snap is not None
    snap = await store.add_chunks(snap, *corpus(10, 1), version=1, job_id="j")
    base = snap.build_hnsw(store.params)
    store._forget("c", "id1")  # deleted while the graph was built
    assert not await store.adopt_hnsw("c", snap, base)
    assert store.local("c") is None
    await store.close()
