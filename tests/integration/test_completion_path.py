"""A plain chat run as a completion of its templated prompt's token ids answers exactly as llama.cpp's
chat endpoint does, on the real model: same text, same number of tokens, same finish, same usage
(inference.llamacpp_body.as_completion decides which chats take the completion path)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from inference.engine import LlamaCppEngine
from ragmesh.errors import RagmeshError
from ragmesh.v1 import common_pb2, inference_pb2

from .conftest import MODEL

ROOT = Path(__file__).resolve().parents[2]
SCIFACT = Path(os.environ.get("RAGMESH_SHARED_DATA", ROOT.parent / "shared" / "data")) / "scifact"


class Recording:
    """The engine's llama.cpp server, recording which of its calls each choice went to."""

    def __init__(self, server: Any) -> None:
        self._server = server
        self.calls: list[str] = []

    def handle_chat_completions(self, body: dict[str, Any], callback: Any) -> Any:
        self.calls.append("chat")
        return self._server.handle_chat_completions(body, callback)

    def handle_completions(self, body: dict[str, Any], callback: Any) -> Any:
        self.calls.append("completions")
        return self._server.handle_completions(body, callback)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._server, name)


@contextmanager
def recorded(engine: LlamaCppEngine, chat_endpoint: bool) -> Iterator[Recording]:
    """The engine with its calls recorded; with `chat_endpoint`, as it was before chats could run as
    completions (every chat to llama.cpp's chat endpoint)."""
    server, prompts = engine._server, engine._prompts
    engine._server = recording = Recording(server)
    if chat_endpoint:
        engine._prompts = None
    try:
        yield recording
    finally:
        engine._server, engine._prompts = server, prompts


async def answer(engine: LlamaCppEngine, request: inference_pb2.GenerateRequest) -> dict[str, Any]:
    chunks = [chunk async for chunk in engine.generate(request)]
    last = chunks[-1]
    return {
        "text": "".join(c.text for c in chunks),
        "finish_reason": last.finish_reason,
        "completion_tokens": last.completion_tokens,
        "prompt_tokens": last.prompt_tokens,
        "extras": [c.extra_json for c in chunks if c.extra_json],
    }


async def warm(engine: LlamaCppEngine, request: inference_pb2.GenerateRequest) -> None:
    """The prompt in the slots' cache, so that both paths then read it from the same cache: a prompt
    read from its cache gives slightly different numbers than read whole (its last token is
    evaluated alone, not in the prompt's batch), which can tip a near tie at temperature 0."""
    with recorded(engine, chat_endpoint=True):
        async for _ in engine.generate(request):
            pass


def rag_system() -> str:
    """A RAG prompt as preprocess fits it: instructions, then numbered SciFact passages (~1,500 tokens)."""
    path = SCIFACT / "corpus.jsonl"
    if not path.exists():
        pytest.skip(f"{path} is absent: this test needs ../shared/data (or RAGMESH_SHARED_DATA)")
    documents = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()[:5]]
    sources = "\n\n".join(f"[{i + 1}] {d['title']}\n{d['text']}" for i, d in enumerate(documents))
    return f"Answer the question using the numbered sources below.\n\nSources:\n\n{sources}"


FEW_SHOT_THINK = (
    ("system", "Think first inside <think></think>, then answer."),
    ("user", "2+2?"),
    ("assistant", "<think>2 and 2 make 4.</think>\n4"),
    ("user", "3+3?"),
    ("assistant", "<think>3 and 3 make 6.</think>\n6"),
    ("user", "5+5?"),
)

CONVERSATIONS: dict[str, tuple[tuple[str, str], ...]] = {
    "user": (("user", "What is the capital of France? Answer in one word."),),
    "system+user": (("system", "You answer briefly."), ("user", "Name three colors.")),
    "multi-turn": (
        ("system", "Be brief."),
        ("user", "Hi"),
        ("assistant", "Hello! How can I help?"),
        ("user", "Write a haiku about the sea."),
    ),
    "rag": (("system", "RAG"), ("user", "What does the first source say about the brain?")),
    "rag-context-role": (("context", "[1] Passage one about cells."), ("user", "What are cells?")),
    "think-tags": FEW_SHOT_THINK,
}


def request_for(turns: tuple[tuple[str, str], ...], **sampling: Any) -> inference_pb2.GenerateRequest:
    messages = [
        common_pb2.ChatMessage(role=role, content=rag_system() if content == "RAG" else content)
        for role, content in turns
    ]
    client = sampling.pop("client", None)
    return inference_pb2.GenerateRequest(
        model=MODEL,
        chat=inference_pb2.ChatInput(messages=messages),
        sampling=inference_pb2.SamplingParams(**sampling),
        openai_json=json.dumps(client) if client else "",
    )


