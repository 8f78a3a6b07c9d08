"""A tiny cross-encoder made on the spot: a small BERT config and a tokenizer built in the test.

Nothing is downloaded: the vocabulary is the words of the texts the tests use
(plus letters, so that any word still tokenizes), the weights are random with a
fixed seed, and the folder is what `CrossEncoder.save_pretrained` writes. Its
scores mean nothing, but they differ from pair to pair, which is all a test of
the loading, batching and ordering code needs.
"""

from __future__ import annotations

import os
import re
import string
from pathlib import Path

TINY_MAX_LENGTH = 48

WORDS = (
    "cats are small domesticated carnivorous mammals that purr and sleep a lot most of the day "
    "a rocket engine burns stored propellant ejects exhaust to make produce thrust into orbit "
    "bread is baked from flour water yeast after dough has risen rises before it goes in oven "
    "ocean tides come caused by gravitational pull moon sun on seas what moves sea why does rise fall "
    "how do animals spacecraft propulsion which food"
)


def build_tiny_cross_encoder(folder: Path, num_labels: int = 1, seed: int = 0) -> Path:
    """Write a tiny BERT cross-encoder (random weights) and its WordPiece tokenizer to `folder`."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from sentence_transformers import CrossEncoder
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizer

    words = sorted(set(re.findall(r"[a-z]+", WORDS.lower())))
    pieces = [*string.ascii_lowercase, *string.digits, *(f"##{c}" for c in string.ascii_lowercase + string.digits)]
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words, *(p for p in pieces if p not in words)]
    tokenizer = BertTokenizer(  # the fast (Rust) tokenizer in transformers 5
        vocab={token: i for i, token in enumerate(vocab)}, do_lower_case=True, model_max_length=TINY_MAX_LENGTH
    )
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=TINY_MAX_LENGTH,
        # Wide random weights, so that different pairs get clearly different scores.
        initializer_range=0.5,
    )
    config.num_labels = num_labels
    folder.mkdir(parents=True, exist_ok=True)
    BertForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    # Round trip through sentence-transformers: the folder is then a CrossEncoder's own.
    CrossEncoder(str(folder), device="cpu", local_files_only=True).save_pretrained(str(folder))
    return folder
