"""Chat request validation: every bad input is a 400 naming the parameter."""

from __future__ import annotations

from typing import Any

import pytest

from preprocess.protocol import parse_chat_request
from preprocess.serving.chat import to_generate_request, to_process_start
from ragmesh.errors import RagmeshError

OK: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def bad(body: Any) -> RagmeshError:
    with pytest.raises(RagmeshError) as info:
        parse_chat_request(body, max_n=8)
    assert info.value.http_status == 400
    return info.value


@pytest.mark.parametrize(
    ("patch", "param"),
    [
        ({"messages": None}, "messages"),
        ({"messages": "hello"}, "messages"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
        ({"messages": [{"role": "user", "content": {"text": "x"}}]}, "messages[0].content"),
        ({"messages": [{"role": "user", "content": [{"type": "text", "text": 3}]}]}, "messages[0].content[0].text"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
            "messages[0].content[0].image_url",
        ),
        ({"messages": [{"role": "user"}]}, "messages[0].content"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": -3}, "max_tokens"),
        ({"max_completion_tokens": 0}, "max_completion_tokens"),
        ({"temperature": 3}, "temperature"),
        ({"top_p": 1.5}, "top_p"),
        ({"n": 9}, "n"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"stop": [1]}, "stop[0]"),
        ({"stop": ""}, "stop"),
        ({"stream": "yes"}, "stream"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),
        ({"top_logprobs": 3}, "top_logprobs"),
        ({"model": 3}, "model"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": 12}}}},
            "response_format.json_schema.schema",
        ),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"type": "object", "required": "name"}},
                }
            },
            "response_format.json_schema.schema",
        ),
    ],
)
def test_bad_fields_name_their_parameter(patch: dict[str, Any], param: str) -> None:
    body = {**OK, **patch}
    body = {k: v for k, v in body.items() if v is not None}
    err = bad(body)
    assert err.param == param, err.message
    assert err.to_openai()["error"]["type"] == "invalid_request_error"


def test_a_valid_json_schema_passes() -> None:
    schema = {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}
    request = parse_chat_request(
        {**OK, "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}}, max_n=8
    )
    assert request.response_format is not None and request.response_format.json_schema is not None
    assert request.response_format.json_schema.schema_ == schema


def test_missing_model_and_messages() -> None:
    assert bad({"messages": OK["messages"]}).param == "model"
    assert bad({"model": "m"}).code == "missing_required_parameter"


def test_body_must_be_an_object() -> None:
    bad([1, 2])


def test_valid_request_maps_to_generate_and_process_start() -> None:
    body = {
        **OK,
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "caf"}, {"type": "text", "text": "e\u0301\x00"}]},
        ],
        "max_tokens": 9,
        "max_completion_tokens": 4,
        "temperature": 0,
        "top_p": 0.5,
        "seed": 11,
        "stop": "END",
        "stream": True,
        "stream_options": {"include_usage": True},
        "unknown_future_field": {"x": 1},
    }
    chat = parse_chat_request(body, max_n=8)
    gen = to_generate_request(chat)
    assert [m.content for m in gen.chat.messages] == ["be brief", "café"]
    assert gen.sampling.max_tokens == 4  # max_completion_tokens wins
    assert gen.sampling.HasField("temperature") and gen.sampling.temperature == 0
    assert gen.sampling.seed == 11 and gen.sampling.n == 1
    start = to_process_start(chat)
    assert list(start.stop) == ["END"] and start.stream and start.include_usage
    assert start.id.startswith("chatcmpl-")


def test_unset_sampling_fields_stay_unset() -> None:
    gen = to_generate_request(parse_chat_request(OK, max_n=8))
    for field in ("max_tokens", "temperature", "top_p", "seed"):
        assert not gen.sampling.HasField(field)


def test_bounds_on_stops_schemas_and_logprobs_under_guardrails() -> None:
    from preprocess.protocol import RequestBounds, parse_chat_request, parse_completion_request

    base = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    bounds = RequestBounds(max_stop_chars=8, max_schema_bytes=200, max_schema_depth=4, guardrails=True)
    for body, param in (
        ({**base, "stop": ["x" * 9]}, "stop"),
        ({**base, "logprobs": True}, "logprobs"),
        (
            {
                **base,
                "response_format": {"type": "json_schema", "json_schema": {"schema": {"a": {"b": {"c": {"d": {}}}}}}},
            },
            "response_format.json_schema.schema",
        ),
    ):
        with pytest.raises(RagmeshError) as caught:
            parse_chat_request(body, 8, bounds=bounds)
        assert caught.value.param == param
    with pytest.raises(RagmeshError) as caught:
        parse_completion_request({"model": "m", "prompt": "p", "logprobs": 1}, 8, bounds=bounds)
    assert caught.value.param == "logprobs"
    # Without guardrails logprobs are an ordinary parameter.
    open_bounds = RequestBounds(guardrails=False)
    assert parse_chat_request({**base, "logprobs": True}, 8, bounds=open_bounds).logprobs is True