@pytest.mark.parametrize("name", list(CONVERSATIONS))
async def test_a_plain_chat_answers_as_the_chat_endpoint_does(engine: LlamaCppEngine, name: str) -> None:
    request = request_for(CONVERSATIONS[name], max_tokens=40, temperature=0, seed=7)
    await warm(engine, request)
    with recorded(engine, chat_endpoint=True) as before:
        expected = await answer(engine, request)
    with recorded(engine, chat_endpoint=False) as now:
        got = await answer(engine, request)
    assert (before.calls, now.calls) == (["chat"], ["completions"])
    assert got == expected
    assert got["completion_tokens"] > 0 and got["prompt_tokens"] > 0
    if name == "rag":
        assert got["prompt_tokens"] > 1000  # a RAG-sized prompt


@pytest.mark.parametrize(
    "sampling",
    [
        {"temperature": 0.9, "seed": 11, "top_p": 0.9},
        {"temperature": 0.7, "seed": 5, "client": {"top_k": 20, "min_p": 0.05}},
        {"temperature": 0, "presence_penalty": 1.0, "frequency_penalty": 0.5},
        {"temperature": 0, "client": {"logit_bias": {"504": -100, "28": 5}}},
        {"temperature": 0.8, "seed": 3, "n": 2},
    ],
    ids=["seeded", "top-k-min-p", "penalties", "logit-bias", "n-choices"],
)
async def test_sampling_parameters_read_the_same_on_both_paths(
    engine: LlamaCppEngine, sampling: dict[str, Any]
) -> None:
    request = request_for(CONVERSATIONS["system+user"], max_tokens=24, **sampling)
    n = max(1, sampling.get("n", 1))
    await warm(engine, request)

    async def per_choice() -> list[dict[str, Any]]:
        chunks = [chunk async for chunk in engine.generate(request)]
        return [
            {
                "text": "".join(c.text for c in chunks if c.index == i),
                "finish": [c.finish_reason for c in chunks if c.index == i][-1],
                "tokens": [c.completion_tokens for c in chunks if c.index == i][-1],
            }
            for i in range(n)
        ]

    with recorded(engine, chat_endpoint=True):
        expected = await per_choice()
    with recorded(engine, chat_endpoint=False) as now:
        got = await per_choice()
    assert now.calls == ["completions"] * n
    assert got == expected


async def test_a_counted_rag_prompt_is_not_tokenized_again(engine: LlamaCppEngine) -> None:
    assert engine._prompts is not None
    request = request_for(CONVERSATIONS["rag"], max_tokens=2, temperature=0)
    (counted,) = await engine.count_many([inference_pb2.TokenizeInput(chat=request.chat)])
    hits = engine._prompts.hits
    with recorded(engine, chat_endpoint=False) as now:
        got = await answer(engine, request)
    assert now.calls == ["completions"] and engine._prompts.hits == hits + 1
    assert got["prompt_tokens"] == len(counted)
    # Asked again, the prompt is read from the slot's cache, as on the chat endpoint.
    chunks = [chunk async for chunk in engine.generate(request)]
    assert chunks[-1].cached_prompt_tokens == len(counted) - 1 and chunks[-1].prompt_tokens == len(counted)


async def test_a_prompt_over_the_context_is_the_same_error_on_both_paths(engine: LlamaCppEngine) -> None:
    request = request_for((("user", "word " * 3000),), temperature=0)
    errors = []
    for chat_endpoint in (True, False):
        with recorded(engine, chat_endpoint) as calls, pytest.raises(RagmeshError) as caught:
            await answer(engine, request)
        errors.append((calls.calls, caught.value.code, caught.value.http_status, caught.value.message))
    assert errors[0][0] == ["chat"] and errors[1][0] == ["completions"]
    assert errors[0][1:] == errors[1][1:] and errors[0][1] == "context_length_exceeded"


async def test_a_chat_with_tools_keeps_the_chat_endpoint(engine: LlamaCppEngine) -> None:
    tools = [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}]
    request = request_for(CONVERSATIONS["user"], max_tokens=4, temperature=0, client={"tools": tools})
    with recorded(engine, chat_endpoint=False) as now:
        await answer(engine, request)
    assert now.calls == ["chat"]
