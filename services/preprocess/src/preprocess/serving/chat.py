"""Chat and legacy completions: retrieve, generate, answer as one JSON body or as SSE events.

Both endpoints run the same path: optional retrieval (a `rag` field or a model
alias), the response cache for deterministic requests, then inference ->
postprocess, streamed or collected. The HTTP layer (preprocess.api.chat) adds
what only HTTP has: the client's disconnect, headers, the response object.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import orjson
from google.protobuf.json_format import MessageToDict
from redis.exceptions import RedisError

from preprocess.clients import MeshClients
from preprocess.keys import ApiKey, KeyStore
from preprocess.metrics import RAG_STAGE_SECONDS, RequestClock
from preprocess.normalize import normalize_text
from preprocess.pipeline import Answer, CachedAnswer, GenerationPipeline
from preprocess.protocol import ChatCompletionRequest, CompletionRequest, SamplingRequest
from preprocess.rag import NO_SOURCES_ANSWER, RagPlanner, RagSpec, Retrieved
from preprocess.reranking import Reranking, RerankOption
from preprocess.serving.sse import SSE_DONE, sse_error, sse_event
from preprocess.settings import ModelAlias, PreprocessSettings
from ragmesh.errors import ErrorKind, RagmeshError
from ragmesh.v1 import common_pb2, inference_pb2, postprocess_pb2

log = logging.getLogger(__name__)


def normalized_messages(chat: ChatCompletionRequest) -> list[common_pb2.ChatMessage]:
    """The conversation as every engine gets it: text normalised, content parts kept for the
    engines that read them (`parts_json`), `context` messages as they are (the embedded engine
    folds them into a grounding block; an upstream gets them unchanged)."""
    messages = []
    for i, m in enumerate(chat.messages):
        message = common_pb2.ChatMessage(role=m.role, content=normalize_text(chat.text_of(i)), name=m.name or "")
        if isinstance(m.content, list) and any(part.get("type") != "text" for part in m.content):
            message.parts_json = orjson.dumps(m.content).decode()
        messages.append(message)
    return messages


def sampling_of(req: SamplingRequest) -> inference_pb2.SamplingParams:
    sampling = inference_pb2.SamplingParams(n=req.n or 1)
    limit = req.completion_limit()
    if limit is not None:
        sampling.max_tokens = limit
    if req.temperature is not None:
        sampling.temperature = req.temperature
    if req.top_p is not None:
        sampling.top_p = req.top_p
    if req.seed is not None:
        sampling.seed = req.seed
    if req.presence_penalty is not None:
        sampling.presence_penalty = req.presence_penalty
    if req.frequency_penalty is not None:
        sampling.frequency_penalty = req.frequency_penalty
    return sampling


def to_generate_request(
    chat: ChatCompletionRequest, model: str | None = None, messages: list[common_pb2.ChatMessage] | None = None
) -> inference_pb2.GenerateRequest:
    """The inference request for a validated chat request (its own messages unless RAG rewrote them)."""
    request = inference_pb2.GenerateRequest(
        model=model or chat.model,
        chat=inference_pb2.ChatInput(messages=messages if messages is not None else normalized_messages(chat)),
        sampling=sampling_of(chat),
    )
    request.content_parts.extend(
        inference_pb2.ContentPart(type=kind, param=param) for kind, param in chat.content_parts()
    )
    if chat.response_format is not None and chat.response_format.type != "text":
        fmt = chat.response_format.model_dump(by_alias=True, exclude_none=True)
        request.response_format_json = orjson.dumps(fmt).decode()
    return request


def to_process_start(req: SamplingRequest) -> postprocess_pb2.ProcessStart:
    chat = isinstance(req, ChatCompletionRequest)
    start = postprocess_pb2.ProcessStart(
        id=f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
        model=req.model,
        created=int(time.time()),
        stream=bool(req.stream),
        include_usage=bool(req.stream and req.stream_options and req.stream_options.include_usage),
        stop=req.stop_list(),
        n=req.n or 1,
        object=postprocess_pb2.OBJECT_KIND_CHAT_COMPLETION if chat else postprocess_pb2.OBJECT_KIND_TEXT_COMPLETION,
    )
    fmt = req.response_format if isinstance(req, ChatCompletionRequest) else None
    if fmt is not None:
        start.response_format.type = fmt.type
        if fmt.json_schema is not None:
            start.response_format.schema_json = orjson.dumps(fmt.json_schema.schema_).decode()
    return start


def openai_body(req: SamplingRequest, rag_system: common_pb2.ChatMessage | None) -> str:
    """The client's request as an upstream should get it: every OpenAI field it sent, ragmesh's
    own fields removed, text normalised, and the RAG sources where the model reads them."""
    body = req.model_dump(mode="json", exclude_unset=True, by_alias=True, exclude={"rag", "cache"})
    if isinstance(req, CompletionRequest):
        prompt = normalize_text(req.prompt_text())
        body["prompt"] = f"{rag_system.content}\n\n{prompt}" if rag_system is not None else prompt
        body.setdefault("max_tokens", req.max_tokens)
        return orjson.dumps(body).decode()
    messages = body["messages"]
    for message in messages:
        if isinstance(message.get("content"), str):
            message["content"] = normalize_text(message["content"])
    if rag_system is not None:
        if messages and messages[0].get("role") in ("system", "developer"):
            messages[0]["content"] = rag_system.content
        else:
            messages.insert(0, {"role": "system", "content": rag_system.content})
    return orjson.dumps(body).decode()


def rag_spec(req: SamplingRequest, alias: ModelAlias | None) -> RagSpec | None:
    """The request's own `rag` field wins over the alias's binding."""
    if req.rag is not None:
        rag = req.rag
        option = RerankOption(rag.rerank, rag.rerank_candidates, rag.rerank_required)
        return RagSpec(rag.collection, rag.top_k, rag.mode, rag.on_error, option)
    if alias is not None:
        option = RerankOption(alias.rerank, alias.rerank_candidates, alias.rerank_required)
        return RagSpec(alias.collection, alias.top_k, alias.mode, alias.on_retrieval_error, option)
    return None


def cache_key(
    req: SamplingRequest, generate: inference_pb2.GenerateRequest, spec: RagSpec | None, retrieved: Retrieved | None
) -> str:
    """What makes two requests the same answer: inputs, sampling and (RAG) the collection's version."""
    material: dict[str, Any] = {
        "v": 2,
        "request": req.model_dump(
            mode="json", exclude_unset=True, by_alias=True, exclude={"rag", "cache", "stream", "stream_options"}
        ),
        "engine_model": generate.model,
        "sampling": MessageToDict(generate.sampling, preserving_proto_field_name=True),
    }
    if spec is not None and retrieved is not None:
        material["rag"] = [
            spec.collection,
            spec.top_k,
            spec.mode,
            retrieved.collection_id,
            retrieved.report.index_version,
        ]
        if retrieved.report.rerank not in ("", "off"):
            # Another reranker, or a skipped rerank, is other passages: never the same answer.
            material["rerank"] = [retrieved.report.rerank, retrieved.report.rerank_model]
    return hashlib.sha256(orjson.dumps(material, option=orjson.OPT_SORT_KEYS)).hexdigest()


