"""Which chats the embedded engine runs as completions of their templated prompt's token ids
(inference.llamacpp_body.as_completion), and what the worker thread then sends llama.cpp.

llama.cpp is a double here (it records the call it gets); the real engine's answers on both paths
are compared in tests/integration/test_completion_path.py.
"""

from __future__ import annotations

import dataclasses
import json
import threading
from typing import Any

import pytest
from jinja2.exceptions import TemplateError

from inference.engine import LlamaCppEngine
from inference.llamacpp_body import as_completion, request_body
from inference.llamacpp_stream import DONE, ChoiceState
from inference.settings import InferenceSettings
from inference.tokens import GgufTokenizer, PromptIds
from ragmesh.v1 import common_pb2, inference_pb2

TOOLS = [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}]


def chat(*turns: tuple[str, str], client: dict[str, Any] | None = None, **fields: Any) -> inference_pb2.GenerateRequest:
    messages = [common_pb2.ChatMessage(role=role, content=content) for role, content in turns]
    return inference_pb2.GenerateRequest(
        model="m",
        chat=inference_pb2.ChatInput(messages=messages),
        sampling=inference_pb2.SamplingParams(max_tokens=8, temperature=0, seed=3),
        openai_json=json.dumps(client) if client is not None else "",
        **fields,
    )


def routed(request: inference_pb2.GenerateRequest) -> list[dict[str, Any]] | None:
    return as_completion(request, request_body(request, 0, "<tool_call>\n"))


@pytest.mark.parametrize(
    "request_",
    [
        chat(("user", "hi")),
        chat(("system", "Be brief."), ("user", "hi")),
        chat(("system", ""), ("user", "a"), ("assistant", "b"), ("user", "c")),
        chat(("context", "[1] passage"), ("user", "question")),  # RAG: folded into the system turn
        chat(("user", "hi"), client={"top_k": 5, "min_p": 0.1, "logit_bias": {"42": -100}, "user": "u"}),
        chat(("user", "hi"), client={"logprobs": False, "top_logprobs": 3}),  # none asked: nothing sent
        chat(("user", "hi"), client={"tools": [], "tool_choice": "none"}),  # no tools at all
    ],
    ids=["user", "system+user", "multi-turn", "rag-context", "sampling-extras", "logprobs-false", "empty-tools"],
)
def test_plain_chats_run_as_completions(request_: inference_pb2.GenerateRequest) -> None:
    body = request_body(request_, 0, "<tool_call>\n")
    assert as_completion(request_, body) == body["messages"]


