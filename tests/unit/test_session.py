"""ProcessSession: generation chunks in, OpenAI chunks and responses out."""

from __future__ import annotations

import json
from typing import Any

import pytest

from postprocess.session import ProcessSession
from ragmesh.errors import RagmeshError
from ragmesh.v1 import common_pb2, postprocess_pb2


def start(**kw: Any) -> postprocess_pb2.ProcessStart:
    base: dict[str, Any] = {"id": "chatcmpl-1", "model": "m", "created": 7, "n": 1}
    base.update(kw)
    return postprocess_pb2.ProcessStart(**base)


def chunk(
    text: str = "",
    tokens: int = 0,
    finish: common_pb2.FinishReason.ValueType = common_pb2.FINISH_REASON_UNSPECIFIED,
    index: int = 0,
    prompt: int = 5,
) -> common_pb2.GenerationChunk:
    return common_pb2.GenerationChunk(
        index=index, text=text, completion_tokens=tokens, prompt_tokens=prompt, finish_reason=finish
    )


def feed_all(
    session: ProcessSession, chunks: list[common_pb2.GenerationChunk]
) -> list[postprocess_pb2.ProcessResponse]:
    out = []
    for c in chunks:
        out.extend(session.feed(c))
    return out


def test_stream_chunks_have_openai_shape_and_usage_comes_last() -> None:
    session = ProcessSession(start(stream=True, include_usage=True))
    out = feed_all(
        session,
        [chunk(), chunk("Hel", 1), chunk("lo", 2), chunk("", 2, common_pb2.FINISH_REASON_LENGTH)],
    )
    bodies = [json.loads(r.chunk_json) for r in out]
    assert bodies[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert [b["choices"][0]["delta"].get("content") for b in bodies[1:3]] == ["Hel", "lo"]
    assert bodies[3]["choices"][0]["finish_reason"] == "length"
    assert all(b["usage"] is None for b in bodies[:4])
    assert bodies[4]["choices"] == []
    assert bodies[4]["usage"]["completion_tokens"] == 2
    assert bodies[4]["usage"]["total_tokens"] == 7
    assert out[-1].generation_done and not any(r.generation_done for r in out[:-1])
    assert all(b["object"] == "chat.completion.chunk" and b["id"] == "chatcmpl-1" for b in bodies)


def test_stop_sequence_ends_the_answer_and_later_chunks_are_ignored() -> None:
    session = ProcessSession(start(stream=False, stop=["\n\n"]))
    out = feed_all(session, [chunk(), chunk("Answer\n", 1), chunk("\nMore", 2)])
    assert session.done
    body = json.loads(out[-1].response_json)
    assert body["choices"][0]["message"]["content"] == "Answer"
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"]["completion_tokens"] == 2
    assert session.feed(chunk("ignored", 3)) == []


def test_non_stream_response_waits_for_every_choice() -> None:
    session = ProcessSession(start(stream=False, n=2))
    first = feed_all(session, [chunk("a", 1, index=0), chunk("", 1, common_pb2.FINISH_REASON_STOP, index=0)])
    assert first == [] and not session.done
    out = session.feed(chunk("b", 1, common_pb2.FINISH_REASON_STOP, index=1))
    body = json.loads(out[-1].response_json)
    assert [c["message"]["content"] for c in body["choices"]] == ["a", "b"]
    assert body["usage"]["completion_tokens"] == 2


def test_text_completion_shape() -> None:
    session = ProcessSession(start(stream=False, object=postprocess_pb2.OBJECT_KIND_TEXT_COMPLETION))
    out = feed_all(session, [chunk("x", 1, common_pb2.FINISH_REASON_LENGTH)])
    body = json.loads(out[-1].response_json)
    assert body["object"] == "text_completion"
    assert body["choices"][0]["text"] == "x"


def test_more_than_four_stops_is_refused() -> None:
    with pytest.raises(RagmeshError) as info:
        ProcessSession(start(stop=["a", "b", "c", "d", "e"]))
    assert info.value.http_status == 400


def test_out_of_range_choice_index_is_refused() -> None:
    session = ProcessSession(start())
    with pytest.raises(RagmeshError):
        session.feed(chunk("x", index=3))
