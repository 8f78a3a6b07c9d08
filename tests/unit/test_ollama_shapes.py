"""Ollama's bodies to the mesh's OpenAI requests and back (serving.ollama), without a mesh."""

from __future__ import annotations

import datetime
import json
import re
from collections.abc import AsyncIterator
from typing import Any

import pytest

from preprocess.protocol import ChatCompletionRequest, CompletionRequest
from preprocess.serving import ollama, ollama_answers
from preprocess.settings import PreprocessSettings
from ragmesh.errors import RagmeshError

SETTINGS = PreprocessSettings()


def test_options_and_format_map_to_openai_fields() -> None:
    body = {
        "model": "m",
        "messages": [{"role": "user", "content": "hi"}],
        "options": {"temperature": 0.2, "num_predict": 7, "stop": ["x"], "seed": 3, "top_k": 5, "num_ctx": 99999},
        "format": {"type": "object", "properties": {"a": {"type": "string"}}},
        "keep_alive": "5m",
    }
    req = ollama.chat_request(body, SETTINGS)
    assert (req.temperature, req.max_tokens, req.stop, req.seed) == (0.2, 7, ["x"], 3)
    assert req.model_extra is not None and req.model_extra["top_k"] == 5 and "num_ctx" not in req.model_extra
    assert req.response_format is not None and req.response_format.type == "json_schema"
    assert req.stream and req.stream_options is not None and req.stream_options.include_usage
    as_json = ollama.chat_request({**body, "format": "json", "stream": False}, SETTINGS)
    assert as_json.response_format is not None and as_json.response_format.type == "json_object"
    assert not as_json.stream and as_json.stream_options is None
    with pytest.raises(RagmeshError) as caught:
        ollama.chat_request({**body, "format": "yaml"}, SETTINGS)
    assert caught.value.param == "format"


def test_images_and_tool_turns_become_openai_messages() -> None:
    body = {
        "model": "m",
        "messages": [
            {"role": "user", "content": "what is this?", "images": ["/9j/AAAA"]},
            {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "f", "arguments": {"a": 1}}}]},
            {"role": "tool", "content": "42", "tool_name": "f"},
        ],
    }
    req = ollama.chat_request(body, SETTINGS)
    first = req.messages[0].content
    assert isinstance(first, list) and first[1]["image_url"]["url"] == "data:image/jpeg;base64,/9j/AAAA"
    call = (req.messages[1].model_extra or {})["tool_calls"][0]
    assert call["function"] == {"name": "f", "arguments": '{"a":1}'} and req.messages[1].content is None
    assert (req.messages[2].model_extra or {})["tool_call_id"] == call["id"]


def test_generate_is_a_chat_turn_unless_raw_and_empty_prompt_loads() -> None:
    _, chat = ollama.generate_request({"model": "m", "prompt": "p", "system": "s"}, SETTINGS)
    assert isinstance(chat, ChatCompletionRequest) and [m.role for m in chat.messages] == ["system", "user"]
    _, raw = ollama.generate_request({"model": "m", "prompt": "p", "raw": True}, SETTINGS)
    assert isinstance(raw, CompletionRequest) and raw.prompt == "p" and raw.max_tokens is None
    assert ollama.generate_request({"model": "m"}, SETTINGS)[1] is None
    with pytest.raises(RagmeshError) as caught:
        ollama.generate_request({"model": "m", "prompt": "p", "suffix": "q"}, SETTINGS)
    assert caught.value.param == "suffix"


def test_latest_tag_resolves_to_the_served_name() -> None:
    assert ollama.model_name("m:latest", {"m"}) == "m"
    assert ollama.model_name("m:latest", {"m:latest"}) == "m:latest"
    assert ollama.model_name("m:latest", None) == "m:latest"


async def _events(events: list[dict[str, Any]]) -> AsyncIterator[str]:
    for event in events:
        yield json.dumps(event)


async def test_ndjson_lines_stream_text_then_whole_tool_calls_then_done() -> None:
    events: list[dict[str, Any]] = [
        {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]},
        {"choices": [{"index": 0, "delta": {"content": "He"}}]},
        {
            "choices": [
                {
                    "index": 0,
                    "delta": {"tool_calls": [{"index": 0, "id": "c1", "function": {"name": "f", "arguments": '{"a"'}}]},
                }
            ]
        },
        {"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": ": 1}"}}]}}]},
        {"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]},
        {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}},
    ]
    lines = [json.loads(line) async for line in ollama_answers.ndjson_lines(_events(events), "m", True, 0.0)]
    assert [line["done"] for line in lines] == [False, False, True]
    assert lines[0]["message"] == {"role": "assistant", "content": "He"}
    assert lines[1]["message"]["tool_calls"] == [{"id": "c1", "function": {"name": "f", "arguments": {"a": 1}}}]
    assert (lines[2]["prompt_eval_count"], lines[2]["eval_count"], lines[2]["done_reason"]) == (3, 4, "stop")


async def test_ndjson_done_line_keeps_the_last_chunks_citations_and_rag() -> None:
    citations = [{"index": 1, "document_id": "d", "chunk_id": "d:0", "title": "", "score": 1.0, "snippet": "s"}]
    events: list[dict[str, Any]] = [
        {"choices": [{"index": 0, "delta": {"content": "Yes [1]."}}]},
        {
            "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
            "citations": citations,
            "rag": {"collection": "c", "status": "ok"},
        },
        {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}},
    ]
    lines = [json.loads(line) async for line in ollama_answers.ndjson_lines(_events(events), "m", False, 0.0)]
    assert [line["response"] for line in lines] == ["Yes [1].", ""]
    assert lines[-1]["citations"] == citations
    assert lines[-1]["rag"] == {"collection": "c", "status": "ok"}
    assert "citations" not in lines[0]


def test_created_at_is_rfc3339_utc_with_microseconds() -> None:
    before = datetime.datetime.now(datetime.UTC)
    stamps = [ollama_answers.created_at() for _ in range(3)]
    after = datetime.datetime.now(datetime.UTC)
    for stamp in stamps:
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", stamp), stamp
        # The second formatted once and reused, the microseconds fresh: still within the calls around it.
        at = datetime.datetime.fromisoformat(stamp)
        assert before - datetime.timedelta(microseconds=1) <= at <= after + datetime.timedelta(microseconds=1)
