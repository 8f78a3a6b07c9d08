"""Fixtures shared by unit tests."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from inference.tokens import GgufTokenizer


@pytest.fixture(scope="module")
def smollm2() -> GgufTokenizer:
    """The packaged SmolLM2 GGUF's vocabulary and chat template, loaded in process."""
    from inference.settings import InferenceSettings, packaged_smollm2_path
    from inference.tokens import load_gguf_tokenizer

    try:
        path = packaged_smollm2_path()
    except RuntimeError as exc:
        pytest.skip(str(exc))
    local = load_gguf_tokenizer(path, InferenceSettings().resolved_chat_template())
    assert local is not None
    return local
