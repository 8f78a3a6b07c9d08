"""Tool calling on the embedded model through nginx (issue #17), with the openai client and LangChain.

The 135M model chooses tools poorly; what is checked is the contract: well-formed calls whose
arguments validate against the tool's schema, OpenAI's shapes streamed and not, a second turn
with the tool's result, usage and guardrails over the calls."""

from __future__ import annotations

import json
from typing import Any

import httpx
import jsonschema
import pytest
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI
from openai.types.chat import ChatCompletionMessageParam, ChatCompletionToolParam
from pydantic import SecretStr

from .conftest import MODEL, Mesh

pytestmark = pytest.mark.e2e

WEATHER_SCHEMA: dict[str, object] = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 20}, "unit": {"type": "string", "enum": ["c", "f"]}},
    "required": ["city"],
}
GET_WEATHER: ChatCompletionToolParam = {
    "type": "function",
    "function": {"name": "get_weather", "description": "The weather in a city", "parameters": WEATHER_SCHEMA},
}
GET_TIME: ChatCompletionToolParam = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "The time in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 20}},
            "required": ["city"],
        },
    },
}
ASK: list[ChatCompletionMessageParam] = [{"role": "user", "content": "What is the weather in Paris?"}]


def test_required_returns_a_call_matching_the_schema(mesh: Mesh) -> None:
    reply = mesh.openai().chat.completions.create(
        model=MODEL, messages=ASK, tools=[GET_WEATHER], tool_choice="required", max_tokens=100, temperature=0
    )
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls
    for call in choice.message.tool_calls:
        assert call.type == "function" and call.id and call.function.name == "get_weather"
        jsonschema.validate(json.loads(call.function.arguments), WEATHER_SCHEMA)
    assert not choice.message.content
    assert reply.usage is not None and reply.usage.completion_tokens > 0  # the call's tokens are counted


def test_required_streamed_as_tool_call_deltas(mesh: Mesh) -> None:
    stream = mesh.openai().chat.completions.create(
        model=MODEL,
        messages=ASK,
        tools=[GET_WEATHER],
        tool_choice="required",
        parallel_tool_calls=False,
        max_tokens=100,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    calls: dict[int, dict[str, Any]] = {}
    finish = None
    chunks = list(stream)
    for chunk in chunks:
        for choice in chunk.choices:
            finish = choice.finish_reason or finish
            for delta in choice.delta.tool_calls or ():
                merged = calls.setdefault(delta.index, {"id": None, "name": "", "arguments": ""})
                merged["id"] = delta.id or merged["id"]
                if delta.function is not None:
                    merged["name"] += delta.function.name or ""
                    merged["arguments"] += delta.function.arguments or ""
    assert finish == "tool_calls" and list(calls) == [0]  # parallel_tool_calls=False: one call
    assert calls[0]["id"] and calls[0]["name"] == "get_weather"
    jsonschema.validate(json.loads(calls[0]["arguments"]), WEATHER_SCHEMA)
    usage = chunks[-1].usage
    assert usage is not None and usage.completion_tokens > 0


def test_a_named_function_is_the_one_called(mesh: Mesh) -> None:
    reply = mesh.openai().chat.completions.create(
        model=MODEL,
        messages=ASK,
        tools=[GET_WEATHER, GET_TIME],
        tool_choice={"type": "function", "function": {"name": "get_time"}},
        parallel_tool_calls=False,
        max_tokens=100,
        temperature=0,
    )
    calls = [c for c in reply.choices[0].message.tool_calls or () if c.type == "function"]
    assert [c.function.name for c in calls] == ["get_time"]
    assert isinstance(json.loads(calls[0].function.arguments)["city"], str)


def test_none_answers_in_text(mesh: Mesh) -> None:
    reply = mesh.openai().chat.completions.create(
        model=MODEL, messages=ASK, tools=[GET_WEATHER], tool_choice="none", max_tokens=12, temperature=0
    )
    assert reply.choices[0].message.tool_calls is None and reply.choices[0].message.content


def test_a_second_turn_with_the_tool_result_answers(mesh: Mesh) -> None:
    client = mesh.openai()
    first = client.chat.completions.create(
        model=MODEL,
        messages=ASK,
        tools=[GET_WEATHER],
        tool_choice="required",
        parallel_tool_calls=False,
        max_tokens=100,
        temperature=0,
    )
    calls = [c for c in first.choices[0].message.tool_calls or () if c.type == "function"]
    assert len(calls) == 1
    call = calls[0]
    messages: list[ChatCompletionMessageParam] = [
        *ASK,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": call.id,
                    "type": "function",
                    "function": {"name": call.function.name, "arguments": call.function.arguments},
                }
            ],
        },
        {"role": "tool", "tool_call_id": call.id, "content": "Sunny, 21 degrees"},
    ]
    second = client.chat.completions.create(
        model=MODEL, messages=messages, tools=[GET_WEATHER], max_tokens=24, temperature=0
    )
    choice = second.choices[0]
    assert choice.message.content and not choice.message.tool_calls
    assert choice.finish_reason in ("stop", "length")


def test_bad_tool_choices_are_400(mesh: Mesh) -> None:
    body = {
        "model": MODEL,
        "messages": ASK,
        "tools": [GET_WEATHER],
        "tool_choice": {"type": "function", "function": {"name": "nope"}},
    }
    reply = httpx.post(f"{mesh.v1}/chat/completions", json=body, timeout=30)
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "tool_choice"


def test_models_list_says_the_embedded_model_calls_tools(mesh: Mesh) -> None:
    card = httpx.get(f"{mesh.v1}/models/{MODEL}", timeout=30).json()
    assert "tools" in card["capabilities"]


def test_langchain_bind_tools_gets_tool_calls(mesh: Mesh) -> None:
    @tool
    def get_weather(city: str) -> str:
        """The weather in a city."""
        return f"Sunny in {city}"

    llm = ChatOpenAI(
        base_url=mesh.v1, api_key=SecretStr("unused"), model=MODEL, max_completion_tokens=100, temperature=0
    )
    bound = llm.bind_tools([get_weather], tool_choice="required", parallel_tool_calls=False)
    message = bound.invoke("What is the weather in Paris?")
    assert message.tool_calls and message.tool_calls[0]["name"] == "get_weather"
    assert isinstance(message.tool_calls[0]["args"]["city"], str)
    result = get_weather.invoke(message.tool_calls[0])
    answer = llm.bind_tools([get_weather]).invoke(["What is the weather in Paris?", message, result])
    assert isinstance(answer.content, str) and answer.content