class ChatServing:
    """The chat and legacy completion endpoints, bound to the mesh clients."""

    def __init__(
        self,
        clients: MeshClients,
        settings: PreprocessSettings,
        keys: KeyStore | None = None,
        reranking: Reranking | None = None,
    ) -> None:
        self._clients = clients
        self._settings = settings
        self._keys = keys
        self._rag = RagPlanner(
            clients,
            settings.rag_search_timeout,
            settings.rag_completion_reserve,
            reranking or Reranking(clients, settings),
        )

    def cacheable(self, req: SamplingRequest, no_cache: bool = False) -> bool:
        """Whether the answer may come from (and go to) the response cache."""
        return self._settings.response_cache and req.cache is not False and not no_cache and req.deterministic()

    async def charge(self, key: ApiKey | None, answer: Answer) -> None:
        """Tokens count against the key's per-minute budget once the answer is done."""
        if self._keys is None or key is None or answer.usage is None:
            return
        try:
            await self._keys.spend_tokens(key, answer.usage.prompt_tokens + answer.usage.completion_tokens)
        except (RedisError, OSError) as exc:
            log.warning("tokens not charged: key store unavailable", extra={"error": str(exc)})

    async def complete(self, req: SamplingRequest) -> dict[str, Any]:
        """The whole (non-streamed) response of a batch line or a queued request: batch priority, no stream."""
        req = req.model_copy(update={"stream": False, "stream_options": None})
        answer, _ = await self.answer(req, self.cacheable(req), inference_pb2.PRIORITY_BATCH)
        body: dict[str, Any] = orjson.loads(await answer.collect())
        return body

    async def answer(
        self,
        req: SamplingRequest,
        cacheable: bool,
        priority: inference_pb2.Priority.ValueType = inference_pb2.PRIORITY_INTERACTIVE,
    ) -> tuple[Answer, str]:
        """An opened answer (from the cache, or a generation under way) and the cache state."""
        alias = self._settings.model_aliases.get(req.model)
        spec = rag_spec(req, alias)
        model = alias.model if alias is not None else req.model
        if isinstance(req, ChatCompletionRequest):
            messages = normalized_messages(req)
            generate = to_generate_request(req, model, messages)
        else:
            assert isinstance(req, CompletionRequest)
            prompt = normalize_text(req.prompt_text())
            messages = [common_pb2.ChatMessage(role="user", content=prompt)]  # what retrieval searches for
            generate = inference_pb2.GenerateRequest(model=model, prompt=prompt, sampling=sampling_of(req))
        start = to_process_start(req)
        retrieved = None
        if spec is not None:
            with RAG_STAGE_SECONDS.labels("search").time():
                retrieved = await self._rag.retrieve(messages, spec)

        cache_state = "off"
        if cacheable:
            start.cache_key = cache_key(req, generate, spec, retrieved)
            if retrieved is not None:
                start.rag.CopyFrom(retrieved.report)
            cached = CachedAnswer(self._clients, start, self._settings.request_timeout)
            if await cached.open():
                return cached, "hit"
            cache_state = "miss"

        fixed = None
        rag_system = None
        if retrieved is not None:
            with RAG_STAGE_SECONDS.labels("fit").time():
                planned = await self._rag.fit(model, messages, retrieved, req.completion_limit())
            start.rag.CopyFrom(planned.report)
            start.sources.extend(planned.sources)
            if planned.report.status == "ok":
                rag_system = planned.messages[0]
                if generate.WhichOneof("input") == "chat":
                    generate.chat.ClearField("messages")
                    generate.chat.messages.extend(planned.messages)
                else:
                    generate.prompt = f"{rag_system.content}\n\n{generate.prompt}"
            if planned.no_sources:
                fixed = common_pb2.GenerationChunk(
                    text=NO_SOURCES_ANSWER.format(collection=planned.report.collection),
                    finish_reason=common_pb2.FINISH_REASON_STOP,
                    model=model,
                )
        generate.openai_json = openai_body(req, rag_system)
        generate.priority = priority
        pipeline = GenerationPipeline(self._clients, generate, start, self._settings.request_timeout, fixed)
        await pipeline.open()
        return pipeline, cache_state

    async def events(self, answer: Answer, clock: RequestClock, key: ApiKey | None = None) -> AsyncIterator[bytes]:
        """The answer as SSE events, ending in [DONE] (or an error event once the stream started).

        Closing this generator (the client went away) closes the answer, which
        cancels its gRPC calls and frees the engine slot."""
        first = True
        responses = answer.responses()
        try:
            while True:
                try:
                    response = await asyncio.wait_for(anext(responses), self._settings.stream_idle_timeout)
                except StopAsyncIteration:
                    break
                except TimeoutError:
                    raise RagmeshError(
                        ErrorKind.DEADLINE,
                        f"The model sent nothing for {self._settings.stream_idle_timeout:g} seconds; "
                        "the stream was closed.",
                        code="stream_idle_timeout",
                    ) from None
                if response.chunk_json:
                    if first:
                        clock.first_token()
                        first = False
                    yield sse_event(response.chunk_json)
            yield SSE_DONE
            clock.finished("ok", answer.usage)
            await self.charge(key, answer)
        except RagmeshError as err:
            # Headers are sent: the error travels as an event the openai client raises.
            log.warning("stream failed", extra={"kind": err.kind.value, "error": err.message})
            clock.finished(err.kind.value)
            yield sse_error(err)
        finally:
            await responses.aclose()
