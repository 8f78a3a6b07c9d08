"""ProcessSession: generation chunks in, OpenAI chunks and responses out."""

from __future__ import annotations

import json
from typing import Any

import pytest

from postprocess.session import GuardConfig, ProcessSession
from ragmesh.errors import RagmeshError
from ragmesh.v1 import common_pb2, postprocess_pb2

NO_GUARDS = GuardConfig(pii=())


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
    session = ProcessSession(start(stream=True, include_usage=True), NO_GUARDS)
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


def rag_start(**kw: Any) -> postprocess_pb2.ProcessStart:
    s = start(**kw)
    for i, doc in enumerate(["d1", "d2", "d3"], start=1):
        s.sources.add(index=i, document_id=doc, chunk_id=f"{doc}#0", title=doc.upper(), score=1.0 / i, snippet="...")
    s.rag.collection = "facts"
    s.rag.status = "ok"
    s.rag.context_tokens = 120
    s.rag.passages_used = 3
    return s


def test_citations_mark_the_sources_the_answer_cites() -> None:
    session = ProcessSession(rag_start(stream=False))
    out = feed_all(session, [chunk("Tides follow the moon [1], [3", 5), chunk("].", 7, common_pb2.FINISH_REASON_STOP)])
    body = json.loads(out[-1].response_json)
    assert [(c["document_id"], c["cited"]) for c in body["citations"]] == [("d1", True), ("d2", False), ("d3", True)]
    assert body["rag"]["collection"] == "facts" and body["rag"]["passages_used"] == 3
    assert body["usage"]["prompt_tokens_details"]["retrieval_tokens"] == 120


def test_citations_carry_the_rerank_score_when_the_passages_were_reranked() -> None:
    s = rag_start(stream=False)
    s.sources[0].rerank_score = 0.75
    s.rag.rerank, s.rag.rerank_model, s.rag.rerank_candidates = "ok", "tiny", 12
    session = ProcessSession(s)
    out = feed_all(session, [chunk("Yes [1].", 3, common_pb2.FINISH_REASON_STOP)])
    body = json.loads(out[-1].response_json)
    assert body["citations"][0]["rerank_score"] == 0.75 and body["citations"][0]["score"] == 1.0
    assert "rerank_score" not in body["citations"][1]
    assert (body["rag"]["rerank"], body["rag"]["rerank_model"], body["rag"]["rerank_candidates"]) == ("ok", "tiny", 12)


def test_streamed_citations_ride_on_the_last_chunk_with_choices() -> None:
    session = ProcessSession(rag_start(stream=True, include_usage=True))
    out = feed_all(session, [chunk(), chunk("See [2]", 2), chunk(".", 3, common_pb2.FINISH_REASON_STOP)])
    bodies = [json.loads(r.chunk_json) for r in out if r.chunk_json]
    with_choices = [b for b in bodies if b["choices"]]
    assert all("citations" not in b for b in with_choices[:-1])
    assert [c["cited"] for c in with_choices[-1]["citations"]] == [False, True, False]
    assert "citations" not in bodies[-1]  # the usage chunk


def test_pii_is_redacted_in_the_stream_and_the_answer() -> None:
    session = ProcessSession(start(stream=False))
    out = feed_all(session, [chunk("Mail bob@exa", 1), chunk("mple.org now", 2, common_pb2.FINISH_REASON_STOP)])
    assert json.loads(out[-1].response_json)["choices"][0]["message"]["content"] == "Mail [email redacted] now"


def test_blocklist_ends_the_answer_with_content_filter() -> None:
    session = ProcessSession(start(stream=False), GuardConfig(pii=(), blocklist=("launch codes",)))
    out = feed_all(session, [chunk("Here are the launch", 1), chunk(" codes: 1234", 2), chunk(" more", 3)])
    choice = json.loads(out[-1].response_json)["choices"][0]
    assert choice["finish_reason"] == "content_filter" and choice["message"]["content"] == "Here are the "


