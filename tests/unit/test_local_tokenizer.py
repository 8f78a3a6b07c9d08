"""The in-process tokenizer (inference.tokens): built from the packaged GGUF, refused for a kind of
vocabulary it does not know, and dropped by the load-time check when llama.cpp counts otherwise.

llama.cpp is a double here (httpx.MockTransport answering from the local tokenizer, or answering
wrong on purpose); tests/integration/test_local_tokenizer.py compares against the real engine.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from inference.settings import packaged_smollm2_path
from inference.tokens import GgufTokenizer, differs_from_engine, load_gguf_tokenizer, read_gguf_metadata


def fake_llamacpp(
    local: GgufTokenizer, template: Callable[[str], str] = str, tokens: Callable[[list[int]], list[int]] = list
) -> httpx.Client:
    """llama.cpp's /apply-template and /tokenize answered by `local`, then bent by `template` / `tokens`."""

    def answer(request: httpx.Request) -> httpx.Response:
        body: dict[str, Any] = json.loads(request.content)
        if request.url.path == "/apply-template":
            return httpx.Response(200, json={"prompt": template(local.render(body["messages"]))})
        return httpx.Response(200, json={"tokens": tokens(local.encode(body["content"]))})

    return httpx.Client(base_url="http://llama", transport=httpx.MockTransport(answer))


def test_the_packaged_gguf_gives_smollm2s_vocabulary(smollm2: GgufTokenizer) -> None:
    metadata = read_gguf_metadata(packaged_smollm2_path())
    assert metadata["tokenizer.ggml.model"] == "gpt2" and metadata["tokenizer.ggml.pre"] == "smollm"
    assert len(metadata["tokenizer.ggml.tokens"]) == 49152
    # Special markers are one token each, digits one token each, no BOS added (SmolLM2 adds none).
    assert smollm2.encode("<|im_start|>user\n1234<|im_end|>") == [1, 4093, 198, 33, 34, 35, 36, 2]
    prompt = smollm2.render([{"role": "user", "content": "Hi"}])
    assert prompt.startswith("<|im_start|>system\n") and prompt.endswith("<|im_start|>assistant\n")


def test_a_tokenizer_that_agrees_with_the_engine_passes_the_check(smollm2: GgufTokenizer) -> None:
    with fake_llamacpp(smollm2) as http:
        assert differs_from_engine(smollm2, http) == ""


def test_an_engine_that_splits_differently_is_found_out(smollm2: GgufTokenizer) -> None:
    with fake_llamacpp(smollm2, tokens=lambda ids: [*ids, 0] if len(ids) > 40 else ids) as http:
        assert differs_from_engine(smollm2, http).startswith("tokens:")


def test_an_engine_that_renders_the_template_differently_is_found_out(smollm2: GgufTokenizer) -> None:
    with fake_llamacpp(smollm2, template=lambda prompt: prompt.replace("<|im_end|>\n", "<|im_end|>", 1)) as http:
        assert differs_from_engine(smollm2, http).startswith("template:")


def write_gguf(path: Path, metadata: dict[str, str]) -> None:
    """A GGUF v3 file with string metadata only and no tensors."""

    def string(text: str) -> bytes:
        raw = text.encode()
        return struct.pack("<Q", len(raw)) + raw

    body = b"".join(string(k) + struct.pack("<I", 8) + string(v) for k, v in metadata.items())
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, len(metadata)) + body)


def test_a_vocabulary_of_another_kind_is_left_to_llamacpp(tmp_path: Path) -> None:
    for kind, pre in (("llama", "default"), ("gpt2", "llama-bpe")):
        write_gguf(tmp_path / "m.gguf", {"tokenizer.ggml.model": kind, "tokenizer.ggml.pre": pre})
        assert load_gguf_tokenizer(str(tmp_path / "m.gguf"), "{{ messages }}") is None
