"""The embedded engine: llama.cpp (through xllamacpp) running a GGUF model on the CPU.

xllamacpp calls block and deliver stream chunks through a callback in the
calling thread, so every request runs in a worker thread and hands its chunks
to the event loop. Requests running at the same time are batched by llama.cpp
across its `n_parallel` slots. Returning True from the callback stops the
generation, which is how a cancelled gRPC call frees its slot.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import shutil
import tempfile
import threading
import time
from collections.abc import AsyncGenerator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import urlparse

import httpx
from jinja2.exceptions import TemplateError
from prometheus_client import Gauge

from inference.engine_batch import generate_batch
from inference.llamacpp_body import as_completion, chat_messages, client_fields, request_body
from inference.llamacpp_stream import DONE, ChoiceState, run_choice
from inference.scheduler import Slot, SlotScheduler
from inference.settings import InferenceSettings, apply_cpu_params
from inference.tokens import GgufTokenizer, PromptIds, differs_from_engine, load_gguf_tokenizer
from ragmesh.errors import ErrorKind, RagmeshError, invalid_request
from ragmesh.v1 import common_pb2, inference_pb2

log = logging.getLogger(__name__)


# Named after vLLM's vllm:num_requests_running / vllm:num_requests_waiting.
RUNNING = Gauge("ragmesh:num_requests_running", "Choices generating in an engine slot", ["model"])
WAITING = Gauge("ragmesh:num_requests_waiting", "Choices admitted and waiting for an engine slot", ["model"])


# A byte-level BPE token covers at least one byte of text, so a prompt's UTF-8
# size (plus the chat template's markers and default system prompt) bounds its
# token count. Under the bound, no tokenization is needed to check the context.
_TEMPLATE_TOKENS_PER_MESSAGE = 8
_TEMPLATE_TOKENS_FIXED = 128

# Any host: requests to llama.cpp go over its Unix socket (the transport's uds), never to this name.
_SOCKET_BASE_URL = "http://llama.cpp"


class LlamaCppEngine:
    """One GGUF model served by an in-process llama.cpp server."""

    def __init__(self, settings: InferenceSettings) -> None:
        self._settings = settings
        self._server: Any = None
        self._http: httpx.AsyncClient | None = None
        # The owner-only folder (mode 0700) holding llama.cpp's Unix socket; removed by aclose().
        self._socket_dir: str | None = None
        # The model's tokenizer and chat template in this process (see inference.tokens): None when
        # the model's kind is not built here or it counted differently from llama.cpp at load.
        self._local: GgufTokenizer | None = None
        # Ids of the prompts last counted with it, for chats run as completions (see as_completion).
        self._prompts: PromptIds | None = None
        self._executor = ThreadPoolExecutor(max_workers=settings.max_concurrent_requests, thread_name_prefix="llama")
        self.scheduler = SlotScheduler(
            settings.n_parallel,
            settings.max_concurrent_requests,
            settings.interactive_reserved_slots,
            settings.interactive_reserve_seconds,
        )
        self.model_id = settings.served_model_name
        self.created = int(time.time())

    @property
    def active_requests(self) -> int:
        """Choices admitted and not yet finished (running or waiting for a slot)."""
        return self.scheduler.active

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
        # Jinja chat templates: tools in the prompt, tool calls parsed (and held to a grammar).
        params.use_jinja = True
        template = self._settings.resolved_chat_template()
        if template:
            params.chat_template = template
        apply_cpu_params(params, self._settings)
        params.cache_ram_mib = self._settings.prompt_cache_mib
        params.verbosity = 0
        # llama.cpp's own HTTP server (xllamacpp always starts it: it has no direct call for the
        # chat template and the tokenizer, and no way to not listen) listens on a Unix socket in a
        # folder only this user can enter (xllamacpp takes a hostname ending in .sock as one), so
        # it has no TCP port at all; and with a key of this process's own, nothing else can
        # generate past the mesh's keys, guardrails and slots through it.
        http_key = secrets.token_urlsafe(32)
        params.api_keys = [http_key]
        self._socket_dir = tempfile.mkdtemp(prefix="ragmesh-llama-")  # mode 0700
        params.hostnames = [os.path.join(self._socket_dir, "llama.sock")]
        started = time.perf_counter()
        try:
            self._server = xllamacpp.Server(params)
        except BaseException:
            self._remove_socket_dir()
            raise
        self.created = int(os.path.getmtime(path))
        self._http = httpx.AsyncClient(
            transport=httpx.AsyncHTTPTransport(uds=self.socket_path),
            base_url=_SOCKET_BASE_URL,
            timeout=30.0,
            headers={"Authorization": f"Bearer {http_key}"},
        )
        self._local = self._local_tokenizer(path, template, http_key)
        self._prompts = PromptIds(self._local) if self._local is not None else None
        RUNNING.labels(self.model_id).set_function(self.scheduler.in_slots)
        WAITING.labels(self.model_id).set_function(lambda: max(0, self.active_requests - self.scheduler.in_slots()))
        log.info(
            "model loaded",
            extra={
                "path": path,
                "seconds": round(time.perf_counter() - started, 2),
                "slots": self._settings.n_parallel,
                "slot_context": self.max_context,
                "local_tokenizer": self._local is not None,
            },
        )

    def _local_tokenizer(self, path: str, template: str, http_key: str) -> GgufTokenizer | None:
        """The in-process tokenizer, if it renders and counts PROBE_* exactly as llama.cpp does."""
        headers = {"Authorization": f"Bearer {http_key}"}
        try:
            local = load_gguf_tokenizer(path, template)
            if local is None:
                return None
            transport = httpx.HTTPTransport(uds=self.socket_path)
            with httpx.Client(transport=transport, base_url=_SOCKET_BASE_URL, timeout=30.0, headers=headers) as http:
                difference = differs_from_engine(local, http)
        except Exception:  # an unusual file or template: llama.cpp loaded it, so keep to llama.cpp
            log.exception("in-process tokenizer not built; counting through llama.cpp")
            return None
        if difference:
            log.warning(
                "in-process tokenizer differs from llama.cpp; counting through llama.cpp", extra={"on": difference}
            )
            return None
        return local

    @property
    def socket_path(self) -> str:
        """The Unix socket llama.cpp's HTTP server listens on (its listening address is unix://<path>)."""
        assert self._server is not None, "engine not loaded"
        address = urlparse(str(self._server.listening_address))
        if address.scheme != "unix":  # a TCP port is what this engine must not open
            raise RuntimeError(f"llama.cpp listens on {self._server.listening_address}, not a Unix socket")
        return address.path

    def _remove_socket_dir(self) -> None:
        if self._socket_dir is not None:
            shutil.rmtree(self._socket_dir, ignore_errors=True)
            self._socket_dir = None

    async def aclose(self) -> None:
        """Release the HTTP client, the socket's folder and the worker threads (running generations
        are stopped by their callers)."""
        if self._http is not None:
            await self._http.aclose()
        self._remove_socket_dir()
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

    async def count_tokens(
        self,
        request: inference_pb2.TokenizeRequest | inference_pb2.TokenizeInput | inference_pb2.GenerateRequest,
    ) -> list[int]:
        """Token ids of the prompt exactly as the engine will see it (chat template applied)."""
        assert self._http is not None, "engine not loaded"
        if isinstance(request, inference_pb2.GenerateRequest) and request.prompt_ids:
            return list(request.prompt_ids)
        return (await self.count_many([request]))[0]

    async def count_many(
        self,
        requests: Sequence[inference_pb2.TokenizeRequest | inference_pb2.TokenizeInput | inference_pb2.GenerateRequest],
    ) -> list[list[int]]:
        """count_tokens of each request: in this process when the model's tokenizer is (one worker
        thread for all, off the event loop), else one or two llama.cpp HTTP calls each, concurrently."""
        local = self._local
        if local is not None:
            try:
                prompts = [
                    local.render(chat_messages(r.chat.messages)) if r.WhichOneof("input") == "chat" else r.prompt
                    for r in requests
                ]
            except TemplateError:  # a conversation this template refuses: llama.cpp says why
                local = None
        if local is None:
            return list(await asyncio.gather(*(self.count_through_llamacpp(r) for r in requests)))
        counted = await asyncio.to_thread(local.encode_batch, prompts)
        if self._prompts is not None:
            for request, prompt, ids in zip(requests, prompts, counted, strict=True):
                if request.WhichOneof("input") == "chat":
                    self._prompts.remember(prompt, ids)
        return counted

    @property
    def counts_in_process(self) -> bool:
        """Whether prompts are counted in this process (else by llama.cpp's HTTP server)."""
        return self._local is not None

    async def count_through_llamacpp(
        self,
        request: inference_pb2.TokenizeRequest | inference_pb2.TokenizeInput | inference_pb2.GenerateRequest,
    ) -> list[int]:
        """llama.cpp's own token ids of the prompt (/apply-template, /tokenize): what the in-process
        count stands in for, and the fallback when there is none."""
        assert self._http is not None, "engine not loaded"
        reply = await self._http.post("/tokenize", json={"content": await self._prompt(request), "add_special": True})
        reply.raise_for_status()
        return list(reply.json()["tokens"])

    async def token_pieces(self, request: inference_pb2.TokenizeRequest) -> list[str]:
        """The text of each token of the prompt (special tokens left out: no text of the prompt is theirs)."""
        assert self._http is not None, "engine not loaded"
        body = {"content": await self._prompt(request), "add_special": False, "with_pieces": True}
        reply = await self._http.post("/tokenize", json=body)
        reply.raise_for_status()
        pieces = []
        for token in reply.json()["tokens"]:
            piece = token.get("piece", "")
            # A piece that is not whole UTF-8 comes as its bytes.
            pieces.append(piece if isinstance(piece, str) else bytes(piece).decode("utf-8", "replace"))
        return pieces

    async def _prompt(
        self,
        request: inference_pb2.TokenizeRequest | inference_pb2.TokenizeInput | inference_pb2.GenerateRequest,
    ) -> str:
        """The prompt text the model reads: the chat template applied to a conversation."""
        assert self._http is not None, "engine not loaded"
        if request.WhichOneof("input") != "chat":
            return request.prompt
        reply = await self._http.post("/apply-template", json={"messages": chat_messages(request.chat.messages)})
        reply.raise_for_status()
        return str(reply.json()["prompt"])

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
            bound = len(request.prompt.encode()) + len(request.prompt_ids) + _TEMPLATE_TOKENS_FIXED
        if bound + max_tokens <= self.max_context:
            return
        prompt_tokens = request.counted_prompt_tokens or len(await self.count_tokens(request))
        if prompt_tokens + max_tokens > self.max_context:
            raise invalid_request(
                f"This model's maximum context length is {self.max_context} tokens. However, you "
                f"requested {prompt_tokens + max_tokens} tokens ({prompt_tokens} in the messages, "
                f"{max_tokens} in the completion). Please reduce the length of the messages or completion.",
                param="max_tokens",
                code="context_length_exceeded",
            )

    # --- generation -------------------------------------------------------------

    def _body(self, request: inference_pb2.GenerateRequest, index: int) -> dict[str, Any]:
        """The llama.cpp request of choice `index` (see llamacpp_body.request_body)."""
        return request_body(request, index, self._settings.tool_call_start)

    def _run_choice(
        self,
        body: dict[str, Any],
        plain: list[dict[str, Any]] | None,
        state: ChoiceState,
        emit: Callable[[object], None],
        cancelled: threading.Event,
    ) -> None:
        """Generate one choice in this worker thread; its slot's admission ends with it.

        A chat `plain` enough to be a completion (see as_completion) goes to llama.cpp's completions
        call as the token ids of its templated prompt, counted here: its chat endpoint would apply
        the template and tokenize the prompt again before reading it (~10 ms on a RAG prompt)."""
        started = time.perf_counter()
        try:
            handle, opening = self._server.handle_completions, False
            if "messages" in body:
                ids = self._prompts.of(plain) if plain is not None and self._prompts is not None else None
                if ids is None:
                    handle = self._server.handle_chat_completions
                else:
                    body = {**{k: v for k, v in body.items() if k != "messages"}, "prompt": ids}
                    opening = True
            run_choice(handle, body, state, emit, cancelled, started, opening)
        finally:
            self.scheduler.release()
            emit(DONE)

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
        client_fields(request)  # a llama.cpp-internal field is a 400 before any slot is taken
        await self._check_context(request)
        n = max(1, request.sampling.n)
        if request.priority == inference_pb2.PRIORITY_BATCH:
            async for chunk in generate_batch(self._start_choice, self.scheduler, request, n):
                yield chunk
            return
        self.scheduler.interactive_arrived()
        self.scheduler.admit(n)
        self.scheduler.preempt_for(n)
        queue: asyncio.Queue[object] = asyncio.Queue()
        slots: list[Slot] = []
        for index in range(n):
            try:
                slots.append(self._start_choice(request, index, False, queue))
            except RagmeshError:
                for _ in range(n - index - 1):  # admitted, never started
                    self.scheduler.release()
                for slot in slots:
                    self.scheduler.stop(slot)
                raise
        running = n
        try:
            while running:
                item = await queue.get()
                if item is DONE:
                    running -= 1
                elif isinstance(item, RagmeshError):
                    raise item
                else:
                    assert isinstance(item, common_pb2.GenerationChunk)
                    yield item
        finally:
            # Stops every choice still running at its next token; the threads then exit by themselves.
            for slot in slots:
                self.scheduler.stop(slot)

    def _start_choice(
        self, request: inference_pb2.GenerateRequest, index: int, batch: bool, queue: asyncio.Queue[object]
    ) -> Slot:
        """Run one admitted choice in a worker thread, holding a slot; its chunks, errors and end go to `queue`."""
        loop = asyncio.get_running_loop()
        slot = self.scheduler.occupy(batch)

        def emit(item: object) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, item)
            if item is DONE:  # the choice's thread is done with its slot
                loop.call_soon_threadsafe(self.scheduler.vacate, slot)

        body = self._body(request, index)
        plain = as_completion(request, body) if self._prompts is not None else None
        state = ChoiceState(
            index=index,
            model=self.model_id,
            one_call=bool(body.get("tools")) and body.get("parallel_tool_calls") is False,
        )
        try:
            self._executor.submit(self._run_choice, body, plain, state, emit, slot.stop)
        except RuntimeError:  # executor shut down: the service is stopping
            self.scheduler.release()
            slot.stop.set()
            self.scheduler.vacate(slot)
            raise RagmeshError(ErrorKind.UNAVAILABLE, "inference is shutting down") from None
        return slot
