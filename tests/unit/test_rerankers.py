"""The local reranker: a real CrossEncoder, made in the test, loaded and scored by the mesh's own code."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from sentence_transformers import CrossEncoder

from ragmesh.errors import ErrorKind, RagmeshError
from ragmesh.rerank import logit_of, ranked, sigmoid
from retrieval.rerankers import (
    CrossEncoderReranker,
    RerankerLoadError,
    Rerankers,
    ScoringCancelledError,
    length_batches,
)
from retrieval.sentence_rerank import sentences
from retrieval.settings import RerankerSpec, RetrievalSettings

from ..rerank_models import TINY_MAX_LENGTH, build_tiny_cross_encoder

QUERY = "what moves the sea"
DOCUMENTS = [
    "Cats are small domesticated carnivorous mammals that purr.",
    "Ocean tides come from the gravitational pull of the moon and the sun.",
    "Bread is baked from flour, water and yeast.",
    "A rocket engine burns stored propellant and ejects exhaust to make thrust.",
    "The sea",
    "Why does the sea rise and fall? The moon.",
    "Dough rises before it goes in the oven, most of the day.",
]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_cross_encoder(tmp_path_factory.mktemp("rerankers") / "tiny")


@pytest.fixture(scope="module")
def rerankers(tiny_model: Path) -> Rerankers:
    loaded = Rerankers.from_specs({"tiny": RerankerSpec(path=str(tiny_model), batch_size=3)})
    loaded.load()
    return loaded


def reference_logits(folder: Path, query: str, documents: list[str]) -> np.ndarray:
    """The scores sentence-transformers itself gives, in one batch, independent of the mesh's code."""
    model = CrossEncoder(str(folder), device="cpu", local_files_only=True)
    pairs = [(query, d) for d in documents]
    return np.asarray(model.predict(pairs, activation_fn=torch.nn.Identity(), batch_size=len(pairs)))


async def test_the_order_returned_is_the_order_the_models_scores_give(tiny_model: Path, rerankers: Rerankers) -> None:
    scores = await rerankers.score("tiny", QUERY, DOCUMENTS, truncate=False)
    expected = reference_logits(tiny_model, QUERY, DOCUMENTS)
    # Batched by length (3 per pass) yet the same scores as one pass over all pairs.
    np.testing.assert_allclose(scores.logits, expected, rtol=1e-4, atol=1e-5)
    assert len(set(np.round(expected, 4))) == len(DOCUMENTS), "the tiny model must tell the documents apart"
    order = [r.index for r in ranked([float(x) for x in scores.logits])]
    assert order == [int(i) for i in np.argsort(-expected, kind="stable")]
    assert scores.tokens > len(DOCUMENTS) * 5


async def test_pairs_over_the_length_cap_are_refused_or_cut(tiny_model: Path, rerankers: Rerankers) -> None:
    long_document = " ".join(["tides of the ocean and the moon"] * 20)
    documents = [DOCUMENTS[0], long_document]
    with pytest.raises(RagmeshError) as refused:
        await rerankers.score("tiny", QUERY, documents, truncate=False)
    assert refused.value.kind is ErrorKind.INVALID_REQUEST
    assert refused.value.code == "context_length_exceeded" and "documents[1]" in refused.value.message
    assert f"at most {TINY_MAX_LENGTH}" in refused.value.message
    cut = await rerankers.score("tiny", QUERY, documents, truncate=True)
    # Cut as sentence-transformers cuts: the same score as its own predict (which truncates).
    np.testing.assert_allclose(cut.logits, reference_logits(tiny_model, QUERY, documents), rtol=1e-4, atol=1e-5)
    assert cut.tokens <= 2 * TINY_MAX_LENGTH


async def test_an_unknown_model_is_not_found(rerankers: Rerankers) -> None:
    with pytest.raises(RagmeshError) as missing:
        await rerankers.score("nope", QUERY, DOCUMENTS, truncate=False)
    assert missing.value.kind is ErrorKind.NOT_FOUND and missing.value.code == "model_not_found"


def test_cards_say_rerank(rerankers: Rerankers) -> None:
    (card,) = rerankers.cards()
    assert card.id == "tiny" and list(card.capabilities) == ["rerank"] and card.max_context == TINY_MAX_LENGTH


def test_a_caller_gone_stops_the_scoring_at_the_next_batch(tiny_model: Path, rerankers: Rerankers) -> None:
    model = rerankers.get("tiny")
    assert isinstance(model, CrossEncoderReranker)
    cancelled = threading.Event()
    cancelled.set()
    with pytest.raises(ScoringCancelledError):
        model._score(QUERY, DOCUMENTS, False, cancelled)


def test_a_folder_that_is_not_a_model_is_refused_at_start(tmp_path: Path) -> None:
    with pytest.raises(RerankerLoadError, match="is not a folder"):
        Rerankers.from_specs({"x": RerankerSpec(path=str(tmp_path / "absent"))}).load()
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(RerankerLoadError, match="cannot load"):
        Rerankers.from_specs({"x": RerankerSpec(path=str(empty))}).load()


def test_a_classifier_with_several_outputs_is_not_a_reranker(tmp_path: Path) -> None:
    folder = build_tiny_cross_encoder(tmp_path / "nli", num_labels=3)
    with pytest.raises(RerankerLoadError, match="3 outputs"):
        Rerankers.from_specs({"nli": RerankerSpec(path=str(folder))}).load()


def test_settings_take_a_folder_or_a_spec() -> None:
    settings = RetrievalSettings.model_validate(
        {"rerankers": {"a": "/models/a", "b": {"path": "/models/b", "max_length": 256}}}
    )
    assert settings.rerankers["a"].path == "/models/a" and settings.rerankers["a"].max_length is None
    assert settings.rerankers["b"].max_length == 256


def test_batches_group_similar_lengths() -> None:
    assert length_batches([5, 1, 9, 2, 7], 2) == [[1, 3], [0, 4], [2]]


def test_scores_convert_both_ways() -> None:
    for logit in (-40.0, -3.0, 0.0, 2.5, 40.0):
        assert 0.0 <= sigmoid(logit) <= 1.0
    assert sigmoid(0.0) == 0.5 and abs(logit_of(sigmoid(2.5)) - 2.5) < 1e-6
    assert logit_of(7.0) == 7.0  # outside [0, 1]: a logit already
    assert [s.index for s in ranked([0.1, 0.9, 0.1])] == [1, 0, 2]


def test_sentences_split_at_sentence_ends() -> None:
    assert sentences("Tides rise. The Moon pulls (mostly). 3 things? Yes") == [
        "Tides rise.",
        "The Moon pulls (mostly).",
        "3 things?",
        "Yes",
    ]
    assert sentences("e.g. this stays whole") == ["e.g. this stays whole"]
    assert len(sentences(" ".join(f"Part {i}." for i in range(50)), limit=4)) == 4
