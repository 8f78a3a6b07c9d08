"""The query path on ONNX Runtime against torch, on the real model (retrieval.onnx_query).

Searches must rank as with torch's vectors (same top-k, scores within 1e-5) on SciFact
queries; the graph is exported once and reused by the next start; whatever goes wrong
(the export fails, the cached graph is corrupt, the vectors differ, a call fails) torch
serves instead. Faults are injected at the exact point: the exporter, the cached file,
the encoder's call.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from retrieval import embedder as embedder_module
from retrieval import onnx_query
from retrieval.embedder import Embedder, forward, model_path
from retrieval.onnx_query import OnnxQueryEncoder, OnnxRefusedError, QueryGraph, graph_path
from retrieval.search import Searcher
from retrieval.settings import RetrievalSettings
from retrieval.store import SearchView

from .test_query_embedding import EDGE_CASES, corpus_snapshot, sample_queries

WAIT = 600  # seconds the export may take on a loaded machine (about 10 at rest)


def loaded(backend: str, cache_dir: Path | None = None) -> Embedder:
    settings = {"query_backend": backend} | ({"onnx_cache_dir": str(cache_dir)} if cache_dir else {})
    embedder = Embedder(RetrievalSettings.model_validate(settings), None)
    embedder.load()
    return embedder


def graph_file(cache_dir: Path) -> Path:
    return graph_path(model_path(RetrievalSettings()), cache_dir)


class Exports:
    """Counts the exports (the real one, in its child process, unless `fail` says otherwise)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, fail: str = "") -> None:
        self.calls: list[Path] = []
        real = QueryGraph._export_in_child

        def export(graph: QueryGraph, model_dir: str, target: Path) -> None:
            self.calls.append(target)
            if fail:
                raise OnnxRefusedError(fail)
            real(graph, model_dir, target)

        monkeypatch.setattr(QueryGraph, "_export_in_child", export)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("onnx-cache")


@pytest.fixture(scope="module")
def onnx_embedder(cache_dir: Path) -> Iterator[tuple[Embedder, list[Path]]]:
    """An embedder whose graph was exported into an empty cache (the exports it made)."""
    with pytest.MonkeyPatch.context() as patch:
        exports = Exports(patch)
        embedder = loaded("onnx", cache_dir)
        assert embedder.wait_query_backend(WAIT) == "onnx", embedder._graph and embedder._graph.error
    yield embedder, exports.calls
    embedder.close()


@pytest.fixture(scope="module")
def torch_embedder() -> Iterator[Embedder]:
    embedder = loaded("torch")
    yield embedder
    embedder.close()


def test_exported_once_into_the_cache(onnx_embedder: tuple[Embedder, list[Path]], cache_dir: Path) -> None:
    _, exports = onnx_embedder
    assert exports == [graph_file(cache_dir)]
    assert graph_file(cache_dir).is_file()
    assert not list(cache_dir.glob("*.tmp"))  # written aside, then renamed


def test_onnx_vectors_are_torchs(onnx_embedder: tuple[Embedder, list[Path]], torch_embedder: Embedder) -> None:
    embedder, _ = onnx_embedder
    encoder = embedder._onnx
    assert encoder is not None
    model = torch_embedder._models["interactive"]
    texts = [*sample_queries(200), *EDGE_CASES]
    worst = max(float(np.abs(encoder([t]) - forward(model, [t])).max()) for t in texts)
    assert worst <= 1e-5
    group = texts[: embedder_module.DIRECT_TEXTS]  # padded to the longest, as torch pads
    np.testing.assert_allclose(encoder(group), forward(model, group), atol=1e-5)


async def test_searches_rank_and_score_as_with_torch(
    onnx_embedder: tuple[Embedder, list[Path]], torch_embedder: Embedder
) -> None:
    embedder, _ = onnx_embedder
    view = SearchView(corpus_snapshot(torch_embedder), None)  # documents embedded by torch
    ours, theirs = Searcher(RetrievalSettings(), embedder, None), Searcher(RetrievalSettings(), torch_embedder, None)
    for query in [*sample_queries(100), "solar power", "  cats and dogs  "]:
        for mode in ("hybrid", "dense"):
            hits, _ = await ours.search(view, query, mode, 10, False)
            reference, _ = await theirs.search(view, query, mode, 10, False)
            assert [h["chunk_id"] for h in hits] == [h["chunk_id"] for h in reference], (query, mode)
            assert [h["score"] for h in hits] == pytest.approx([h["score"] for h in reference], abs=1e-5)


async def test_the_query_lane_runs_onnx_not_torch(
    onnx_embedder: tuple[Embedder, list[Path]], monkeypatch: pytest.MonkeyPatch
) -> None:
    embedder, _ = onnx_embedder
    calls: list[int] = []
    monkeypatch.setattr(embedder_module, "forward", lambda model, texts: calls.append(len(texts)))
    vectors = await embedder.embed(["a query never seen"], use_cache=False)
    assert vectors.shape == (1, embedder.dimensions) and calls == []


