"""Legacy /v1/completions as OpenAI has it (issue #17): prompt lists, token prompts, echo, suffix,
logprobs in the completions shape."""

from __future__ import annotations

import json
from typing import Any

import pytest

from postprocess.session import GuardConfig, ProcessSession
from preprocess.protocol import parse_completion_request
from ragmesh.errors import RagmeshError
from ragmesh.v1 import common_pb2, postprocess_pb2

NO_GUARDS = GuardConfig(pii=())


def body(**kw: Any) -> dict[str, Any]:
    return {"model": "m", **kw}


def test_a_list_of_prompts_is_accepted() -> None:
    # Before issue #17: 400 "Send one prompt per request".
    request = parse_completion_request(body(prompt=["a", "b", "c"]), 8)
    assert request.prompts() == ["a", "b", "c"]


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        ([1, 2, 3], [[1, 2, 3]]),
        ([[1, 2], [3, 4]], [[1, 2], [3, 4]]),
        ("one", ["one"]),
    ],
)
def test_token_prompts_are_accepted(prompt: Any, expected: list[Any]) -> None:
    assert parse_completion_request(body(prompt=prompt), 8).prompts() == expected


@pytest.mark.parametrize(
    ("patch", "param"),
    [
        ({"prompt": []}, "prompt"),
        ({"prompt": [[]]}, "prompt"),
        ({"prompt": ["a"] * 65}, "prompt"),
        ({"prompt": [1, 2], "echo": True}, "echo"),
        ({"best_of": 2}, "best_of"),
    ],
)
def test_bad_prompts_name_their_parameter(patch: dict[str, Any], param: str) -> None:
    with pytest.raises(RagmeshError) as caught:
        parse_completion_request(body(**{"prompt": "x", **patch}), 8)
    assert caught.value.http_status == 400 and caught.value.param == param


def test_echo_is_accepted() -> None:
    # Before issue #17: 400 "'echo' is not supported".
    assert parse_completion_request(body(prompt="x", echo=True), 8).echo is True


def _text_start(**kw: Any) -> postprocess_pb2.ProcessStart:
    return postprocess_pb2.ProcessStart(
        id="cmpl-1", model="m", created=7, n=1, object=postprocess_pb2.OBJECT_KIND_TEXT_COMPLETION, **kw
    )


def _lp(token: str, logprob: float, alt: str, alt_lp: float) -> dict[str, Any]:
    return {
        "token": token,
        "logprob": logprob,
        "top_logprobs": [{"token": token, "logprob": logprob}, {"token": alt, "logprob": alt_lp}],
    }


CHUNKS = [
    common_pb2.GenerationChunk(
        text=",", prompt_tokens=4, extra_json=json.dumps({"logprobs": {"content": [_lp(",", -0.1, " in", -4.2)]}})
    ),
    common_pb2.GenerationChunk(
        text=" the", extra_json=json.dumps({"logprobs": {"content": [_lp(" the", -1.8, " I", -2.2)]}})
    ),
    common_pb2.GenerationChunk(completion_tokens=2, finish_reason=common_pb2.FINISH_REASON_LENGTH),
]


def _feed(session: ProcessSession) -> list[postprocess_pb2.ProcessResponse]:
    out: list[postprocess_pb2.ProcessResponse] = []
    for c in CHUNKS:
        out.extend(session.feed(c))
    return out


def test_completion_logprobs_come_in_the_completions_shape() -> None:
    # Before issue #17 they came in the chat shape ({"content": [...]}).
    whole = json.loads(_feed(ProcessSession(_text_start(), NO_GUARDS))[-1].response_json)
    choice = whole["choices"][0]
    assert choice["text"] == ", the"
    assert choice["logprobs"] == {
        "tokens": [",", " the"],
        "token_logprobs": [-0.1, -1.8],
        "top_logprobs": [{",": -0.1, " in": -4.2}, {" the": -1.8, " I": -2.2}],
        "text_offset": [0, 1],
    }


def test_streamed_completion_logprobs_carry_their_offsets() -> None:
    streamed = [
        json.loads(r.chunk_json) for r in _feed(ProcessSession(_text_start(stream=True), NO_GUARDS)) if r.chunk_json
    ]
    with_logprobs = [c["choices"][0]["logprobs"] for c in streamed if c["choices"][0]["logprobs"]]
    assert with_logprobs == [
        {"tokens": [","], "token_logprobs": [-0.1], "top_logprobs": [{",": -0.1, " in": -4.2}], "text_offset": [0]},
        {
            "tokens": [" the"],
            "token_logprobs": [-1.8],
            "top_logprobs": [{" the": -1.8, " I": -2.2}],
            "text_offset": [1],
        },
    ]


def test_echo_puts_the_prompt_and_its_tokens_first() -> None:
    start = _text_start(echo="Once upon", echo_tokens=["Once", " upon"])
    whole = json.loads(_feed(ProcessSession(start, NO_GUARDS))[-1].response_json)
    choice = whole["choices"][0]
    assert choice["text"] == "Once upon, the"
    assert choice["logprobs"]["tokens"] == ["Once", " upon", ",", " the"]
    assert choice["logprobs"]["token_logprobs"] == [None, None, -0.1, -1.8]
    assert choice["logprobs"]["text_offset"] == [0, 4, 9, 10]
    streamed = [
        json.loads(r.chunk_json)
        for r in _feed(ProcessSession(_text_start(stream=True, echo="Once upon"), NO_GUARDS))
        if r.chunk_json
    ]
    assert "".join(c["choices"][0]["text"] for c in streamed) == "Once upon, the"
