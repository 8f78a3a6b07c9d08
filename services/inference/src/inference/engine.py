"""The embedded engine: llama.cpp (through xllamacpp) running a GGUF model on the CPU.

xllamacpp calls block and deliver stream chunks through a callback in the
calling thread, so every request runs in a worker thread and hands its chunks
to the event loop. Requests running at the same time are batched by llama.cpp
across its `n_parallel` slots. Returning True from the callback stops the
generation, which is how a cancelled gRPC call frees its slot.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
import time
from collections.abc import AsyncGenerator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import httpx
from prometheus_client import Counter, Gauge, Histogram

from inference.settings import InferenceSettings, apply_cpu_params
from ragmesh.errors import ErrorKind, RagmeshError, invalid_request
from ragmesh.v1 import common_pb2, inference_pb2

log = logging.getLogger(__name__)

TOKENS_GENERATED = Counter("ragmesh_inference_tokens_generated_total", "Completion tokens generated")
PROMPT_TOKENS = Counter("ragmesh_inference_prompt_tokens_total", "Prompt tokens processed")
ACTIVE_REQUESTS = Gauge("ragmesh_inference_active_requests", "Engine requests running or waiting for a slot")
# Named after vLLM's vllm:num_requests_running / vllm:num_requests_waiting.
RUNNING = Gauge("ragmesh:num_requests_running", "Choices generating in an engine slot", ["model"])
WAITING = Gauge("ragmesh:num_requests_waiting", "Choices admitted and waiting for an engine slot", ["model"])
PREEMPTIONS = Counter(
    "ragmesh_inference_batch_preemptions_total", "Batch choices stopped to give their slot to an interactive request"
)
TTFT = Histogram(
    "ragmesh_inference_time_to_first_token_seconds",
    "Engine time from request to first token",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)

FINISH_REASONS: dict[str, common_pb2.FinishReason.ValueType] = {
    "stop": common_pb2.FINISH_REASON_STOP,
    "length": common_pb2.FINISH_REASON_LENGTH,
    "tool_calls": common_pb2.FINISH_REASON_TOOL_CALLS,
}

# Sentinel a worker thread puts on the queue when its choice is finished.
_DONE = object()


@dataclass
class _BatchRun:
    """A batch choice in an engine slot, which an interactive request may take over."""

    cancelled: threading.Event
    preempted: bool = False


# A byte-level BPE token covers at least one byte of text, so a prompt's UTF-8
# size (plus the chat template's markers and default system prompt) bounds its
# token count. Under the bound, no tokenization is needed to check the context.
_TEMPLATE_TOKENS_PER_MESSAGE = 8
_TEMPLATE_TOKENS_FIXED = 128


@dataclass
class _ChoiceState:
    """What one worker thread tracks about the choice it generates."""

    index: int
    model: str
    completion_tokens: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    finish_reason: common_pb2.FinishReason.ValueType = common_pb2.FINISH_REASON_UNSPECIFIED
    error: RagmeshError | None = None


def _engine_error(payload: dict[str, Any]) -> RagmeshError:
    """Map an error object returned by llama.cpp's server code to a domain error."""
    code = payload.get("code")
    kind = payload.get("type", "")
    message = str(payload.get("message", "engine error"))
    if kind == "exceed_context_size_error":
        n_ctx, n_prompt = payload.get("n_ctx"), payload.get("n_prompt_tokens")
        return invalid_request(
            f"This model's maximum context length is {n_ctx} tokens. However, your messages "
            f"resulted in {n_prompt} tokens. Please reduce the length of the messages.",
            param="messages",
            code="context_length_exceeded",
        )
    if code == 400 or kind == "invalid_request_error":
        return invalid_request(message)
    if code == 503 or kind == "unavailable_error":
        return RagmeshError(ErrorKind.UNAVAILABLE, message)
    return RagmeshError(ErrorKind.INTERNAL, f"engine error: {message}")