@pytest.mark.parametrize(
    ("fmt", "text", "ok"),
    [
        (postprocess_pb2.ResponseFormat(type="json_object"), '{"a": 1}', True),
        (postprocess_pb2.ResponseFormat(type="json_object"), "not json", False),
        (postprocess_pb2.ResponseFormat(type="json_object"), "[1, 2]", False),
        (
            postprocess_pb2.ResponseFormat(type="json_schema", schema_json='{"type": "object", "required": ["a"]}'),
            '{"b": 1}',
            False,
        ),
        (
            postprocess_pb2.ResponseFormat(type="json_schema", schema_json='{"type": "object", "required": ["a"]}'),
            '{"a": 1}',
            True,
        ),
    ],
)
def test_response_format_is_checked_at_the_end(fmt: postprocess_pb2.ResponseFormat, text: str, ok: bool) -> None:
    session = ProcessSession(start(stream=False, response_format=fmt), NO_GUARDS)
    if ok:
        body = json.loads(feed_all(session, [chunk(text, 3, common_pb2.FINISH_REASON_STOP)])[-1].response_json)
        assert body["choices"][0]["message"]["content"] == text
    else:
        with pytest.raises(RagmeshError) as info:
            feed_all(session, [chunk(text, 3, common_pb2.FINISH_REASON_STOP)])
        assert info.value.code == "response_format_violation" and info.value.param == "response_format"


def test_truncated_json_is_left_to_finish_reason_length() -> None:
    fmt = postprocess_pb2.ResponseFormat(type="json_object")
    session = ProcessSession(start(stream=False, response_format=fmt), NO_GUARDS)
    body = json.loads(feed_all(session, [chunk('{"a": ', 3, common_pb2.FINISH_REASON_LENGTH)])[-1].response_json)
    assert body["choices"][0]["finish_reason"] == "length"


def test_cache_record_replays_as_stream_and_as_response() -> None:
    first = ProcessSession(rag_start(stream=False, cache_key="k"), NO_GUARDS)
    feed_all(first, [chunk("Answer [1].", 4, common_pb2.FINISH_REASON_STOP)])
    record = first.cache_record()
    whole = json.loads(
        ProcessSession(rag_start(stream=False, cache_key="k", id="chatcmpl-2"), NO_GUARDS)
        .replay(record)[-1]
        .response_json
    )
    assert whole["id"] == "chatcmpl-2" and whole["cached"] is True
    assert whole["choices"][0]["message"]["content"] == "Answer [1]." and whole["usage"]["completion_tokens"] == 4
    assert whole["citations"][0]["cited"] is True
    streamed = ProcessSession(rag_start(stream=True, include_usage=True, cache_key="k"), NO_GUARDS).replay(record)
    bodies = [json.loads(r.chunk_json) for r in streamed if r.chunk_json]
    text = "".join(b["choices"][0]["delta"].get("content", "") for b in bodies if b["choices"])
    assert text == "Answer [1]." and bodies[-1]["usage"]["completion_tokens"] == 4
    assert [b for b in bodies if b["choices"]][-1]["cached"] is True and streamed[-1].generation_done


