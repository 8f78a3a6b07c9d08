from __future__ import annotations

import unicodedata

from preprocess.normalize import normalize_text


def test_nfc_composes_decomposed_characters() -> None:
    decomposed = unicodedata.normalize("NFD", "café")
    assert decomposed != "café"
    assert normalize_text(decomposed) == "café"


def test_control_characters_are_removed_but_whitespace_kept() -> None:
    assert normalize_text("a\x00b\x07c\x1b[0m\td\ne\r\n\x7f\x85") == "abc[0m\td\ne\r\n"


def test_plain_ascii_is_unchanged() -> None:
    text = "def f(x):\n    return x  # keep  spacing"
    assert normalize_text(text) == text
