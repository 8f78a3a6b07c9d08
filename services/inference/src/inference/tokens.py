"""The embedded model's tokenizer and chat template, run in this process.

llama.cpp's HTTP server (which xllamacpp starts, on a Unix socket for the engine) is the only
way xllamacpp offers to apply the chat template and to tokenize: two HTTP calls
per counted conversation. The GGUF file holds everything both need, so they run
here instead: the vocabulary and merges become a `tokenizers` byte-level BPE
(the pre-tokenizer llama.cpp picks for the file's `tokenizer.ggml.pre`), and the
chat template is rendered with Jinja the way llama.cpp's minja renders it.

Only what is known to behave like llama.cpp is built (a `gpt2` vocabulary with a
pre-tokenizer from PRE_TOKENIZERS; anything else returns None and the engine
keeps asking llama.cpp). The engine also compares both on PROBES when it loads
and drops the local path on any difference, so a model or template that renders
or splits differently falls back instead of miscounting.
"""

from __future__ import annotations

import json
import logging
import mmap
import os
import struct
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import httpx
from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

log = logging.getLogger(__name__)

# llama.cpp's token types (llama_token_type): the ones its tokenizer matches as whole special
# tokens in a text when asked to parse special tokens (which /tokenize always does).
_UNKNOWN, _CONTROL, _USER_DEFINED = 2, 3, 4

# tokenizer.ggml.pre -> the pre-tokenizer llama.cpp uses for it (llama-vocab.cpp). "digits": every
# digit alone, then GPT-2's pattern (SmolLM, StarCoder and kin); "gpt2": GPT-2's pattern alone.
PRE_TOKENIZERS = {
    "smollm": "digits",
    "starcoder": "digits",
    "refact": "digits",
    "codeshell": "digits",
    "gpt-2": "gpt2",
}

# What the engine checks the local path against llama.cpp with when it loads: conversations the
# RAG prompt fitting sends (system prompts, multi-turn, sources), and texts where byte-level BPE
# implementations part ways (whitespace runs, digits, contractions, non-Latin scripts, emoji,
# special-token markers written in the text).
PROBE_TEXTS = (
    "Hello, world! It's 2026-11-30 and we've got 1234567 tokens.\n\n",
    "  leading spaces,\ttabs\t\tand trailing   \n\n\n  ",
    "Ünïcödé: naïve café, 東京は日本の首都です。 Привет, мир! 🙂👍🏽 — “quotes” … ½ ² ٣",
    "[1] Title\nText with <|im_start|>user markers<|im_end|> inside and </s> <s> too.",
    "I'll they're she'd we'LL DON'T x'y '' ' s",
    "code: def f(x):\n    return {'a': [1, 2.5e-3]}  # comment\r\n",
)
PROBE_CONVERSATIONS: tuple[list[dict[str, Any]], ...] = (
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "You answer briefly.\n\nSources:\n\n[1] A\nB 12"},
        {"role": "user", "content": "First question"},
        {"role": "assistant", "content": "An answer."},
        {"role": "user", "content": "And this one?  "},
    ],
    [{"role": "system", "content": ""}, {"role": "user", "content": "ünïcödé 🙂"}],
)


