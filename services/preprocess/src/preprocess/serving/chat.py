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
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

import grpc
import orjson
from google.protobuf.json_format import MessageToDict
from redis.exceptions import RedisError

from preprocess.clients import MeshClients
from preprocess.keys import ApiKey, KeyStore, check_model_allowed
from preprocess.metrics import RAG_STAGE_SECONDS, RequestClock
from preprocess.normalize import normalize_text
from preprocess.ownership import CollectionAccess
from preprocess.pipeline import Answer, CachedAnswer, GenerationPipeline
from preprocess.protocol import ChatCompletionRequest, CompletionRequest, SamplingRequest
from preprocess.rag import NO_SOURCES_ANSWER, RagPlanner, RagSpec, Retrieved, drop_task
from preprocess.reranking import Reranking, RerankOption
from preprocess.serving.prompts import MultiPromptAnswer, opened_all
from preprocess.serving.sse import SSE_DONE, sse_error, sse_event
from preprocess.settings import ModelAlias, PreprocessSettings
from ragmesh.errors import ErrorKind, RagmeshError, from_rpc_error
from ragmesh.grpc_client import call_metadata
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
        ids = req.prompt_ids()
        prompt = normalize_text(req.prompt_text())
        body["prompt"] = ids or (f"{rag_system.content}\n\n{prompt}" if rag_system is not None else prompt)
        body.setdefault("max_tokens", req.max_tokens)
        # The mesh echoes the prompt itself (postprocess), whatever the engine: never twice.
        body.pop("echo", None)
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
    req: SamplingRequest,
    generate: inference_pb2.GenerateRequest,
    spec: RagSpec | None,
    retrieved: Retrieved | None,
    tenant: str | None = None,
) -> str:
    """What makes two requests the same answer: the tenant (one key is never answered from
    another's request), inputs, sampling and (RAG) the collection's version."""
    material: dict[str, Any] = {
        "v": 3,
        "tenant": tenant,
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
        access: CollectionAccess | None = None,
    ) -> None:
        self._access = access
        self._clients = clients
        self._settings = settings
        self._keys = keys
        self._rag = RagPlanner(
            clients,
            settings.rag_search_timeout,
            settings.rag_completion_reserve,
            reranking or Reranking(clients, settings),
        )

    async def _echo_tokens(self, model: str, prompt: str) -> list[str]:
        """The prompt's tokens as the engine reads them (echo with logprobs)."""
        request = inference_pb2.TokenizeRequest(model=model, prompt=prompt, return_pieces=True)
        try:
            reply = await self._clients.inference.Tokenize(request, timeout=10, metadata=call_metadata())
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc) from None
        return list(reply.pieces)

    def cacheable(self, req: SamplingRequest, no_cache: bool = False) -> bool:
        """Whether the answer may come from (and go to) the response cache."""
        return self._settings.response_cache and req.cache is not False and not no_cache and req.deterministic()

    def reservation(self, req: SamplingRequest) -> int:
        """The tokens a request may use: its prompt (bounded from its size: a token is at least
        one byte of text, plus the template's markers) and its completion limit per choice."""
        if isinstance(req, ChatCompletionRequest):
            prompt = sum(len(req.text_of(i).encode()) + 8 for i in range(len(req.messages)))
        else:
            assert isinstance(req, CompletionRequest)
            prompt = len(req.prompt_text().encode())
        completion = req.completion_limit() or self._settings.rag_completion_reserve
        return prompt + completion * (req.n or 1)

    async def reserve(self, key: ApiKey | None, req: SamplingRequest) -> int:
        """Take the request's reservation from the key's token budget at admission (0: nothing taken)."""
        if self._keys is None or key is None or not key.tpm:
            return 0
        tokens = self.reservation(req)
        try:
            await self._keys.reserve_tokens(key, tokens)
        except (RedisError, OSError) as exc:
            log.warning("tokens not reserved: key store unavailable", extra={"error": str(exc)})
            return 0
        return tokens

    async def charge(self, key: ApiKey | None, answer: Answer | None, reserved: int = 0) -> None:
        """Settle the reservation once the answer is done: the key pays what the answer used. A
        request that ended without usage (it failed before generating) pays nothing."""
        if self._keys is None or key is None:
            return
        used = answer.usage.prompt_tokens + answer.usage.completion_tokens if answer and answer.usage else 0
        try:
            await self._keys.settle_tokens(key, reserved, used)
        except (RedisError, OSError) as exc:
            log.warning("tokens not charged: key store unavailable", extra={"error": str(exc)})

    async def complete(self, req: SamplingRequest, key: ApiKey | None = None) -> dict[str, Any]:
        """The whole (non-streamed) response of a batch line or a queued request: batch priority, no
        stream; checked against `key`'s models and charged to its token budget like HTTP."""
        check_model_allowed(key, req.model)
        req = req.model_copy(update={"stream": False, "stream_options": None})
        reserved = await self.reserve(key, req)
        answer: Answer | None = None
        try:
            answer, _ = await self.answer(req, self.cacheable(req), inference_pb2.PRIORITY_BATCH, key)
            body: dict[str, Any] = orjson.loads(await answer.collect())
        finally:
            await self.charge(key, answer, reserved)
        return body

    async def answer(
        self,
        req: SamplingRequest,
        cacheable: bool,
        priority: inference_pb2.Priority.ValueType = inference_pb2.PRIORITY_INTERACTIVE,
        key: ApiKey | None = None,
    ) -> tuple[Answer, str]:
        """An opened answer (from the cache, or a generation under way) and the cache state."""
        if isinstance(req, CompletionRequest) and len(req.prompts()) > 1:
            # One generation per prompt, joined into one response (see serving.prompts).
            opened = await opened_all([self.answer(req.one_prompt(p), cacheable, priority, key) for p in req.prompts()])
            states = {state for _, state in opened}
            include_usage = bool(req.stream and req.stream_options and req.stream_options.include_usage)
            joined = MultiPromptAnswer([answer for answer, _ in opened], req.n or 1, include_usage)
            return joined, states.pop() if len(states) == 1 else "miss"
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
            generate.prompt_ids.extend(req.prompt_ids())
        start = to_process_start(req)
        if spec is not None and self._access is not None:
            # The request's own `rag` or an alias's binding alike: only a collection the key may read.
            await self._access.check(spec.collection, key, "read")
        if isinstance(req, CompletionRequest) and req.echo:
            # The client's own prompt, as sent (RAG passages are not echoed).
            start.echo = req.prompt_text()
            if req.logprobs is not None:
                start.echo_tokens.extend(await self._echo_tokens(model, start.echo))
        retrieved = None
        if spec is not None:
            with RAG_STAGE_SECONDS.labels("search").time():
                retrieved = await self._rag.retrieve(messages, spec)

        cache_state = "off"
        cached = None
        if cacheable:
            start.cache_key = cache_key(req, generate, spec, retrieved, key.id if key is not None else None)
            if retrieved is not None:
                start.rag.CopyFrom(retrieved.report)
            cached = CachedAnswer(self._clients, start, self._settings.request_timeout)
        # The prompt is fitted (token counts from the inference service) while the response cache
        # is asked (postprocess): neither needs the other, and the fit is dropped on a hit.
        fitting = None if retrieved is None else self._rag.start_fit(model, messages, retrieved, req.completion_limit())
        try:
            if cached is not None:
                if await cached.open():
                    drop_task(fitting)
                    return cached, "hit"
                cache_state = "miss"
            planned = await fitting if fitting is not None else None
        except BaseException:
            drop_task(fitting)
            raise
        fixed = None
        rag_system = None
        if planned is not None:
            start.rag.CopyFrom(planned.report)
            start.sources.extend(planned.sources)
            if planned.report.status == "ok":
                rag_system = planned.messages[0]
                if generate.WhichOneof("input") == "chat":
                    generate.chat.ClearField("messages")
                    generate.chat.messages.extend(planned.messages)
                    generate.counted_prompt_tokens = planned.prompt_tokens  # no second count in the engine
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
        # A non-streamed answer may come whole from the engine (one chunk per choice, see pipeline).
        generate.whole = not req.stream
        pipeline = GenerationPipeline(self._clients, generate, start, self._settings.request_timeout, fixed)
        await pipeline.open()
        return pipeline, cache_state

    async def chunks(
        self, answer: Answer, clock: RequestClock, key: ApiKey | None = None, reserved: int = 0
    ) -> AsyncGenerator[str, None]:
        """The answer's stream chunks (OpenAI chunk objects as JSON text) as they come; counted and
        charged at the end (the reservation settled to the usage). Raises RagmeshError (counted) when
        the stream fails or falls silent.

        Closing this generator (the client went away) closes the answer, which
        cancels its gRPC calls and frees the engine slot."""
        first = True
        responses = answer.responses()
        try:
            while True:
                try:
                    # A timer, not asyncio.wait_for: on Python 3.11 that wraps every read in a task
                    # of its own, a task and a loop turn per token on the hottest path.
                    async with asyncio.timeout(self._settings.stream_idle_timeout):
                        response = await anext(responses)
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
                    yield response.chunk_json
            clock.finished("ok", answer.usage)
            # A client that leaves before this point keeps paying its whole reservation.
            await self.charge(key, answer, reserved)
        except RagmeshError as err:
            log.warning("stream failed", extra={"kind": err.kind.value, "error": err.message})
            clock.finished(err.kind.value)
            raise
        finally:
            await responses.aclose()

    async def events(
        self, answer: Answer, clock: RequestClock, key: ApiKey | None = None, reserved: int = 0
    ) -> AsyncIterator[bytes]:
        """The answer as SSE events, ending in [DONE] (or an error event once the stream started)."""
        chunks = self.chunks(answer, clock, key, reserved)
        try:
            async for chunk in chunks:
                yield sse_event(chunk)
            yield SSE_DONE
        except RagmeshError as err:
            # Headers are sent: the error travels as an event the openai client raises.
            yield sse_error(err)
        finally:
            await chunks.aclose()
