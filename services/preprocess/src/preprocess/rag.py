"""Retrieval-augmented generation: from a chat request to a prompt with numbered sources.

1. The retrieval query comes from the conversation, not from the system prompt:
   the last user turn, with the previous user turn in front when the last one is
   short or leans on it ("what about there?").
2. Search runs under its own deadline. When it fails the request fails (503),
   or, if the alias or request says `on_error: no_context`, is answered without
   sources and says so (`rag.status`).
3. The passages are fitted into the model's context: the answer's token budget
   is reserved, then passages are added best first while the prompt, counted
   by the model's own tokenizer, still fits. A passage that does not fit is left
   out whole (never cut); `rag.passages_used` says how many went in.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass, field
from typing import Any, Literal

import grpc

from preprocess.clients import MeshClients
from preprocess.metrics import RAG_STAGE_SECONDS
from preprocess.reranking import Reranking, RerankOption
from ragmesh.errors import ErrorKind, RagmeshError, from_rpc_error
from ragmesh.grpc_client import call_metadata
from ragmesh.v1 import common_pb2, inference_pb2, postprocess_pb2, retrieval_pb2

INSTRUCTIONS = (
    "Answer the question using the numbered sources below. After each statement, cite the "
    "sources it comes from by their numbers in square brackets, like [1] or [2]. If the sources "
    "do not contain the answer, say that you do not know."
)
SEARCH_MODES = {
    "hybrid": retrieval_pb2.SEARCH_MODE_HYBRID,
    "dense": retrieval_pb2.SEARCH_MODE_DENSE,
    "sparse": retrieval_pb2.SEARCH_MODE_SPARSE,
}
NO_SOURCES_ANSWER = "No sources were found in collection '{collection}' for this question."

# A last user turn this short, or with a word pointing back, needs the turn before it.
_FOLLOW_UP = re.compile(r"\b(it|its|they|them|their|there|that|this|those|these|he|she|his|her|him)\b", re.I)
_SHORT_TURN_WORDS = 6
SNIPPET_CHARS = 240


@dataclass(frozen=True)
class RagSpec:
    collection: str
    top_k: int = 4
    mode: Literal["hybrid", "dense", "sparse"] = "hybrid"
    on_error: Literal["fail", "no_context"] = "fail"
    rerank: RerankOption = field(default_factory=RerankOption)


@dataclass
class RagResult:
    messages: list[common_pb2.ChatMessage]
    report: postprocess_pb2.RagReport
    sources: list[postprocess_pb2.Source] = field(default_factory=list)
    collection_id: str = ""
    prompt_tokens: int = 0  # of `messages`, as Tokenize counts them (0: not counted)

    @property
    def no_sources(self) -> bool:
        return self.report.status == "no_sources"


def retrieval_query(messages: list[common_pb2.ChatMessage]) -> str:
    """The search query a conversation asks: its last user turn, with context when it needs some."""
    turns = [m.content.strip() for m in messages if m.role == "user" and m.content.strip()]
    if not turns:
        return ""
    last = turns[-1]
    if len(turns) > 1 and (len(last.split()) <= _SHORT_TURN_WORDS or _FOLLOW_UP.search(last)):
        return f"{turns[-2]}\n{last}"
    return last


def format_passage(number: int, hit: retrieval_pb2.SearchHit) -> str:
    title = f" {hit.title}" if hit.title else ""
    return f"[{number}]{title}\n{hit.text}"


def with_sources(messages: list[common_pb2.ChatMessage], passages: list[str]) -> list[common_pb2.ChatMessage]:
    """The conversation with the instructions and sources in its (first) system message."""
    block = INSTRUCTIONS + "\n\nSources:\n\n" + "\n\n".join(passages) if passages else INSTRUCTIONS
    out = [
        common_pb2.ChatMessage(role=m.role, content=m.content, name=m.name, parts_json=m.parts_json) for m in messages
    ]
    if out and out[0].role in ("system", "developer"):
        out[0].content = f"{out[0].content}\n\n{block}"
    else:
        out.insert(0, common_pb2.ChatMessage(role="system", content=block))
    return out


def drop_task(task: asyncio.Task[Any] | None) -> None:
    """Cancel a task whose result is no longer wanted, its outcome (an error too) left unread."""
    if task is None:
        return
    task.cancel()
    task.add_done_callback(lambda t: t.cancelled() or t.exception())


@dataclass
class Retrieved:
    report: postprocess_pb2.RagReport
    hits: list[retrieval_pb2.SearchHit]
    collection_id: str
    rerank_scores: dict[str, float] = field(default_factory=dict)  # by chunk id, when reranked


class RagPlanner:
    def __init__(
        self, clients: MeshClients, search_timeout: float, completion_reserve: int, reranking: Reranking
    ) -> None:
        self._clients = clients
        self._search_timeout = search_timeout
        self._completion_reserve = completion_reserve
        self._reranking = reranking

    async def _count(
        self, model: str, messages: list[common_pb2.ChatMessage] | None = None, prompt: str = ""
    ) -> inference_pb2.TokenizeResponse:
        request = inference_pb2.TokenizeRequest(model=model)
        if messages is not None:
            request.chat.messages.extend(messages)
        else:
            request.prompt = prompt
        try:
            return await self._clients.inference.Tokenize(request, timeout=10, metadata=call_metadata())
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc) from None

    async def _count_many(self, model: str, inputs: list[inference_pb2.TokenizeInput]) -> tuple[list[int], int]:
        """(tokens of each input, the model's context) in one TokenizeBatch call; an inference
        replica that predates it (UNIMPLEMENTED) is asked one Tokenize call per input."""
        request = inference_pb2.TokenizeBatchRequest(model=model, inputs=inputs)
        try:
            reply = await self._clients.inference.TokenizeBatch(request, timeout=10, metadata=call_metadata())
            return list(reply.counts), reply.max_context
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.UNIMPLEMENTED:
                raise from_rpc_error(exc) from None
        replies = await asyncio.gather(
            *(
                self._count(model, list(i.chat.messages)) if i.HasField("chat") else self._count(model, prompt=i.prompt)
                for i in inputs
            )
        )
        return [r.count for r in replies], replies[0].max_context if replies else 0

    async def retrieve(self, messages: list[common_pb2.ChatMessage], spec: RagSpec) -> Retrieved:
        """Search the collection for the conversation (a failure follows spec.on_error)."""
        report = postprocess_pb2.RagReport(collection=spec.collection, rerank="off")
        query = retrieval_query(messages)
        if not query:
            raise RagmeshError(ErrorKind.INVALID_REQUEST, "RAG needs a user message to search for.", param="messages")
        request = retrieval_pb2.SearchRequest(
            collection=spec.collection, query=query, top_k=spec.top_k, mode=SEARCH_MODES[spec.mode]
        )
        try:
            found = await self._reranking.search(request, spec.rerank, self._search_timeout)
        except RagmeshError as err:
            return self._failed(report, spec, err)
        report.index_version = found.found.index_version
        report.passages_retrieved = len(found.hits)
        report.status = "ok" if found.hits else "no_sources"
        report.rerank = found.status
        report.rerank_model = found.model
        report.rerank_reason = found.reason
        report.rerank_candidates = found.candidates
        scores = {h.chunk_id: s for h, s in zip(found.hits, found.rerank_scores, strict=True) if s is not None}
        return Retrieved(report, found.hits, found.found.collection_id, scores)

    async def fit(
        self, model: str, messages: list[common_pb2.ChatMessage], retrieved: Retrieved, max_tokens: int | None
    ) -> RagResult:
        """The prompt with as many passages as fit, and the sources they are."""
        report = retrieved.report
        if report.status != "ok":
            return RagResult(messages, report, collection_id=retrieved.collection_id)
        fitted, used, prompt_tokens, plain = await self._fit(model, messages, retrieved.hits, max_tokens)
        context_tokens = max(0, prompt_tokens - plain)
        report.passages_used = len(used)
        report.context_tokens = context_tokens
        sources = [
            postprocess_pb2.Source(
                index=number,
                document_id=hit.document_id,
                chunk_id=hit.chunk_id,
                title=hit.title,
                score=hit.score,
                snippet=hit.text[:SNIPPET_CHARS],
                rerank_score=retrieved.rerank_scores.get(hit.chunk_id),
            )
            for number, hit in enumerate(used, start=1)
        ]
        return RagResult(fitted, report, sources, retrieved.collection_id, prompt_tokens)

    def start_fit(
        self, model: str, messages: list[common_pb2.ChatMessage], retrieved: Retrieved, max_tokens: int | None
    ) -> asyncio.Task[RagResult]:
        """fit() in a task of its own (timed as the `fit` stage), to run beside other work."""

        async def timed() -> RagResult:
            with RAG_STAGE_SECONDS.labels("fit").time():
                return await self.fit(model, messages, retrieved, max_tokens)

        return asyncio.create_task(timed())

    def _failed(self, report: postprocess_pb2.RagReport, spec: RagSpec, err: RagmeshError) -> Retrieved:
        if err.kind in (ErrorKind.NOT_FOUND, ErrorKind.INVALID_REQUEST):
            raise err  # the client's mistake: unknown collection, bad top_k
        if spec.on_error == "fail":
            raise RagmeshError(
                ErrorKind.UNAVAILABLE, f"Retrieval from '{spec.collection}' failed: {err.message}", retry_after=1
            ) from err
        report.status = "no_context"
        report.error = err.message
        return Retrieved(report, [], "")

    async def _fit(
        self,
        model: str,
        messages: list[common_pb2.ChatMessage],
        hits: list[retrieval_pb2.SearchHit],
        max_tokens: int | None,
    ) -> tuple[list[common_pb2.ChatMessage], list[retrieval_pb2.SearchHit], int, int]:
        """Best passages first, as many as fit; (messages, passages used, their tokens, the
        tokens of the conversation without them)."""
        passages = [format_passage(i + 1, hit) for i, hit in enumerate(hits)]
        everything = with_sources(messages, passages)
        # One call for the conversation without and with the (empty) sources block, with every
        # passage, and each passage alone: when every passage fits (the usual case) the exact
        # count is already there.
        inputs = [
            inference_pb2.TokenizeInput(chat=inference_pb2.ChatInput(messages=messages)),
            inference_pb2.TokenizeInput(chat=inference_pb2.ChatInput(messages=with_sources(messages, []))),
            inference_pb2.TokenizeInput(chat=inference_pb2.ChatInput(messages=everything)),
            *(inference_pb2.TokenizeInput(prompt=p + "\n\n") for p in passages),
        ]
        (plain, bare, whole, *sizes), max_context = await self._count_many(model, inputs)
        budget = max_context - (max_tokens or self._completion_reserve)
        if whole <= budget:
            return everything, list(hits), whole, plain
        total = bare
        chosen: list[int] = []
        for i, size in enumerate(sizes):
            if total + size <= budget:
                chosen.append(i)
                total += size
        while True:
            # Renumber so that the sources the model sees are [1]..[n] in rank order.
            used = [hits[i] for i in chosen]
            fitted = with_sources(messages, [format_passage(n + 1, h) for n, h in enumerate(used)])
            exact = (await self._count(model, fitted)).count
            if exact <= budget or not chosen:
                return fitted, used, exact, plain
            chosen.pop()  # token boundaries merge differently once joined: drop the weakest
