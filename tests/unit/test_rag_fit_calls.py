"""RAG prompt fitting asks the inference service for token counts in two calls, not top_k + 3.

The inference stub here is a double (unit test); the real path is covered by
tests/integration/test_inference_grpc.py (TokenizeBatch against the model) and
tests/e2e/test_rag.py (RAG through the gateway).
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import grpc
import pytest

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


@pytest.mark.parametrize("k", [2, 10])
async def test_fitting_counts_tokens_in_two_calls(k: int) -> None:
    inference = FakeInference()
    result = await fit(inference, k)
    assert inference.calls == ["TokenizeBatch", "Tokenize"]
    # 120 context - 10 reserved: the instructions and two passages of 23 words fit, not a third.
    assert result.report.passages_used == 2
    assert [s.index for s in result.sources] == list(range(1, result.report.passages_used + 1))


async def test_an_inference_replica_without_tokenize_batch_is_asked_one_by_one() -> None:
    batched, old = FakeInference(), FakeInference(batch=False)
    expected = await fit(batched, 6)
    result = await fit(old, 6)
    assert old.calls[0] == "TokenizeBatch" and old.calls.count("Tokenize") >= 6 + 3
    assert result.report.passages_used == expected.report.passages_used
    assert result.messages == expected.messages
