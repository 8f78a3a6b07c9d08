"""GenerateRequest has one authority: its typed fields, for the embedded and the upstream engine alike."""

from __future__ import annotations

import json
from typing import Any

import pytest

from inference.engine import LlamaCppEngine
from inference.settings import InferenceSettings
from inference.upstream import openai_request
from ragmesh.errors import RagmeshError
from ragmesh.v1 import common_pb2, inference_pb2

# What the client sent (passed through as openai_json) disagrees with the typed fields on
# every point a typed field covers; the typed fields must win everywhere.
CLIENT_BODY: dict[str, Any] = {
    "model": "client-alias",
    "messages": [
        {"role": "user", "content": "stale question"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function"}]},
        {"role": "tool", "content": "stale result", "tool_call_id": "c1"},
    ],
    "max_completion_tokens": 100,
    "temperature": 1.5,
    "top_p": 0.1,
    "seed": 1,
    "n": 3,
    "response_format": {"type": "json_object"},
    "tools": [{"type": "function", "function": {"name": "weather"}}],
    "logprobs": True,
    "user": "u-1",
}


def typed_request() -> inference_pb2.GenerateRequest:
    return inference_pb2.GenerateRequest(
        model="served-model",
        chat=inference_pb2.ChatInput(
            messages=[
                common_pb2.ChatMessage(role="user", content="fresh question"),
                common_pb2.ChatMessage(role="assistant", content=""),
                common_pb2.ChatMessage(role="tool", content="fresh result"),
            ]
        ),
        sampling=inference_pb2.SamplingParams(max_tokens=7, temperature=0.5, seed=42, n=1),
        openai_json=json.dumps(CLIENT_BODY),
    )


def test_upstream_body_takes_typed_fields_and_only_the_rest_from_the_client() -> None:
    body = openai_request(typed_request(), "served-model")
    assert body["model"] == "served-model"
    assert [m["content"] for m in body["messages"]] == ["fresh question", None, "fresh result"]
    assert body["messages"][1]["tool_calls"] == [{"id": "c1", "type": "function"}]  # no typed field for these
    assert body["messages"][2]["tool_call_id"] == "c1"
    assert body["max_completion_tokens"] == 7 and "max_tokens" not in body  # the client's spelling, typed value
    assert (body["temperature"], body["seed"]) == (0.5, 42)
    assert "top_p" not in body and "n" not in body and "response_format" not in body  # typed: unset
    assert body["tools"] == CLIENT_BODY["tools"] and body["logprobs"] is True and body["user"] == "u-1"


def test_embedded_body_takes_the_same_typed_fields() -> None:
    engine = LlamaCppEngine(InferenceSettings())
    body = engine._body(typed_request(), 0)
    assert [m["content"] for m in body["messages"]] == ["fresh question", "", "fresh result"]
    assert (body["max_tokens"], body["temperature"], body["seed"]) == (7, 0.5, 42)
    assert "top_p" not in body and "response_format" not in body and "n" not in body
    assert body["logprobs"] is True  # llama.cpp's extras still pass through


def test_typed_response_format_and_prompt_win_for_completions() -> None:
    request = inference_pb2.GenerateRequest(
        model="m",
        prompt="typed prompt",
        sampling=inference_pb2.SamplingParams(max_tokens=3, n=2),
        response_format_json=json.dumps({"type": "json_object"}),
        openai_json=json.dumps({"prompt": "raw prompt", "max_tokens": 50, "n": 5, "response_format": {"type": "text"}}),
    )
    body = openai_request(request, "m")
    assert body["prompt"] == "typed prompt" and body["max_tokens"] == 3 and body["n"] == 2
    assert body["response_format"] == {"type": "json_object"}
    embedded = LlamaCppEngine(InferenceSettings())._body(request, 0)
    assert embedded["prompt"] == "typed prompt" and embedded["max_tokens"] == 3
    assert embedded["response_format"] == {"type": "json_object"}


@pytest.mark.parametrize(
    "field", ["n_predict", "ignore_eos", "id_slot", "samplers", "grammar", "n_probs", "cache_prompt"]
)
def test_llamacpp_internal_fields_are_a_400_naming_them(field: str) -> None:
    from inference.llamacpp_body import client_fields

    request = inference_pb2.GenerateRequest(model="m", prompt="p", openai_json=json.dumps({"max_tokens": 5, field: 1}))
    with pytest.raises(RagmeshError) as caught:
        client_fields(request)
    assert caught.value.param == field and caught.value.http_status == 400


def test_only_allow_listed_client_fields_reach_the_engine() -> None:
    from inference.llamacpp_body import client_fields

    sent = {"logprobs": True, "top_k": 5, "some_future_field": 1, "max_tokens": 5, "temperature": 2}
    request = inference_pb2.GenerateRequest(model="m", prompt="p", openai_json=json.dumps(sent))
    assert client_fields(request) == {"logprobs": True, "top_k": 5}