@dataclass(frozen=True)
class GgufTokenizer:
    """The GGUF's tokenizer (`encode`, counting like llama.cpp's /tokenize with special tokens
    parsed) and its chat template (`render`, like llama.cpp's /apply-template)."""

    tokenizer: Tokenizer
    template: Callable[..., str]
    bos_token: str
    eos_token: str
    bos_id: int | None
    eos_id: int | None
    add_bos: bool
    add_eos: bool

    def encode(self, text: str, add_special: bool = True) -> list[int]:
        """Token ids of `text`, with BOS/EOS where the model adds them and add_special asks."""
        ids: list[int] = self.tokenizer.encode(text, add_special_tokens=False).ids
        if add_special and self.add_bos and self.bos_id is not None:
            ids.insert(0, self.bos_id)
        if add_special and self.add_eos and self.eos_id is not None:
            ids.append(self.eos_id)
        return ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """encode of each text (the GIL released while the tokenizer runs)."""
        encoded = self.tokenizer.encode_batch(texts, add_special_tokens=False)
        head = [self.bos_id] if self.add_bos and self.bos_id is not None else []
        tail = [self.eos_id] if self.add_eos and self.eos_id is not None else []
        return [[*head, *e.ids, *tail] for e in encoded]

    def render(self, messages: list[dict[str, Any]]) -> str:
        """The prompt text of a conversation, ending with the assistant's turn opened."""
        prompt = self.template(
            messages=messages,
            tools=None,
            add_generation_prompt=True,
            bos_token=self.bos_token,
            eos_token=self.eos_token,
        )
        # llama.cpp drops the BOS a template writes when the tokenizer adds one anyway.
        if self.add_bos and self.bos_token and prompt.startswith(self.bos_token):
            prompt = prompt[len(self.bos_token) :]
        if self.add_eos and self.eos_token and prompt.endswith(self.eos_token):
            prompt = prompt[: -len(self.eos_token)]
        return prompt


class PromptIds:
    """Token ids of templated conversations for the engine's completion path: the last `size`
    prompts counted (RAG's prompt fitting counts the very conversation it then sends), so a
    generation reuses their ids instead of tokenizing its long prompt again. Read from worker
    threads, filled from the event loop: one lock."""

    def __init__(self, local: GgufTokenizer, size: int = 32) -> None:
        self.local = local
        self._size = size
        self._ids: OrderedDict[str, list[int]] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0

    def remember(self, prompt: str, ids: list[int]) -> None:
        with self._lock:
            self._ids[prompt] = ids
            self._ids.move_to_end(prompt)
            while len(self._ids) > self._size:
                self._ids.popitem(last=False)

    def of(self, messages: list[dict[str, Any]]) -> list[int] | None:
        """The ids of the conversation's prompt (as llama.cpp's chat endpoint would tokenize it);
        None when the template refuses the conversation (llama.cpp then says why)."""
        try:
            prompt = self.local.render(messages)
        except TemplateError:
            return None
        with self._lock:
            ids = self._ids.get(prompt)
            if ids is not None:
                self.hits += 1
                return ids
        return self.local.encode(prompt)


def load_gguf_tokenizer(path: str, chat_template: str = "") -> GgufTokenizer | None:
    """The tokenizer of the GGUF at `path` and its chat template (`chat_template` when given, else
    the file's own); None when the file's vocabulary is of a kind not built here."""
    # One thread per batch: the engine's decode threads already have the cores (rayon's pool beside
    # them measured slower here: 1.2 us a token on one thread, 2.0 on the pool, busy 2-core machine).
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    metadata = read_gguf_metadata(path)

    def field(name: str, default: Any = None) -> Any:
        return metadata.get(name, default)

    kind, pre = field("tokenizer.ggml.model", ""), field("tokenizer.ggml.pre", "default")
    template_text = chat_template or field("tokenizer.chat_template", "")
    if kind != "gpt2" or pre not in PRE_TOKENIZERS or not template_text:
        log.info("no in-process tokenizer for this model", extra={"vocab": kind, "pre": pre})
        return None
    tokens: list[str] = field("tokenizer.ggml.tokens")
    types: list[int] = field("tokenizer.ggml.token_type", [1] * len(tokens))
    merges = [tuple(m.split(" ", 1)) for m in field("tokenizer.ggml.merges", [])]
    bpe = models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False)
    tokenizer = Tokenizer(bpe)
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.pre_tokenizer = (
        pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
        if PRE_TOKENIZERS[pre] == "digits"
        else byte_level
    )
    tokenizer.add_special_tokens(
        [
            AddedToken(t, special=True, normalized=False, single_word=False, lstrip=False, rstrip=False)
            for t, kind_ in zip(tokens, types, strict=True)
            if kind_ in (_UNKNOWN, _CONTROL, _USER_DEFINED)
        ]
    )
    bos_id, eos_id = field("tokenizer.ggml.bos_token_id"), field("tokenizer.ggml.eos_token_id")
    return GgufTokenizer(
        tokenizer=tokenizer,
        template=_jinja(template_text),
        bos_token=tokens[bos_id] if bos_id is not None else "",
        eos_token=tokens[eos_id] if eos_id is not None else "",
        bos_id=bos_id,
        eos_id=eos_id,
        add_bos=bool(field("tokenizer.ggml.add_bos_token", False)),
        add_eos=bool(field("tokenizer.ggml.add_eos_token", False)),
    )


