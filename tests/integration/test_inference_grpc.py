"""The inference service over real gRPC with the real model."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable

import grpc
import pytest
from prometheus_client import REGISTRY

from inference.engine import LlamaCppEngine
from ragmesh.errors import from_rpc_error
from ragmesh.v1 import common_pb2, inference_pb2, inference_pb2_grpc

from .conftest import MODEL


def chat(text: str, **sampling: int | float) -> inference_pb2.GenerateRequest:
    return inference_pb2.GenerateRequest(
        model=MODEL,
        chat=inference_pb2.ChatInput(messages=[common_pb2.ChatMessage(role="user", content=text)]),
        sampling=inference_pb2.SamplingParams(**sampling),  # type: ignore[arg-type]
    )


async def collect(
    stub: inference_pb2_grpc.InferenceAsyncStub, request: inference_pb2.GenerateRequest
) -> list[common_pb2.GenerationChunk]:
    return [chunk async for chunk in stub.Generate(request, timeout=60)]


@pytest.fixture
def stub(inference_channel: grpc.aio.Channel) -> inference_pb2_grpc.InferenceAsyncStub:
    return inference_pb2_grpc.InferenceStub(inference_channel)


async def test_generate_streams_until_max_tokens(stub: inference_pb2_grpc.InferenceAsyncStub) -> None:
    chunks = await collect(stub, chat("Tell me a long story about a dragon.", max_tokens=12, temperature=0))
    assert chunks[0].text == "" and chunks[0].finish_reason == common_pb2.FINISH_REASON_UNSPECIFIED
    last = chunks[-1]
    assert last.finish_reason == common_pb2.FINISH_REASON_LENGTH
    assert last.completion_tokens == 12
    counts = [c.completion_tokens for c in chunks]
    assert counts == sorted(counts)
    assert "".join(c.text for c in chunks).strip()
    assert last.model == MODEL


async def test_tokenize_counts_the_prompt_the_engine_sees(stub: inference_pb2_grpc.InferenceAsyncStub) -> None:
    request = chat("Count my tokens, please: one two three.", max_tokens=1, temperature=0)
    chunks = await collect(stub, request)
    reply = await stub.Tokenize(inference_pb2.TokenizeRequest(model=MODEL, chat=request.chat, return_ids=True))
    assert reply.count == chunks[-1].prompt_tokens
    assert len(reply.ids) == reply.count
    assert reply.max_context == 2048


async def test_tokenize_batch_counts_each_input_as_tokenize_does(stub: inference_pb2_grpc.InferenceAsyncStub) -> None:
    conversation = chat("Which sources mention dragons?").chat
    prompts = ["[1] Dragons\nDragons breathe fire.\n\n", "[2] Cats\nCats purr.\n\n", ""]
    batch = await stub.TokenizeBatch(
        inference_pb2.TokenizeBatchRequest(
            model=MODEL,
            inputs=[
                inference_pb2.TokenizeInput(chat=conversation),
                *(inference_pb2.TokenizeInput(prompt=p) for p in prompts),
            ],
        )
    )
    one_by_one = [await stub.Tokenize(inference_pb2.TokenizeRequest(model=MODEL, chat=conversation))]
    one_by_one += [await stub.Tokenize(inference_pb2.TokenizeRequest(model=MODEL, prompt=p)) for p in prompts]
    assert list(batch.counts) == [r.count for r in one_by_one]
    assert batch.counts[1] > batch.counts[2] > 0
    assert batch.max_context == 2048
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.TokenizeBatch(inference_pb2.TokenizeBatchRequest(model="gpt-nothing", inputs=[]))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


async def test_prompt_over_the_context_fails_before_any_chunk(stub: inference_pb2_grpc.InferenceAsyncStub) -> None:
    call = stub.Generate(chat("word " * 3000, temperature=0))
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call.read()
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    err = from_rpc_error(info.value)
    assert err.code == "context_length_exceeded" and err.http_status == 400


async def test_prompt_plus_max_tokens_over_the_context_is_refused(stub: inference_pb2_grpc.InferenceAsyncStub) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await collect(stub, chat("word " * 1000, max_tokens=1500))
    err = from_rpc_error(info.value)
    assert err.code == "context_length_exceeded" and err.param == "max_tokens"


async def test_unknown_model_is_not_found(stub: inference_pb2_grpc.InferenceAsyncStub) -> None:
    request = chat("hi", max_tokens=2)
    request.model = "gpt-nothing"
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await collect(stub, request)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert from_rpc_error(info.value).code == "model_not_found"


async def test_cancelling_the_call_frees_the_slot(
    stub: inference_pb2_grpc.InferenceAsyncStub, engine: LlamaCppEngine
) -> None:
    call = stub.Generate(chat("Write a very long essay about the sea.", max_tokens=1500, temperature=0))
    for _ in range(3):
        await call.read()
    assert engine.active_requests == 1
    call.cancel()
    deadline = time.monotonic() + 1.0
    while engine.active_requests and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    assert engine.active_requests == 0
    # The slot serves the next request.
    chunks = await collect(stub, chat("hi", max_tokens=3, temperature=0))
    assert chunks[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH


async def test_concurrent_requests_and_n_choices(stub: inference_pb2_grpc.InferenceAsyncStub) -> None:
    results = await asyncio.gather(
        collect(stub, chat("Name a color.", max_tokens=6, temperature=0.8, seed=1)),
        collect(stub, chat("Name a fruit.", max_tokens=6, temperature=0.8, seed=2, n=2)),
    )
    assert results[0][-1].completion_tokens == 6
    finals = [c for c in results[1] if c.finish_reason]
    assert sorted(c.index for c in finals) == [0, 1]
    assert all(c.completion_tokens == 6 for c in finals)


async def test_seed_makes_sampling_reproducible(stub: inference_pb2_grpc.InferenceAsyncStub) -> None:
    texts = set()
    for _ in range(2):
        chunks = await collect(stub, chat("Invent a name for a cat.", max_tokens=10, temperature=1.0, seed=1234))
        texts.add("".join(c.text for c in chunks))
    assert len(texts) == 1


async def test_more_choices_than_admitted_is_overloaded(stub: inference_pb2_grpc.InferenceAsyncStub) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await collect(stub, chat("hi", max_tokens=2, n=5))
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert from_rpc_error(info.value).retry_after == 1


async def test_list_models(stub: inference_pb2_grpc.InferenceAsyncStub) -> None:
    reply = await stub.ListModels(common_pb2.ListModelsRequest())
    assert [(m.id, m.max_context, m.backend) for m in reply.models] == [(MODEL, 2048, "embedded")]


def preemptions() -> float:
    return REGISTRY.get_sample_value("ragmesh_inference_batch_preemptions_total") or 0.0


def batch_line(text: str, max_tokens: int = 24) -> inference_pb2.GenerateRequest:
    request = chat(text, max_tokens=max_tokens, temperature=0)
    request.priority = inference_pb2.PRIORITY_BATCH
    return request


async def _most_batch_choices_running(engine: LlamaCppEngine, work: Awaitable[object]) -> int:
    """The most batch choices the engine ran at once while `work` ran."""
    task = asyncio.ensure_future(work)
    most = 0
    while not task.done():
        most = max(most, engine.scheduler.running(batch=True))
        await asyncio.sleep(0.005)
    await task
    return most


def _quiet(engine: LlamaCppEngine) -> None:
    """As if no interactive request came within the reservation window."""
    engine.scheduler.quiet()


async def test_batch_leaves_a_slot_to_recent_interactive_traffic_and_takes_all_otherwise(
    stub: inference_pb2_grpc.InferenceAsyncStub, engine: LlamaCppEngine
) -> None:
    # The test engine has 2 slots. Interactive traffic just now: one stays free, batch lines run one at a time.
    await collect(stub, chat("Hi", max_tokens=1))
    lines = [batch_line("Tell a story."), batch_line("Tell a tale.")]
    assert await _most_batch_choices_running(engine, asyncio.gather(*(collect(stub, r) for r in lines))) == 1
    _quiet(engine)
    assert await _most_batch_choices_running(engine, asyncio.gather(*(collect(stub, r) for r in lines))) == 2


async def test_batch_output_comes_whole_once_the_choice_is_complete(
    stub: inference_pb2_grpc.InferenceAsyncStub, engine: LlamaCppEngine
) -> None:
    _quiet(engine)
    streamed = await collect(stub, chat("Name three colours.", max_tokens=12, temperature=0))
    whole = await collect(stub, batch_line("Name three colours.", max_tokens=12))
    assert len(streamed) > 3
    assert [c.finish_reason for c in whole] == [common_pb2.FINISH_REASON_UNSPECIFIED, common_pb2.FINISH_REASON_LENGTH]
    assert whole[0].text == "".join(c.text for c in streamed)
    assert whole[-1].completion_tokens == 12


async def test_interactive_request_preempts_a_batch_choice_which_then_starts_over(
    stub: inference_pb2_grpc.InferenceAsyncStub, engine: LlamaCppEngine
) -> None:
    _quiet(engine)  # batch may take both slots
    preempted_before = preemptions()
    lines = [batch_line("Write a long story about a ship.", 120), batch_line("Write a long story about a cat.", 120)]
    batch = asyncio.gather(*(collect(stub, r) for r in lines))
    while engine.scheduler.running(batch=True) < 2:
        await asyncio.sleep(0.01)
    started = time.monotonic()
    interactive = await collect(stub, chat("Hi", max_tokens=4))
    interactive_done = time.monotonic()
    outputs = await batch
    batch_done = time.monotonic()
    assert interactive[-1].completion_tokens == 4
    # It did not wait for a 120-token batch line to finish: one of them gave way.
    assert preemptions() == preempted_before + 1
    assert interactive_done - started < batch_done - started
    # Both batch lines still complete in full, none of the stopped attempt's output in them.
    for output in outputs:
        assert output[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH
        assert output[-1].completion_tokens == 120
        assert len(output) == 2