class LlamaCppEngine:
    """One GGUF model served by an in-process llama.cpp server."""

    def __init__(self, settings: InferenceSettings) -> None:
        self._settings = settings
        self._server: Any = None
        self._http: httpx.AsyncClient | None = None
        self._executor = ThreadPoolExecutor(max_workers=settings.max_concurrent_requests, thread_name_prefix="llama")
        self._admitted = 0
        self._admitted_lock = threading.Lock()
        # Choices running, by priority (touched on the event loop only), and the
        # batch requests waiting for a slot interactive traffic leaves free.
        self._running = {inference_pb2.PRIORITY_INTERACTIVE: 0, inference_pb2.PRIORITY_BATCH: 0}
        self._batch_waiters: list[asyncio.Future[None]] = []
        # Batch choices in slots, oldest first, and preempted ones not yet out of their slot.
        self._batch_runs: list[_BatchRun] = []
        self._leaving = 0
        self._last_interactive = -float("inf")
        self.model_id = settings.served_model_name
        self.created = int(time.time())

    @property
    def active_requests(self) -> int:
        """Choices admitted and not yet finished (running or waiting for a slot)."""
        with self._admitted_lock:
            return self._admitted

    def _in_slots(self) -> int:
        # Choices past the slot count queue inside llama.cpp: they are waiting, not running.
        return min(self._settings.n_parallel, sum(self._running.values()))

    @property
    def max_context(self) -> int:
        """Tokens one request may use (prompt + completion): the context of one slot."""
        return self._settings.n_ctx // self._settings.n_parallel

    def load(self) -> None:
        """Load the model (blocking: call it from a thread)."""
        import xllamacpp  # heavy native module: loaded only when a service starts

        path = self._settings.resolved_model_path()
        params = xllamacpp.CommonParams()
        params.model.path = path
        params.n_parallel = self._settings.n_parallel
        params.n_ctx = self._settings.n_ctx
        apply_cpu_params(params, self._settings)
        params.verbosity = 0
        started = time.perf_counter()
        self._server = xllamacpp.Server(params)
        self.created = int(os.path.getmtime(path))
        # llama.cpp's own HTTP server listens on a random loopback port; we use it
        # only for what xllamacpp has no direct call for (chat template, tokenizer).
        self._http = httpx.AsyncClient(base_url=self._server.listening_address, timeout=30.0)
        RUNNING.labels(self.model_id).set_function(self._in_slots)
        WAITING.labels(self.model_id).set_function(lambda: max(0, self.active_requests - self._in_slots()))
        log.info(
            "model loaded",
            extra={
                "path": path,
                "seconds": round(time.perf_counter() - started, 2),
                "slots": self._settings.n_parallel,
                "slot_context": self.max_context,
            },
        )

    async def aclose(self) -> None:
        """Release the HTTP client and the worker threads (running generations are stopped by their callers)."""
        if self._http is not None:
            await self._http.aclose()
        self._executor.shutdown(wait=False, cancel_futures=True)

    def check_model(self, model: str) -> None:
        """Raise NOT_FOUND unless `model` is the served model."""
        if model != self.model_id:
            raise RagmeshError(
                ErrorKind.NOT_FOUND,
                f"The model `{model}` does not exist.",
                param="model",
                code="model_not_found",
            )

    def model_card(self) -> common_pb2.ModelCard:
        return common_pb2.ModelCard(
            id=self.model_id,
            owned_by="ragmesh",
            created=self.created,
            max_context=self.max_context,
            backend="embedded",
        )

    # --- tokens -----------------------------------------------------------------

    async def count_tokens(self, request: inference_pb2.TokenizeRequest | inference_pb2.GenerateRequest) -> list[int]:
        """Token ids of the prompt exactly as the engine will see it (chat template applied)."""
        assert self._http is not None, "engine not loaded"
        if request.WhichOneof("input") == "chat":
            reply = await self._http.post("/apply-template", json={"messages": _messages(request.chat.messages)})
            reply.raise_for_status()
            prompt = reply.json()["prompt"]
        else:
            prompt = request.prompt
        reply = await self._http.post("/tokenize", json={"content": prompt, "add_special": True})
        reply.raise_for_status()
        return list(reply.json()["tokens"])

    async def _check_context(self, request: inference_pb2.GenerateRequest) -> None:
        """Refuse prompt + max_tokens over one slot's context before taking a slot.

        A prompt alone over the context is refused by llama.cpp itself; this adds
        vLLM's check of the requested completion length.
        """
        if not request.sampling.HasField("max_tokens"):
            return
        max_tokens = request.sampling.max_tokens
        if request.WhichOneof("input") == "chat":
            messages = request.chat.messages
            bound = sum(len(m.content.encode()) + len(m.role) for m in messages)
            bound += _TEMPLATE_TOKENS_PER_MESSAGE * len(messages) + _TEMPLATE_TOKENS_FIXED
        else:
            bound = len(request.prompt.encode()) + _TEMPLATE_TOKENS_FIXED
        if bound + max_tokens <= self.max_context:
            return
        prompt_tokens = len(await self.count_tokens(request))
        if prompt_tokens + max_tokens > self.max_context:
            raise invalid_request(
                f"This model's maximum context length is {self.max_context} tokens. However, you "
                f"requested {prompt_tokens + max_tokens} tokens ({prompt_tokens} in the messages, "
                f"{max_tokens} in the completion). Please reduce the length of the messages or completion.",
                param="max_tokens",
                code="context_length_exceeded",
            )

    # --- generation -------------------------------------------------------------

    def _admit(self, n: int) -> None:
        with self._admitted_lock:
            if self._admitted + n > self._settings.max_concurrent_requests:
                raise RagmeshError(
                    ErrorKind.UNAVAILABLE,
                    "The engine is overloaded; retry shortly.",
                    code="overloaded",
                    retry_after=1,
                )
            self._admitted += n
        ACTIVE_REQUESTS.inc(n)

    def _release(self) -> None:
        with self._admitted_lock:
            self._admitted -= 1
        ACTIVE_REQUESTS.dec()

    def _batch_room(self) -> int:
        """Slots batch work may take now. While interactive traffic is about (a request in the last
        `interactive_reserve_seconds`), `interactive_reserved_slots` stay free for it (batch always
        keeps one); on a mesh with no interactive traffic batch takes them all. An interactive
        request finding no free slot takes one from a batch choice (`_preempt_for`), so the
        reservation only spares a steady interactive stream from preempting at every request."""
        recent = time.monotonic() - self._last_interactive < self._settings.interactive_reserve_seconds
        reserved = self._reserved_slots() if recent else 0
        busy = sum(self._running.values())
        return self._settings.n_parallel - reserved - busy

    def _reserved_slots(self) -> int:
        return max(0, min(self._settings.interactive_reserved_slots, self._settings.n_parallel - 1))

    async def _wait_for_batch_room(self) -> None:
        loop = asyncio.get_running_loop()
        while self._batch_room() < 1:
            waiter: asyncio.Future[None] = loop.create_future()
            self._batch_waiters.append(waiter)
            try:
                await waiter
            finally:
                if waiter in self._batch_waiters:
                    self._batch_waiters.remove(waiter)

    def _preempt_for(self, n: int) -> None:
        """Stop the newest batch choices (least work lost) until `n` interactive choices have slots.

        A stopped batch choice has sent nothing to its caller (batch output is held back until it
        is complete); it waits for a slot again and starts over.
        """
        free = self._settings.n_parallel - sum(self._running.values()) + self._leaving
        while free < n and self._batch_runs:
            victim = self._batch_runs.pop()
            victim.preempted = True
            victim.cancelled.set()
            self._leaving += 1
            free += 1
            PREEMPTIONS.inc()

    def _slots_changed(self, priority: inference_pb2.Priority.ValueType, delta: int) -> None:
        self._running[priority] += delta
        if delta < 0:
            for waiter in self._batch_waiters:
                if not waiter.done():
                    waiter.set_result(None)

    def _body(self, request: inference_pb2.GenerateRequest, index: int) -> dict[str, Any]:
        sampling = request.sampling
        body: dict[str, Any] = {
            # llama.cpp's own sampling extras (top_k, min_p, logit_bias, logprobs...) pass through.
            **{k: v for k, v in _client_fields(request).items() if k not in _ENGINE_OWNED},
            "stream": True,
            "timings_per_token": True,
        }
        if request.WhichOneof("input") == "chat":
            body["messages"] = _messages(request.chat.messages)
        else:
            body["prompt"] = request.prompt
        if sampling.HasField("max_tokens"):
            body["max_tokens"] = sampling.max_tokens
        if sampling.HasField("temperature"):
            body["temperature"] = sampling.temperature
        if sampling.HasField("top_p"):
            body["top_p"] = sampling.top_p
        if sampling.HasField("presence_penalty"):
            body["presence_penalty"] = sampling.presence_penalty
        if sampling.HasField("frequency_penalty"):
            body["frequency_penalty"] = sampling.frequency_penalty
        if request.response_format_json:
            # llama.cpp turns json_object / json_schema into a grammar the sampler follows.
            body["response_format"] = json.loads(request.response_format_json)
        if sampling.HasField("seed"):
            # Each choice gets its own seed so n > 1 gives n different, reproducible answers.
            body["seed"] = (sampling.seed + index) & 0xFFFFFFFF
        return body

    def _run_choice(
        self,
        chat: bool,
        body: dict[str, Any],
        state: _ChoiceState,
        emit: Callable[[object], None],
        cancelled: threading.Event,
    ) -> None:
        """Generate one choice in this worker thread, emitting GenerationChunks."""
        started = time.perf_counter()
        first = True

        def on_chunk(chunk: dict[str, Any]) -> bool:
            nonlocal first
            if "error" in chunk:
                state.error = _engine_error(chunk["error"])
                return True
            timings = chunk.get("timings")
            if timings:
                state.prompt_tokens = timings.get("cache_n", 0) + timings.get("prompt_n", 0)
                state.cached_tokens = timings.get("cache_n", 0)
                state.completion_tokens = timings.get("predicted_n", state.completion_tokens)
            usage = chunk.get("usage")
            if usage:
                state.prompt_tokens = usage.get("prompt_tokens", state.prompt_tokens)
                state.completion_tokens = usage.get("completion_tokens", state.completion_tokens)
            text = ""
            extra = ""
            for choice in chunk.get("choices", ()):
                reason = choice.get("finish_reason")
                if reason:
                    state.finish_reason = FINISH_REASONS.get(reason, common_pb2.FINISH_REASON_STOP)
                text += (choice.get("delta") or {}).get("content") or choice.get("text") or ""
                if choice.get("logprobs"):
                    extra = json.dumps({"logprobs": choice["logprobs"]})
            if text or first or extra:
                if first:
                    TTFT.observe(time.perf_counter() - started)
                    first = False
                emit(
                    common_pb2.GenerationChunk(
                        index=state.index,
                        text=text,
                        completion_tokens=state.completion_tokens,
                        prompt_tokens=state.prompt_tokens,
                        cached_prompt_tokens=state.cached_tokens,
                        model=state.model,
                        extra_json=extra,
                    )
                )
            return cancelled.is_set()

        try:
            handle = self._server.handle_chat_completions if chat else self._server.handle_completions
            handle(body, on_chunk)
            if state.error is not None:
                emit(state.error)
                return
            if not cancelled.is_set():
                TOKENS_GENERATED.inc(state.completion_tokens)
                PROMPT_TOKENS.inc(state.prompt_tokens - state.cached_tokens)
                emit(
                    common_pb2.GenerationChunk(
                        index=state.index,
                        completion_tokens=state.completion_tokens,
                        prompt_tokens=state.prompt_tokens,
                        cached_prompt_tokens=state.cached_tokens,
                        finish_reason=state.finish_reason or common_pb2.FINISH_REASON_STOP,
                        model=state.model,
                    )
                )
        except Exception as exc:
            log.exception("engine call failed")
            emit(RagmeshError(ErrorKind.INTERNAL, f"engine failure: {type(exc).__name__}"))
        finally:
            self._release()
            emit(_DONE)

    async def generate(
        self, request: inference_pb2.GenerateRequest
    ) -> AsyncGenerator[common_pb2.GenerationChunk, None]:
        """Stream GenerationChunks for every choice; closing the iterator stops the engine.

        Batch requests (PRIORITY_BATCH) are not streamed: each choice's output comes once it is
        complete, so an interactive request may preempt it (see `_preempt_for`) at no cost to the
        caller but the restart.
        """
        self.check_model(request.model)
        if request.WhichOneof("input") is None:
            raise invalid_request("either messages or prompt is required", param="messages")
        await self._check_context(request)
        n = max(1, request.sampling.n)
        if request.priority == inference_pb2.PRIORITY_BATCH:
            async for chunk in self._generate_batch(request, n):
                yield chunk
            return
        self._last_interactive = time.monotonic()
        self._admit(n)
        self._preempt_for(n)
        queue: asyncio.Queue[object] = asyncio.Queue()
        cancelled = threading.Event()
        for index in range(n):
            try:
                self._start_choice(request, index, inference_pb2.PRIORITY_INTERACTIVE, queue, cancelled)
            except RagmeshError:
                for _ in range(n - index - 1):  # admitted, never started
                    self._release()
                raise
        running = n
        try:
            while running:
                item = await queue.get()
                if item is _DONE:
                    running -= 1
                elif isinstance(item, RagmeshError):
                    raise item
                else:
                    assert isinstance(item, common_pb2.GenerationChunk)
                    yield item
        finally:
            # Stops every choice at its next token; the threads then exit by themselves.
            cancelled.set()

    def _start_choice(
        self,
        request: inference_pb2.GenerateRequest,
        index: int,
        priority: inference_pb2.Priority.ValueType,
        queue: asyncio.Queue[object],
        cancelled: threading.Event,
    ) -> None:
        """Run one admitted choice in a worker thread; its chunks, errors and end go to `queue`."""
        loop = asyncio.get_running_loop()
        self._slots_changed(priority, 1)

        def emit(item: object) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, item)
            if item is _DONE:  # the choice's thread is done with its slot
                loop.call_soon_threadsafe(self._slots_changed, priority, -1)

        chat = request.WhichOneof("input") == "chat"
        state = _ChoiceState(index=index, model=self.model_id)
        try:
            self._executor.submit(self._run_choice, chat, self._body(request, index), state, emit, cancelled)
        except RuntimeError:  # executor shut down: the service is stopping
            self._release()
            self._slots_changed(priority, -1)
            cancelled.set()
            raise RagmeshError(ErrorKind.UNAVAILABLE, "inference is shutting down") from None

    async def _generate_batch(
        self, request: inference_pb2.GenerateRequest, n: int
    ) -> AsyncGenerator[common_pb2.GenerationChunk, None]:
        choices = [asyncio.ensure_future(self._batch_choice(request, index)) for index in range(n)]
        try:
            outputs = await asyncio.gather(*choices)
        finally:
            for choice in choices:
                choice.cancel()
        for chunks in outputs:
            for chunk in _merged(chunks):
                yield chunk

    async def _batch_choice(
        self, request: inference_pb2.GenerateRequest, index: int
    ) -> list[common_pb2.GenerationChunk]:
        """One batch choice's whole output, generated in a slot interactive traffic leaves free
        and started over as often as it is preempted."""
        while True:
            await self._wait_for_batch_room()
            self._admit(1)
            run = _BatchRun(threading.Event())
            queue: asyncio.Queue[object] = asyncio.Queue()
            self._start_choice(request, index, inference_pb2.PRIORITY_BATCH, queue, run.cancelled)
            self._batch_runs.append(run)
            chunks: list[common_pb2.GenerationChunk] = []
            error: RagmeshError | None = None
            try:
                # Up to the thread's end, so that a preempted choice has left its slot when retried.
                while (item := await queue.get()) is not _DONE:
                    if isinstance(item, RagmeshError):
                        error = item
                    else:
                        assert isinstance(item, common_pb2.GenerationChunk)
                        chunks.append(item)
            finally:
                run.cancelled.set()
                if run in self._batch_runs:
                    self._batch_runs.remove(run)
                if run.preempted:
                    self._leaving -= 1
            if not run.preempted:
                if error is not None:
                    raise error
                return chunks