def differs_from_engine(local: GgufTokenizer, http: httpx.Client) -> str:
    """What of PROBE_* the local tokenizer renders or counts unlike llama.cpp's server at `http`
    ("" for nothing): each conversation's prompt, then every text's and prompt's token ids."""
    prompts = list(PROBE_TEXTS)
    for conversation in PROBE_CONVERSATIONS:
        reply = http.post("/apply-template", json={"messages": conversation})
        reply.raise_for_status()
        prompt = str(reply.json()["prompt"])
        if local.render(conversation) != prompt:
            return f"template: {prompt!r}"
        prompts.append(prompt)
    for prompt in prompts:
        reply = http.post("/tokenize", json={"content": prompt, "add_special": True})
        reply.raise_for_status()
        if local.encode(prompt) != reply.json()["tokens"]:
            return f"tokens: {prompt!r}"
    return ""


# GGUF metadata value types (gguf.GGUFValueType): struct formats of the scalars, 8 string, 9 array.
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9


def read_gguf_metadata(path: str) -> dict[str, Any]:
    """The key-value metadata of a GGUF file (v2/v3, little-endian), tensors left unread.

    Read here rather than with the `gguf` package: its reader parses every element of the
    vocabulary arrays into numpy views, which took 7 s for SmolLM2's 49k tokens and 49k merges
    on a busy 2-core machine, against well under a second for this."""
    with open(path, "rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as data:
        magic, version = struct.unpack_from("<4sI", data, 0)
        if magic != b"GGUF" or version not in (2, 3):
            raise ValueError(f"{path}: not a little-endian GGUF v2/v3 file")
        (count,) = struct.unpack_from("<Q", data, 16)
        offset = 24
        out: dict[str, Any] = {}

        def string(at: int) -> tuple[str, int]:
            (size,) = struct.unpack_from("<Q", data, at)
            return data[at + 8 : at + 8 + size].decode("utf-8", "replace"), at + 8 + size

        def value(kind: int, at: int) -> tuple[Any, int]:
            if kind == _STRING:
                return string(at)
            if kind == _ARRAY:
                item, size = struct.unpack_from("<IQ", data, at)
                at += 12
                if item in _SCALARS:  # one unpack for the whole array
                    fmt = f"<{size}{_SCALARS[item]}"
                    return list(struct.unpack_from(fmt, data, at)), at + struct.calcsize(fmt)
                items = []
                for _ in range(size):
                    got, at = value(item, at)
                    items.append(got)
                return items, at
            fmt = "<" + _SCALARS[kind]
            return struct.unpack_from(fmt, data, at)[0], at + struct.calcsize(fmt)

        for _ in range(count):
            key, offset = string(offset)
            (kind,) = struct.unpack_from("<I", data, offset)
            out[key], offset = value(kind, offset + 4)
        return out


def _jinja(source: str) -> Callable[..., str]:
    """A chat template as Hugging Face and llama.cpp (minja) run it: blocks trimmed, `tojson`
    without HTML escaping, raise_exception and strftime_now defined."""

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.filters["tojson"] = lambda value, indent=None, **_: json.dumps(value, ensure_ascii=False, indent=indent)
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source).render