def test_tool_calls_and_logprobs_pass_through_and_merge() -> None:
    call_a = {
        "tool_calls": [
            {"index": 0, "id": "call_1", "type": "function", "function": {"name": "get_", "arguments": '{"ci'}}
        ]
    }
    call_b = {"tool_calls": [{"index": 0, "function": {"name": "weather", "arguments": 'ty": "Paris"}'}}]}
    logprobs = {"logprobs": {"content": [{"token": "x", "logprob": -0.1}]}}
    chunks = [
        common_pb2.GenerationChunk(extra_json=json.dumps(call_a), prompt_tokens=3),
        common_pb2.GenerationChunk(extra_json=json.dumps({**call_b, **logprobs})),
        common_pb2.GenerationChunk(
            completion_tokens=4, finish_reason=common_pb2.FINISH_REASON_TOOL_CALLS, extra_json=json.dumps(logprobs)
        ),
    ]
    whole = json.loads(feed_all(ProcessSession(start(stream=False), NO_GUARDS), chunks)[-1].response_json)
    choice = whole["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
    assert choice["message"]["tool_calls"] == [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    ]
    assert len(choice["logprobs"]["content"]) == 2
    streamed = feed_all(ProcessSession(start(stream=True), NO_GUARDS), chunks)
    deltas = [json.loads(r.chunk_json)["choices"][0] for r in streamed if r.chunk_json]
    assert [d["delta"].get("tool_calls") for d in deltas[1:3]] == [call_a["tool_calls"], call_b["tool_calls"]]
    assert deltas[2]["logprobs"] == logprobs["logprobs"]


def test_every_text_channel_passes_the_guardrails_and_stop_sequences() -> None:
    leak = "bob.jones@example.com"
    chunks = [
        common_pb2.GenerationChunk(
            extra_json=json.dumps({"reasoning_content": "wants bob.jones@exa"}), prompt_tokens=3
        ),
        common_pb2.GenerationChunk(extra_json=json.dumps({"reasoning_content": "mple.com fine", "refusal": leak})),
        common_pb2.GenerationChunk(
            extra_json=json.dumps(
                {"tool_calls": [{"id": "c", "function": {"name": "f", "arguments": f'{{"to": "{leak}"}}'}}]}
            )
        ),
        common_pb2.GenerationChunk(extra_json=json.dumps({"audio": {"data": leak}}), text="ok"),
        common_pb2.GenerationChunk(completion_tokens=4, finish_reason=common_pb2.FINISH_REASON_STOP),
    ]
    whole = feed_all(ProcessSession(start(stream=False)), chunks)[-1].response_json
    assert leak not in whole and "bob.jones" not in whole
    message = json.loads(whole)["choices"][0]["message"]
    assert message["reasoning_content"] == "wants [email redacted] fine"
    assert message["refusal"] == "[email redacted]"
    assert json.loads(message["tool_calls"][0]["function"]["arguments"]) == {"to": "[email redacted]"}
    assert "audio" not in message  # structured fields cannot be filtered: not passed on
    streamed = feed_all(ProcessSession(start(stream=True)), chunks)
    assert not any(leak in r.chunk_json for r in streamed)


def test_a_stop_sequence_in_reasoning_ends_the_choice_and_its_logprobs_go_with_it() -> None:
    chunks = [
        common_pb2.GenerationChunk(extra_json=json.dumps({"reasoning_content": "think HA"}), prompt_tokens=3),
        common_pb2.GenerationChunk(
            extra_json=json.dumps({"reasoning_content": "LT secret", "logprobs": {"content": [{"token": "HALT"}]}})
        ),
        common_pb2.GenerationChunk(text="never", completion_tokens=4, finish_reason=common_pb2.FINISH_REASON_STOP),
    ]
    out = feed_all(ProcessSession(start(stream=True, stop=["HALT"]), NO_GUARDS), chunks)
    text = "".join(r.chunk_json for r in out)
    assert "secret" not in text and "never" not in text and "HALT" not in text
    bodies = [json.loads(r.chunk_json) for r in out if r.chunk_json]
    assert bodies[-1]["choices"][0]["finish_reason"] == "stop"


def test_logprobs_are_never_released_under_guardrails() -> None:
    logprobs = {"logprobs": {"content": [{"token": "bob", "logprob": -0.1}]}}
    chunks = [
        common_pb2.GenerationChunk(text="bob", extra_json=json.dumps(logprobs), prompt_tokens=3),
        common_pb2.GenerationChunk(completion_tokens=1, finish_reason=common_pb2.FINISH_REASON_STOP),
    ]
    whole = json.loads(feed_all(ProcessSession(start(stream=False)), chunks)[-1].response_json)
    assert whole["choices"][0]["logprobs"] is None
    kept = json.loads(feed_all(ProcessSession(start(stream=False), NO_GUARDS), chunks)[-1].response_json)
    assert kept["choices"][0]["logprobs"] == logprobs["logprobs"]
