"""A RAG request fits its prompt while the response cache is asked, and a cache hit drops the fit.

The mesh is doubles here (unit test): the cache lookup (postprocess Replay) answers only once the
fit has asked the inference service for its token counts, so a request that asked one after the
other would never get its answer. tests/e2e/test_rag.py covers the same path through the gateway.
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import grpc

from preprocess.protocol import ChatCompletionRequest
from preprocess.serving.chat import ChatServing
from preprocess.settings import PreprocessSettings
from ragmesh.v1 import inference_pb2, postprocess_pb2, retrieval_pb2


class FakeMesh:
    def __init__(self, fit_fails: bool) -> None:
        self.fit_asked = asyncio.Event()
        self.fit_fails = fit_fails
        self.calls: list[str] = []

    async def Search(self, request: retrieval_pb2.SearchRequest, **_: Any) -> retrieval_pb2.SearchResponse:  # noqa: N802
        self.calls.append("Search")
        hit = retrieval_pb2.SearchHit(document_id="d", chunk_id="d#0", title="T", text="some words", score=1.0)
        return retrieval_pb2.SearchResponse(hits=[hit], collection_id="cid", index_version=3)

    async def TokenizeBatch(  # noqa: N802
        self, request: inference_pb2.TokenizeBatchRequest, **_: Any
    ) -> inference_pb2.TokenizeBatchResponse:
        self.calls.append("TokenizeBatch")
        self.fit_asked.set()
        if self.fit_fails:
            raise grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(), "down")
        return inference_pb2.TokenizeBatchResponse(counts=[10] * len(request.inputs), max_context=1000)

    def Replay(self, start: postprocess_pb2.ProcessStart, **_: Any) -> Any:  # noqa: N802
        self.calls.append("Replay")
        mesh = self

        class Call:
            async def read(self) -> postprocess_pb2.ProcessResponse:
                await mesh.fit_asked.wait()  # the fit is under way beside this lookup
                return postprocess_pb2.ProcessResponse(chunk_json="{}")

            def cancel(self) -> None:
                pass

        return Call()


def request() -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate(
        {
            "model": "m",
            "messages": [{"role": "user", "content": "what do the sources say?"}],
            "temperature": 0,
            "rag": {"collection": "c", "top_k": 1},
        }
    )


async def answer(mesh: FakeMesh) -> str:
    clients = SimpleNamespace(retrieval=mesh, inference=mesh, postprocess=mesh)
    serving = ChatServing(clients, PreprocessSettings(response_cache=True))  # type: ignore[arg-type]
    _, state = await asyncio.wait_for(serving.answer(request(), cacheable=True), 30)  # a hang guard only
    return state


async def test_the_fit_runs_while_the_cache_is_asked() -> None:
    mesh = FakeMesh(fit_fails=False)
    assert await answer(mesh) == "hit"
    assert mesh.calls[0] == "Search" and {"Replay", "TokenizeBatch"} <= set(mesh.calls)


async def test_a_cache_hit_is_answered_even_when_the_fit_fails() -> None:
    mesh = FakeMesh(fit_fails=True)
    assert await answer(mesh) == "hit"  # the fit's error is dropped with the fit
    await asyncio.sleep(0)  # the dropped task's outcome is read by its callback, not left unread
