"""RAG prompt fitting asks the inference service for token counts in one or two calls, not top_k + 3.

The inference stub here is a double (unit test); the real path is covered by
tests/integration/test_inference_grpc.py (TokenizeBatch against the model) and
tests/e2e/test_rag.py (RAG through the gateway).
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import grpc

from preprocess.rag import RagPlanner, Retrieved
from ragmesh.v1 import common_pb2, inference_pb2, postprocess_pb2, retrieval_pb2


def words(text: str) -> int:
    return len(text.split())


def chat_count(messages: Any) -> int:
    return sum(words(m.content) for m in messages) + 3 * len(messages)


class FakeInference:
    """Counts words as tokens; records every call."""

    def __init__(self, batch: bool = True) -> None:
        self.calls: list[str] = []
        self._batch = batch

    async def Tokenize(self, request: inference_pb2.TokenizeRequest, **_: Any) -> inference_pb2.TokenizeResponse:  # noqa: N802
        self.calls.append("Tokenize")
        count = chat_count(request.chat.messages) if request.HasField("chat") else words(request.prompt)
        return inference_pb2.TokenizeResponse(count=count, max_context=120)

    async def TokenizeBatch(  # noqa: N802
        self, request: inference_pb2.TokenizeBatchRequest, **_: Any
    ) -> inference_pb2.TokenizeBatchResponse:
        self.calls.append("TokenizeBatch")
        if not self._batch:
            raise grpc.aio.AioRpcError(grpc.StatusCode.UNIMPLEMENTED, grpc.aio.Metadata(), grpc.aio.Metadata(), "no")
        counts = [chat_count(i.chat.messages) if i.HasField("chat") else words(i.prompt) for i in request.inputs]
        return inference_pb2.TokenizeBatchResponse(counts=counts, max_context=120)


def retrieved(k: int) -> Retrieved:
    hits = [
        retrieval_pb2.SearchHit(document_id=f"d{i}", chunk_id=f"d{i}#0", title=f"T{i}", text="word " * 20, score=1.0)
        for i in range(k)
    ]
    return Retrieved(postprocess_pb2.RagReport(collection="c", status="ok"), hits, "cid")


MESSAGES = [common_pb2.ChatMessage(role="user", content="what do the sources say about words?")]


async def fit(inference: FakeInference, k: int) -> Any:
    planner = RagPlanner(SimpleNamespace(inference=inference), 1.0, 10, None)  # type: ignore[arg-type]
    return await planner.fit("m", MESSAGES, retrieved(k), max_tokens=10)


async def test_when_every_passage_fits_one_call_counts_everything() -> None:
    inference = FakeInference()
    result = await fit(inference, 2)
    assert inference.calls == ["TokenizeBatch"]
    assert result.report.passages_used == 2 and [s.index for s in result.sources] == [1, 2]
    everything = "\n".join(m.content for m in result.messages)
    assert "[1] T0" in everything and "[2] T1" in everything
    assert result.report.context_tokens == chat_count(result.messages) - chat_count(MESSAGES)


async def test_when_some_do_not_fit_two_calls_fit_the_best() -> None:
    inference = FakeInference()
    result = await fit(inference, 10)
    assert inference.calls == ["TokenizeBatch", "Tokenize"]
    # 120 context - 10 reserved: the instructions and two passages of 23 words fit, not a third.
    assert result.report.passages_used == 2
    assert [s.chunk_id for s in result.sources] == ["d0#0", "d1#0"]  # the best first


async def test_an_inference_replica_without_tokenize_batch_is_asked_one_by_one() -> None:
    batched, old = FakeInference(), FakeInference(batch=False)
    expected = await fit(batched, 6)
    result = await fit(old, 6)
    assert old.calls[0] == "TokenizeBatch" and old.calls.count("Tokenize") >= 6 + 3
    assert result.report.passages_used == expected.report.passages_used
    assert result.messages == expected.messages