@pytest.mark.parametrize(
    "request_",
    [
        chat(("user", "hi"), client={"tools": TOOLS}),
        chat(("user", "hi"), client={"tools": TOOLS, "tool_choice": "none"}),
        chat(("user", "hi"), client={"functions": [TOOLS[0]["function"]]}),
        chat(("user", "hi"), response_format_json=json.dumps({"type": "json_object"})),
        chat(("user", "hi"), client={"logprobs": True}),
        chat(("user", "hi"), client={"logprobs": True, "top_logprobs": 2}),
        chat(("user", "hi"), content_parts=[inference_pb2.ContentPart(type="image_url", param="messages[0]")]),
        chat(("user", "hi"), ("assistant", "Hel")),  # a final assistant turn is continued, not answered
        chat(("developer", "Be brief."), ("user", "hi")),
        chat(("user", "weather?"), ("assistant", ""), ("tool", "sunny")),
        chat(
            ("user", "weather?"),
            ("assistant", ""),
            ("user", "and now?"),
            client={
                "messages": [
                    {"role": "user", "content": "weather?"},
                    {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function"}]},
                    {"role": "user", "content": "and now?"},
                ]
            },
        ),
    ],
    ids=[
        "tools",
        "tools-choice-none",
        "legacy-functions",
        "response-format",
        "logprobs",
        "top-logprobs",
        "content-parts",
        "final-assistant",
        "developer-role",
        "tool-result",
        "assistant-tool-calls",
    ],
)
def test_chats_the_chat_endpoint_must_read_keep_it(request_: inference_pb2.GenerateRequest) -> None:
    assert routed(request_) is None


def test_a_named_message_keeps_the_chat_endpoint() -> None:
    request = chat(("user", "hi"))
    request.chat.messages[0].name = "alice"
    assert routed(request) is None


def test_legacy_completions_are_not_chats() -> None:
    request = inference_pb2.GenerateRequest(model="m", prompt="Once upon")
    assert routed(request) is None


# --- the worker thread -------------------------------------------------------------------------


class RecordingServer:
    """llama.cpp's two calls, recording which one ran with what body, answering one finished chunk."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []

    def _answer(self, name: str, body: dict[str, Any], callback: Any) -> None:
        self.calls.append((name, body))
        callback({"choices": [{"index": 0, "finish_reason": "stop", "text": "ok", "delta": {"content": "ok"}}]})

    def handle_chat_completions(self, body: dict[str, Any], callback: Any) -> None:
        self._answer("chat", body, callback)

    def handle_completions(self, body: dict[str, Any], callback: Any) -> None:
        self._answer("completions", body, callback)


def run_one(engine: LlamaCppEngine, request: inference_pb2.GenerateRequest) -> tuple[str, dict[str, Any]]:
    """What _run_choice sends the server for the request's first choice."""
    server = RecordingServer()
    engine._server = server
    body = engine._body(request, 0)
    plain = as_completion(request, body) if engine._prompts is not None else None
    engine.scheduler.admit(1)
    items: list[object] = []
    engine._run_choice(body, plain, ChoiceState(index=0, model="m"), items.append, threading.Event())
    assert items[-1] is DONE
    assert len(server.calls) == 1
    return server.calls[0]


def test_a_plain_chat_sends_the_templated_prompts_ids(smollm2: GgufTokenizer) -> None:
    engine = LlamaCppEngine(InferenceSettings())
    engine._prompts = PromptIds(smollm2)
    request = chat(("system", "Be brief."), ("user", "hi"), client={"top_k": 5})
    name, body = run_one(engine, request)
    assert name == "completions"
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    assert body["prompt"] == smollm2.encode(smollm2.render(messages))
    assert "messages" not in body
    assert (body["max_tokens"], body["temperature"], body["seed"], body["top_k"]) == (8, 0, 3, 5)
    assert body["stream"] is True and body["timings_per_token"] is True


def test_a_counted_conversation_reuses_its_ids(smollm2: GgufTokenizer) -> None:
    prompts = PromptIds(smollm2, size=2)
    messages = [{"role": "user", "content": "a long RAG prompt"}]
    prompt = smollm2.render(messages)
    marked = [*smollm2.encode(prompt)]
    prompts.remember(prompt, marked)
    assert prompts.of(messages) is marked and prompts.hits == 1
    prompts.remember("other 1", [1])
    prompts.remember("other 2", [2])  # the oldest is forgotten past `size`
    assert prompts.of(messages) == marked and prompts.of(messages) is not marked and prompts.hits == 1


async def test_count_many_remembers_what_it_counted_for_generation(smollm2: GgufTokenizer) -> None:
    engine = LlamaCppEngine(InferenceSettings())
    engine._local = smollm2
    engine._prompts = PromptIds(smollm2)
    engine._http = object()  # type: ignore[assignment]  # counted in process: never used
    request = chat(("context", "[1] passage"), ("user", "question"))
    (counted,) = await engine.count_many([inference_pb2.TokenizeInput(chat=request.chat)])
    name, body = run_one(engine, request)
    assert name == "completions" and body["prompt"] is counted and engine._prompts.hits == 1


def test_other_chats_and_an_engine_without_its_tokenizer_use_the_chat_endpoint(smollm2: GgufTokenizer) -> None:
    engine = LlamaCppEngine(InferenceSettings())
    engine._prompts = PromptIds(smollm2)
    name, body = run_one(engine, chat(("user", "hi"), client={"tools": TOOLS}))
    assert name == "chat" and body["tools"] == TOOLS
    engine._prompts = None  # the model's tokenizer is not built here, or counted unlike llama.cpp
    name, body = run_one(engine, chat(("user", "hi")))
    assert name == "chat" and body["messages"] == [{"role": "user", "content": "hi"}]


def test_a_conversation_the_template_refuses_goes_to_the_chat_endpoint(smollm2: GgufTokenizer) -> None:
    def refuse(**_: Any) -> str:
        raise TemplateError("Conversation roles must alternate")

    engine = LlamaCppEngine(InferenceSettings())
    engine._prompts = PromptIds(dataclasses.replace(smollm2, template=refuse))
    name, _ = run_one(engine, chat(("user", "hi")))
    assert name == "chat"  # llama.cpp says why


def test_a_chat_sent_as_a_completion_opens_with_an_empty_chunk_as_the_chat_endpoint_does(
    smollm2: GgufTokenizer,
) -> None:
    engine = LlamaCppEngine(InferenceSettings())
    engine._prompts = PromptIds(smollm2)
    engine._server = RecordingServer()
    request = chat(("user", "hi"))
    body = engine._body(request, 0)
    engine.scheduler.admit(1)
    items: list[object] = []
    engine._run_choice(
        body, as_completion(request, body), ChoiceState(index=0, model="m"), items.append, threading.Event()
    )
    chunks = [i for i in items if isinstance(i, common_pb2.GenerationChunk)]
    assert [c.text for c in chunks[:2]] == ["", "ok"]  # "the prompt was accepted", then the first token