def test_the_cached_graph_is_reused_by_the_next_start(
    onnx_embedder: tuple[Embedder, list[Path]], cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    exports = Exports(monkeypatch, fail="no export expected")
    again = loaded("onnx", cache_dir)
    try:
        assert again.wait_query_backend(WAIT) == "onnx"
        assert exports.calls == []
    finally:
        again.close()


async def test_a_failed_export_leaves_torch_serving(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    exports = Exports(monkeypatch, fail="injected export failure")
    embedder = loaded("onnx", tmp_path)
    try:
        assert embedder.wait_query_backend(WAIT) == "torch"
        assert exports.calls == [graph_file(tmp_path)]
        assert embedder._graph is not None and "injected export failure" in embedder._graph.error
        calls: list[int] = []
        real = embedder_module.forward

        def spy(model: Any, texts: list[str]) -> np.ndarray:
            calls.append(len(texts))
            return real(model, texts)

        monkeypatch.setattr(embedder_module, "forward", spy)
        vectors = await embedder.embed(["does aspirin affect memory?"], use_cache=False)
        assert calls == [1] and vectors.shape == (1, embedder.dimensions)
    finally:
        embedder.close()


def corrupt_copy(cache_dir: Path, tmp_path: Path) -> Path:
    target = graph_file(tmp_path)
    target.write_bytes(graph_file(cache_dir).read_bytes()[: 1 << 20])  # cut short
    return target


def test_a_corrupt_cached_graph_is_exported_again(
    onnx_embedder: tuple[Embedder, list[Path]], cache_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = corrupt_copy(cache_dir, tmp_path)
    calls: list[Path] = []

    def export(graph: QueryGraph, model_dir: str, path: Path) -> None:  # the good graph, without the wait
        calls.append(path)
        shutil.copyfile(graph_file(cache_dir), path)

    monkeypatch.setattr(QueryGraph, "_export_in_child", export)
    embedder = loaded("onnx", tmp_path)
    try:
        assert embedder.wait_query_backend(WAIT) == "onnx"
        assert calls == [target]
    finally:
        embedder.close()


def test_a_corrupt_cached_graph_that_cannot_be_remade_leaves_torch(
    onnx_embedder: tuple[Embedder, list[Path]], cache_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = corrupt_copy(cache_dir, tmp_path)
    exports = Exports(monkeypatch, fail="injected export failure")
    embedder = loaded("onnx", tmp_path)
    try:
        assert embedder.wait_query_backend(WAIT) == "torch"
        assert exports.calls == [target]
        assert not target.exists()  # the corrupt file is gone: the next start exports afresh
    finally:
        embedder.close()


def test_vectors_beyond_the_tolerance_are_refused(
    onnx_embedder: tuple[Embedder, list[Path]], cache_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shutil.copyfile(graph_file(cache_dir), graph_file(tmp_path))
    real = OnnxQueryEncoder.__call__

    def off(self: OnnxQueryEncoder, texts: list[str]) -> np.ndarray:
        return real(self, texts) + 1e-4  # a graph that drifted from torch

    monkeypatch.setattr(OnnxQueryEncoder, "__call__", off)
    exports = Exports(monkeypatch, fail="injected export failure")
    embedder = loaded("onnx", tmp_path)
    try:
        assert embedder.wait_query_backend(WAIT) == "torch"
        assert embedder._graph is not None and "injected export failure" in embedder._graph.error
        assert exports.calls == [graph_file(tmp_path)]  # refused as cached, so made again (failing here)
    finally:
        embedder.close()


def test_the_check_refuses_drifted_vectors() -> None:
    probes = {text: np.full((1, 4), 0.5, dtype=np.float32) for text in onnx_query.PROBES}

    def torch_like(texts: list[str]) -> np.ndarray:
        return np.concatenate([probes[t] for t in texts])

    assert onnx_query.verify(torch_like, torch_like) == 0.0
    with pytest.raises(OnnxRefusedError, match="differ from torch's"):
        onnx_query.verify(lambda texts: torch_like(texts) + 2 * onnx_query.TOLERANCE, torch_like)
    with pytest.raises(OnnxRefusedError, match="shape"):
        onnx_query.verify(lambda texts: torch_like(texts)[:, :3], torch_like)


async def test_a_failing_onnx_call_is_answered_by_torch(
    onnx_embedder: tuple[Embedder, list[Path]], torch_embedder: Embedder, monkeypatch: pytest.MonkeyPatch
) -> None:
    embedder, _ = onnx_embedder

    def broken(self: Any, texts: list[str]) -> np.ndarray:
        raise RuntimeError("injected ONNX Runtime failure")

    monkeypatch.setattr(OnnxQueryEncoder, "__call__", broken)
    before = embedder_module.ONNX_ERRORS._value.get()
    query = "does sleep affect mood?"
    vectors = await embedder.embed([query], use_cache=False)
    assert embedder_module.ONNX_ERRORS._value.get() == before + 1
    np.testing.assert_allclose(vectors, forward(torch_embedder._models["interactive"], [query]), atol=1e-6)