def _merged(chunks: list[common_pb2.GenerationChunk]) -> list[common_pb2.GenerationChunk]:
    """A complete choice's text chunks as one (fewer messages downstream); chunks carrying
    extras (logprobs) are kept apart, and the finishing chunk comes last as it was."""
    out: list[common_pb2.GenerationChunk] = []
    for chunk in chunks:
        last = out[-1] if out else None
        mergeable = not chunk.extra_json and chunk.finish_reason == common_pb2.FINISH_REASON_UNSPECIFIED
        if last is not None and mergeable and not last.extra_json and last.finish_reason == chunk.finish_reason:
            last.text += chunk.text
            last.completion_tokens = chunk.completion_tokens
            last.prompt_tokens = chunk.prompt_tokens
            last.cached_prompt_tokens = chunk.cached_prompt_tokens
        else:
            copy = common_pb2.GenerationChunk()
            copy.CopyFrom(chunk)
            out.append(copy)
    return out


# What the engine sets itself, whatever the client's request said: the mesh
# handles n (one call per choice), stop sequences (postprocess) and the input;
# what a typed field of GenerateRequest carries comes from that field only.
_ENGINE_OWNED = frozenset(
    {
        "model",
        "messages",
        "prompt",
        "stream",
        "stream_options",
        "n",
        "stop",
        "tools",
        "tool_choice",
        "functions",
        "function_call",
        "response_format",
        "max_tokens",
        "max_completion_tokens",
        "seed",
        "temperature",
        "top_p",
        "presence_penalty",
        "frequency_penalty",
        "user",
    }
)


def _client_fields(request: inference_pb2.GenerateRequest) -> dict[str, Any]:
    if not request.openai_json:
        return {}
    fields: dict[str, Any] = json.loads(request.openai_json)
    return fields


def _messages(messages: Any) -> list[dict[str, str]]:
    out = []
    for m in messages:
        msg = {"role": m.role, "content": m.content}
        if m.name:
            msg["name"] = m.name
        out.append(msg)
    return out
