"""Tool calling on the embedded engine (issue #17): request shaping, validation, guardrails on arguments."""

from __future__ import annotations

import json
from typing import Any

import pytest

from inference.llamacpp_body import chat_messages
from inference.tools import tool_request
from postprocess.session import GuardConfig, ProcessSession
from preprocess.protocol import parse_chat_request
from ragmesh.errors import RagmeshError
from ragmesh.v1 import common_pb2, postprocess_pb2

WEATHER = {
    "type": "function",
    "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}},
}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}


def test_required_prefills_the_call_marker_and_auto_does_not() -> None:
    fields, prefill = tool_request({"tools": [WEATHER], "tool_choice": "required"}, "<tool_call>\n")
    assert fields == {"tools": [WEATHER], "tool_choice": "required"} and prefill == "<tool_call>\n"
    fields, prefill = tool_request({"tools": [WEATHER]}, "<tool_call>\n")
    assert fields["tool_choice"] == "auto" and prefill == ""
    assert tool_request({"tools": [WEATHER], "tool_choice": "none"}, "<tool_call>\n")[1] == ""
    assert tool_request({}, "<tool_call>\n") == ({}, "")


def test_a_named_function_is_that_tool_required() -> None:
    named = {"type": "function", "function": {"name": "get_time"}}
    fields, prefill = tool_request(
        {"tools": [WEATHER, TIME], "tool_choice": named, "parallel_tool_calls": False}, "<tool_call>\n"
    )
    assert fields == {"tools": [TIME], "tool_choice": "required", "parallel_tool_calls": False}
    assert prefill == "<tool_call>\n"
    with pytest.raises(RagmeshError):
        tool_request({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "x"}}}, "")


def test_legacy_functions_are_tools() -> None:
    fields, _ = tool_request({"functions": [TIME["function"]], "function_call": {"name": "get_time"}}, "<t>")
    assert fields["tools"] == [TIME] and fields["tool_choice"] == "required"


class _Typed:
    def __init__(self, role: str, content: str = "") -> None:
        self.role, self.content, self.name = role, content, ""


def test_messages_carry_calls_and_call_ids_to_the_template() -> None:
    call = {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}
    raw = [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "content": "Sunny", "tool_call_id": "c1"},
    ]
    typed = [_Typed("user", "Weather?"), _Typed("assistant"), _Typed("tool", "Sunny")]
    out = chat_messages(typed, raw)
    assert out[1]["tool_calls"] == [call] and out[2]["tool_call_id"] == "c1"
    # RAG rewrote the conversation (other length): the typed messages alone.
    assert "tool_calls" not in chat_messages(typed, raw[:2])[1]


@pytest.mark.parametrize(
    ("patch", "param"),
    [
        ({"tool_choice": "auto"}, "tool_choice"),
        ({"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice"),
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ({"tools": [{"type": "function"}]}, "tools[0]"),
        (
            {"tools": [{"type": "function", "function": {"name": "f", "parameters": "x"}}]},
            "tools[0].function.parameters",
        ),
    ],
)
def test_bad_tools_name_their_parameter(patch: dict[str, Any], param: str) -> None:
    with pytest.raises(RagmeshError) as caught:
        parse_chat_request({"model": "m", "messages": [{"role": "user", "content": "x"}], **patch}, 8)
    assert caught.value.http_status == 400 and caught.value.param == param


def _call_chunk(arguments: str, finish: bool = False, name: str = "") -> common_pb2.GenerationChunk:
    call: dict[str, Any] = {"index": 0, "function": {"arguments": arguments}}
    if name:
        call.update({"id": "c1", "type": "function", "function": {"name": name, "arguments": arguments}})
    return common_pb2.GenerationChunk(
        extra_json=json.dumps({"tool_calls": [call]}),
        completion_tokens=5,
        finish_reason=common_pb2.FINISH_REASON_TOOL_CALLS if finish else common_pb2.FINISH_REASON_UNSPECIFIED,
    )


def test_tool_call_arguments_pass_the_guardrails_streamed_and_whole() -> None:
    chunks = [
        _call_chunk('{"to": "jane.doe@exa', name="send"),
        _call_chunk('mple.com", "x": 1}'),
        _call_chunk("", True),
    ]
    for stream in (False, True):
        session = ProcessSession(postprocess_pb2.ProcessStart(id="c", model="m", n=1, stream=stream), GuardConfig())
        out = [r for c in chunks for r in session.feed(c)]
        if stream:
            deltas = [json.loads(r.chunk_json)["choices"][0]["delta"] for r in out if r.chunk_json]
            arguments = "".join(
                call["function"].get("arguments", "") for d in deltas for call in d.get("tool_calls", [])
            )
            finish = [json.loads(r.chunk_json)["choices"][0]["finish_reason"] for r in out if r.chunk_json][-1]
        else:
            choice = json.loads(out[-1].response_json)["choices"][0]
            arguments = choice["message"]["tool_calls"][0]["function"]["arguments"]
            finish = choice["finish_reason"]
        assert "jane.doe" not in arguments and json.loads(arguments) == {"to": "[email redacted]", "x": 1}
        assert finish == "tool_calls"


def test_a_blocklisted_term_in_arguments_ends_the_answer() -> None:
    session = ProcessSession(
        postprocess_pb2.ProcessStart(id="c", model="m", n=1), GuardConfig(pii=(), blocklist=("secret plan",))
    )
    out = [
        r
        for c in (_call_chunk('{"q": "the secret plan is', name="f"), _call_chunk(' here"}', True))
        for r in session.feed(c)
    ]
    choice = json.loads(out[-1].response_json)["choices"][0]
    assert choice["finish_reason"] == "content_filter"
    assert "secret plan" not in choice["message"]["tool_calls"][0]["function"]["arguments"]
