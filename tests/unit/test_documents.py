"""Document cleaning and token-aware chunking."""

from __future__ import annotations

import itertools

import pytest

from preprocess.documents import Chunker, clean_text, load_tokenizer


@pytest.fixture(scope="module")
def chunker() -> Chunker:
    return Chunker(load_tokenizer(), size=32, overlap=8)


def test_clean_text_normalises_whitespace_controls_and_unicode() -> None:
    raw = "  Cafe\u0301\x00 au\t\tlait \r\n\r\n\r\n\r\nNext\u00a0 para\x1b \n"
    assert clean_text(raw) == "Café au lait\n\nNext para"


def test_clean_text_of_only_noise_is_empty() -> None:
    assert clean_text(" \x00\t\n\x07 ") == ""


def test_short_text_is_one_chunk_with_ids_and_title(chunker: Chunker) -> None:
    chunks = chunker.chunk("doc-1", "A title", "Short text.", {"k": 1})
    assert [(c.chunk_id, c.document_id, c.title, c.text, c.metadata) for c in chunks] == [
        ("doc-1#0", "doc-1", "A title", "Short text.", {"k": 1})
    ]


def test_long_text_is_split_within_the_token_budget_with_overlap(chunker: Chunker) -> None:
    text = " ".join(f"word{i}" for i in range(200))
    chunks = chunker.chunk("d", "T", text, {})
    assert len(chunks) > 3
    tokenizer = load_tokenizer()
    for c in chunks:
        assert len(tokenizer.encode(c.text, add_special_tokens=False).ids) <= 32
        assert c.title == "T" and c.document_id == "d"
    # Consecutive chunks share their boundary region, and together cover the text.
    for a, b in itertools.pairwise(chunks):
        assert a.text.split()[-1] in b.text
    assert chunks[0].text.startswith("word0") and chunks[-1].text.endswith("word199")


def test_chunk_text_is_a_slice_of_the_document(chunker: Chunker) -> None:
    text = "Ünïcödé, punctuation!? and numbers 3.14159 " * 20
    for c in chunker.chunk("d", "", text, {}):
        assert c.text in text


def test_bad_chunk_settings_are_refused() -> None:
    with pytest.raises(ValueError):
        Chunker(load_tokenizer(), size=16, overlap=8)
