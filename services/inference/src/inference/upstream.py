"""An upstream OpenAI-compatible endpoint as an engine (vLLM, Ollama, NVIDIA API catalog / NIM, OpenAI).

A streamed request goes upstream as a stream (stream_options.include_usage), so the
mesh streams tokens as they come. A non-streamed one (GenerateRequest.whole) asks the
upstream for the whole answer, as the client did, and sends each choice on as one
chunk: one message on each hop instead of one per delta, and no SSE to parse (the
backend's `timeout` then bounds the wait for that answer, as for a `payload.stream:
false` backend). The upstream applies the request's stop sequences itself either way;
postprocess checks them (and the guardrails) on the answer all the same. The server-side
key is added here; nothing of the client's credentials ever reaches this code.
Upstream failures are sorted into what a retry may fix (connection errors,
429, 5xx: `UpstreamError.retryable`) and what it may not, and into what says the
backend is broken (`UpstreamError.backend_fault`) and what does not (a client's 4xx,
a rate limit, every connection slot busy).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import aiohttp
import orjson

from inference.config import UpstreamBackend
from ragmesh.errors import ErrorKind, RagmeshError
from ragmesh.rerank import logit_of, ranked, sigmoid
from ragmesh.v1 import common_pb2, inference_pb2

log = logging.getLogger(__name__)

FINISH_REASONS: dict[str, common_pb2.FinishReason.ValueType] = {
    "stop": common_pb2.FINISH_REASON_STOP,
    "length": common_pb2.FINISH_REASON_LENGTH,
    "content_filter": common_pb2.FINISH_REASON_CONTENT_FILTER,
    "tool_calls": common_pb2.FINISH_REASON_TOOL_CALLS,
    "function_call": common_pb2.FINISH_REASON_TOOL_CALLS,
}
# Parameters the mesh itself owns on the way to an upstream.
_MESH_FIELDS = ("stream", "stream_options", "model")
# Response headers a forwarded answer keeps (hop-by-hop and the upstream's own cookies stay behind).
_PASSED_HEADERS = frozenset({"content-type", "content-disposition", "cache-control", "retry-after"})
# Words in a model id that say what it does, when neither the file nor the endpoint says.
_GUESSES = (("rerank", "rerank"), ("ranking", "rerank"), ("embed", "embedding"), ("retriever", "embedding"))


def shaped(body: dict[str, Any], config: UpstreamBackend) -> dict[str, Any]:
    """The body after the backend's payload rules: fields dropped, then fields forced."""
    for name in config.payload.drop:
        body.pop(name, None)
    body.update(config.payload.force)
    return body


def stated_capabilities(model: dict[str, Any]) -> list[str] | None:
    """What a /models entry says its model does (a `capabilities` list, or a `type`/`task`), else None."""
    caps = model.get("capabilities")
    if isinstance(caps, list) and all(isinstance(c, str) for c in caps):
        return list(caps)
    kind = str(model.get("type") or model.get("task") or model.get("model_type") or "").lower()
    if "embed" in kind:
        return ["embedding"]
    if "rerank" in kind or "ranking" in kind:
        return ["rerank"]
    if kind in ("vlm", "vision"):
        return ["chat", "vision"]
    if kind in ("chat", "llm", "text-generation"):
        return ["chat"]
    return None


def guessed_capabilities(model: str) -> list[str]:
    """What a model id suggests it does, as NVIDIA's clients guess too."""
    lowered = model.lower()
    for word, capability in _GUESSES:
        if word in lowered:
            return [capability]
    return ["chat"]


_Sampled = Literal["temperature", "top_p", "seed", "presence_penalty", "frequency_penalty"]
_SAMPLING: tuple[_Sampled, ...] = ("temperature", "top_p", "seed", "presence_penalty", "frequency_penalty")
_MESSAGE_TYPED = ("role", "content", "name")


def openai_request(request: inference_pb2.GenerateRequest, model: str) -> dict[str, Any]:
    """The OpenAI request an upstream gets: the client's body for what no typed field carries
    (tools, logprobs, a message's tool_calls, unknown parameters), the typed fields for the rest."""
    # Parsed once (preprocess wrote it with orjson: plain JSON, no NaN).
    body: dict[str, Any] = orjson.loads(request.openai_json) if request.openai_json else {}
    raw = body.get("messages")
    for key in (*_MESH_FIELDS, "messages", "prompt"):
        body.pop(key, None)
    if request.WhichOneof("input") == "chat":
        typed = request.chat.messages
        # The client's message at the same place, for what ChatMessage has no field for.
        extras = raw if isinstance(raw, list) and len(raw) == len(typed) else [{}] * len(typed)
        body["messages"] = [_message(m, e if isinstance(e, dict) else {}) for m, e in zip(typed, extras, strict=True)]
    else:
        body["prompt"] = request.prompt
    sampling = request.sampling
    # The client's spelling of the limit is kept (some upstream models take only
    # max_completion_tokens); its value is the typed one.
    limit_key = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    body.pop("max_tokens", None)
    body.pop("max_completion_tokens", None)
    if sampling.HasField("max_tokens"):
        body[limit_key] = sampling.max_tokens
    for name in _SAMPLING:
        body.pop(name, None)
        if sampling.HasField(name):
            body[name] = getattr(sampling, name)
    body.pop("n", None)
    if sampling.n > 1:
        body["n"] = sampling.n
    body.pop("response_format", None)
    if request.response_format_json:
        body["response_format"] = json.loads(request.response_format_json)
    body.update({"model": model, "stream": True, "stream_options": {"include_usage": True}})
    return body


def _message(typed: Any, raw: dict[str, Any]) -> dict[str, Any]:
    message = {k: v for k, v in raw.items() if k not in _MESSAGE_TYPED}
    message["role"] = typed.role
    # ChatMessage cannot say null: an assistant turn with only tool calls keeps its null content.
    message["content"] = None if typed.content == "" and raw.get("content") is None and raw else typed.content
    if typed.parts_json:
        # Content parts (text and images, say) as the client sent them: a vision model reads them all.
        message["content"] = json.loads(typed.parts_json)
    if typed.name:
        message["name"] = typed.name
    return message


class UpstreamError(RagmeshError):
    """A failed upstream call, with whether trying again (here or elsewhere) may succeed, and
    whether it says the backend itself is broken (`backend_fault`: connection errors, timeouts,
    5xx, answers that are not OpenAI's), which is all a circuit breaker counts."""

    def __init__(
        self,
        kind: ErrorKind,
        message: str,
        *,
        retryable: bool,
        retry_after: float | None = None,
        backend_fault: bool = False,
        code: str | None = None,
    ) -> None:
        super().__init__(kind, message, retry_after=int(retry_after) if retry_after is not None else None, code=code)
        self.retryable = retryable
        self.retry_after_seconds = retry_after
        self.backend_fault = backend_fault


def _retry_after(headers: Mapping[str, str]) -> float | None:
    value = headers.get("retry-after")
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


def _error_message(body: bytes) -> str:
    try:
        parsed = json.loads(body)
        error = parsed.get("error", parsed)
        return str(error.get("message", error) if isinstance(error, dict) else error)[:500]
    except ValueError:
        return body[:200].decode(errors="replace")


def status_error(backend: str, status: int, headers: Mapping[str, str], body: bytes) -> UpstreamError:
    """The domain error for an upstream's error status."""
    detail = _error_message(body)
    if status == 429:
        return UpstreamError(
            ErrorKind.RATE_LIMITED,
            f"The upstream {backend!r} is rate limiting: {detail}",
            retryable=True,
            retry_after=_retry_after(headers),
        )
    if status >= 500:
        return UpstreamError(
            ErrorKind.BAD_GATEWAY,
            f"The upstream {backend!r} failed ({status}): {detail}",
            retryable=True,
            backend_fault=True,
        )
    if status in (401, 403):
        # The server-side key is wrong: the operator's problem, not the client's.
        return UpstreamError(
            ErrorKind.BAD_GATEWAY,
            f"The upstream {backend!r} refused the server's credentials ({status}).",
            retryable=True,
        )
    if status == 404:
        return UpstreamError(ErrorKind.NOT_FOUND, f"The upstream {backend!r}: {detail}", retryable=False)
    return UpstreamError(
        ErrorKind.INVALID_REQUEST, f"The upstream {backend!r} rejected the request: {detail}", retryable=False
    )


def _bad_gateway(backend: str, what: str) -> UpstreamError:
    return UpstreamError(
        ErrorKind.BAD_GATEWAY, f"The upstream {backend!r} answered {what}.", retryable=False, backend_fault=True
    )


def _timed_out(backend: str) -> UpstreamError:
    return UpstreamError(ErrorKind.DEADLINE, f"The upstream {backend!r} timed out.", retryable=True, backend_fault=True)


def _unreachable(backend: str, exc: BaseException) -> UpstreamError:
    return UpstreamError(
        ErrorKind.UNAVAILABLE,
        f"The upstream {backend!r} is unreachable or dropped the connection: {exc!r}",
        retryable=True,
        backend_fault=True,
    )


@dataclass
class _Choice:
    finish: str | None = None
    extras: dict[str, Any] = field(default_factory=dict)


class UpstreamEngine:
    """One OpenAI-compatible endpoint and the models it serves.

    The HTTP client is aiohttp: on the gateway's hot path it costs about a third
    of httpx's CPU per streamed request (0.3 against 1.1 ms here).
    """

    def __init__(self, config: UpstreamBackend) -> None:
        self.name = config.name
        self.config = config
        self._base = config.base_url.rstrip("/")
        self._headers = dict(config.headers)
        self._configured_key = config.api_key()
        self._runtime_key: str | None = None
        # sock_read bounds the wait for each read, as a stream may rightly run for long;
        # sock_connect bounds connecting only (aiohttp's `connect` would also bound the wait for
        # a pooled connection, and turn a busy backend into a "failing" one).
        self._timeout = aiohttp.ClientTimeout(total=None, sock_connect=config.connect_timeout, sock_read=config.timeout)
        self._session: aiohttp.ClientSession | None = None
        # Requests in flight to this endpoint (the whole of a stream holds one).
        self._slots = asyncio.Semaphore(config.max_concurrency)

    @asynccontextmanager
    async def _slot(self) -> AsyncIterator[None]:
        """One of the endpoint's `max_concurrency` slots, waited for at most `queue_timeout`
        seconds. A backend that is busy is not failing: the caller gets a 503 with Retry-After,
        and the breaker counts nothing."""
        try:
            async with asyncio.timeout(self.config.queue_timeout):
                await self._slots.acquire()
        except TimeoutError:
            raise UpstreamError(
                ErrorKind.UNAVAILABLE,
                f"The upstream {self.name!r} has its {self.config.max_concurrency} requests in flight; retry shortly.",
                retryable=False,
                retry_after=1,
                code="overloaded",
            ) from None
        try:
            yield
        finally:
            self._slots.release()

    def set_key(self, key: str | None) -> None:
        """Use `key` from the next request on (None: back to the configured one)."""
        self._runtime_key = key

    @property
    def key_source(self) -> str:
        return "runtime" if self._runtime_key is not None else self.config.key_source()

    def _auth(self) -> dict[str, str]:
        # Per request, not per session: a key set at run time applies to the next call.
        key = self._runtime_key if self._runtime_key is not None else self._configured_key
        return {"Authorization": f"Bearer {key}"} if key else {}

    def _client(self) -> aiohttp.ClientSession:
        # Made on first use: a session belongs to the event loop it was made in.
        if self._session is None:
            self._session = aiohttp.ClientSession(
                headers=self._headers,
                timeout=self._timeout,
                # No pool limit: the slots above bound requests, and discovery never queues behind them.
                connector=aiohttp.TCPConnector(limit=0),
                # Room for one long SSE line (logprobs of a long choice) beyond aiohttp's 64 KiB.
                read_bufsize=2**20,
                raise_for_status=False,
            )
        return self._session

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def discover(self) -> list[tuple[str, list[str] | None]]:
        """(id, capabilities the endpoint states or None) from its /models, filtered by include/exclude."""
        try:
            async with self._client().get(f"{self._base}/models", headers=self._auth()) as reply:
                body = await reply.read()
                if reply.status != 200:
                    raise status_error(self.name, reply.status, reply.headers, body)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise _unreachable(self.name, exc) from exc
        try:
            found = [(str(m["id"]), stated_capabilities(m)) for m in json.loads(body)["data"]]
        except (ValueError, KeyError, TypeError):
            raise _bad_gateway(self.name, "a /models list that is not OpenAI's shape") from None
        return [(m, caps) for m, caps in found if self.config.wants(m)]

    def _streams(self, request: inference_pb2.GenerateRequest) -> bool:
        """Whether the upstream is asked for a stream: a streamed request to a backend that streams."""
        return self.config.payload.stream and not request.whole

    def _body(self, request: inference_pb2.GenerateRequest, model: str) -> tuple[str, dict[str, Any]]:
        """(path, JSON body): the client's own request (every OpenAI parameter it sent), with the
        typed fields as the authority wherever they say something (see GenerateRequest), then
        the backend's payload rules."""
        body = openai_request(request, model)
        if not self._streams(request):
            # A non-streamed request, or a backend that refuses streaming: asked for the whole answer
            # (the mesh still streams it to a client that asked for a stream).
            body.pop("stream", None)
            body.pop("stream_options", None)
        return ("/chat/completions" if request.WhichOneof("input") == "chat" else "/completions"), shaped(
            body, self.config
        )

    async def generate(
        self, request: inference_pb2.GenerateRequest, model: str
    ) -> AsyncGenerator[common_pb2.GenerationChunk, None]:
        """Stream the upstream's answer as GenerationChunks; the first one comes once it answered 200
        and sent something (an error status fails the call before any chunk)."""
        path, body = self._body(request, model)
        headers = {**self._auth(), "Content-Type": "application/json"}
        async with self._slot():
            try:
                async with self._client().post(
                    f"{self._base}{path}", data=orjson.dumps(body), headers=headers
                ) as response:
                    if response.status != 200:
                        raise status_error(self.name, response.status, response.headers, await response.read())
                    # An upstream that streams whatever it was asked is read as a stream.
                    if not self._streams(request) and response.content_type != "text/event-stream":
                        for chunk in self._whole(await response.read(), model):
                            yield chunk
                        return
                    async for chunk in self._chunks(response, model):
                        yield chunk
            except TimeoutError as exc:
                raise _timed_out(self.name) from exc
            except ValueError as exc:  # aiohttp's refusal of a line past read_bufsize
                raise _bad_gateway(self.name, f"a stream line too long to read ({exc})") from exc
            except aiohttp.ClientError as exc:
                raise _unreachable(self.name, exc) from exc

    def _whole(self, raw: bytes, model: str) -> list[common_pb2.GenerationChunk]:
        """A whole (non-streamed) answer as one chunk per choice: its text and other fields,
        its finish reason and the usage together (what a stream's chunks would add up to)."""
        try:
            answer = json.loads(raw)  # json, not orjson: an upstream may write NaN or -Infinity
            choices = answer["choices"]
            assert isinstance(choices, list)
        except (ValueError, KeyError, TypeError, AssertionError):
            raise _bad_gateway(self.name, "an answer that is not OpenAI's shape") from None
        usage = answer.get("usage") or {}
        chunks = []
        for i, raw_choice in enumerate(sorted(choices, key=lambda c: int(c.get("index", 0))) or [{}]):
            index = int(raw_choice.get("index", 0))
            message = raw_choice.get("message") or {}
            text = message.get("content") or raw_choice.get("text") or ""
            extras = {k: v for k, v in message.items() if k not in ("content", "role") and v is not None}
            if raw_choice.get("logprobs"):
                extras["logprobs"] = raw_choice["logprobs"]
            finish = raw_choice.get("finish_reason") or "stop"
            if finish not in FINISH_REASONS:
                extras["finish_reason"] = finish  # a reason the enum does not name, passed on as is
            chunks.append(
                common_pb2.GenerationChunk(
                    index=index,
                    text=text,
                    model=model,
                    prompt_tokens=int(usage.get("prompt_tokens", 0)),
                    completion_tokens=int(usage.get("completion_tokens", 0)) if i == 0 else 0,
                    finish_reason=FINISH_REASONS.get(finish, common_pb2.FINISH_REASON_STOP),
                    extra_json=orjson.dumps(extras).decode() if extras else "",
                )
            )
        return chunks

    async def forward(
        self, method: str, path: str, query: str, body: bytes, headers: dict[str, str]
    ) -> AsyncGenerator[tuple[int, dict[str, str], bytes], None]:
        """Pass a request through: (status, headers, first bytes), then (0, {}, more bytes) as they come.

        A JSON body is shaped like every request to this backend (payload drop/force);
        anything else goes as sent. Nothing is retried: the call may not be idempotent."""
        if body and headers.get("Content-Type", "").startswith("application/json"):
            try:
                parsed = json.loads(body)
            except ValueError:
                parsed = None
            if isinstance(parsed, dict) and (self.config.payload.drop or self.config.payload.force):
                body = json.dumps(shaped(parsed, self.config)).encode()
        url = f"{self._base}{path}" + (f"?{query}" if query else "")
        async with self._slot():
            try:
                async with self._client().request(
                    method, url, data=body or None, headers={**headers, **self._auth()}
                ) as response:
                    passed = {k.lower(): v for k, v in response.headers.items() if k.lower() in _PASSED_HEADERS}
                    first = True
                    async for data in response.content.iter_any():
                        yield (response.status if first else 0), (passed if first else {}), data
                        first = False
                    if first:
                        yield response.status, passed, b""
            except TimeoutError as exc:
                raise _timed_out(self.name) from exc
            except aiohttp.ClientError as exc:
                raise _unreachable(self.name, exc) from exc

    async def _chunks(
        self, response: aiohttp.ClientResponse, model: str
    ) -> AsyncGenerator[common_pb2.GenerationChunk, None]:
        choices: dict[int, _Choice] = {}
        usage: dict[str, Any] = {}
        done = False
        async for raw_line in response.content:
            if not raw_line.startswith(b"data:"):
                continue
            data = raw_line[5:].strip().decode(errors="replace")
            if data == "[DONE]" or done:
                # Read to the end all the same: a response left unread closes
                # its connection instead of returning it to the pool.
                done = True
                continue
            try:
                event = json.loads(data)
            except ValueError:
                raise _bad_gateway(self.name, f"a stream event that is not JSON ({data[:80]!r})") from None
            if not isinstance(event, dict) or not isinstance(event.get("choices", []), list):
                raise _bad_gateway(self.name, "a stream event that is not OpenAI's chunk shape")
            if "error" in event:
                raise UpstreamError(
                    ErrorKind.BAD_GATEWAY,
                    f"The upstream {self.name!r} failed mid-answer: {_error_message(data.encode())}",
                    retryable=False,
                    backend_fault=True,
                )
            if event.get("usage"):
                usage = event["usage"]
            for raw in event.get("choices", []):
                index = int(raw.get("index", 0))
                state = choices.setdefault(index, _Choice())
                delta = raw.get("delta") or {}
                text = delta.get("content") or raw.get("text") or ""
                extras = {k: v for k, v in delta.items() if k not in ("content", "role") and v is not None}
                if raw.get("logprobs"):
                    extras["logprobs"] = raw["logprobs"]
                if raw.get("finish_reason"):
                    state.finish = raw["finish_reason"]
                if text or extras:
                    yield common_pb2.GenerationChunk(
                        index=index, text=text, model=model, extra_json=json.dumps(extras) if extras else ""
                    )
        if not done and not usage and not any(c.finish for c in choices.values()):
            raise UpstreamError(
                ErrorKind.BAD_GATEWAY,
                f"The upstream {self.name!r} ended the stream early.",
                retryable=False,
                backend_fault=True,
            )
        # Finish every choice once the usage is known (it comes after the finish reasons).
        prompt_tokens = int(usage.get("prompt_tokens", 0))
        completion = int(usage.get("completion_tokens", 0))
        for i, index in enumerate(sorted(choices) or [0]):
            state = choices.get(index, _Choice(finish="stop"))
            yield common_pb2.GenerationChunk(
                index=index,
                model=model,
                prompt_tokens=prompt_tokens,
                completion_tokens=completion if i == 0 else 0,  # usage is for all choices together
                finish_reason=FINISH_REASONS.get(state.finish or "stop", common_pb2.FINISH_REASON_STOP),
                extra_json=json.dumps({"finish_reason": state.finish}) if state.finish not in FINISH_REASONS else "",
            )

    # --- reranking ------------------------------------------------------------------

    def _rerank_body(self, request: common_pb2.RerankRequest, model: str) -> dict[str, Any]:
        assert self.config.rerank is not None
        if self.config.rerank.api == "ranking":
            return {
                "model": model,
                "query": {"text": request.query},
                "passages": [{"text": d} for d in request.documents],
                "truncate": "END" if request.truncate else "NONE",
            }
        return {"model": model, "query": request.query, "documents": list(request.documents), "return_documents": False}

    async def rerank(self, request: common_pb2.RerankRequest, model: str) -> common_pb2.RerankResponse:
        """Every document's scores from the upstream reranker, best first, in both scales."""
        assert self.config.rerank is not None
        url = f"{self._base}{self.config.rerank.url_path()}"
        async with self._slot():
            try:
                async with self._client().post(
                    url, json=self._rerank_body(request, model), headers=self._auth()
                ) as response:
                    body = await response.read()
                    if response.status != 200:
                        raise status_error(self.name, response.status, response.headers, body)
            except TimeoutError as exc:
                raise _timed_out(self.name) from exc
            except aiohttp.ClientError as exc:
                raise _unreachable(self.name, exc) from exc
        return self._rerank_answer(body, model, len(request.documents))

    def _rerank_answer(self, body: bytes, model: str, documents: int) -> common_pb2.RerankResponse:
        assert self.config.rerank is not None
        nim = self.config.rerank.api == "ranking"
        try:
            data = json.loads(body)
            items = data["rankings"] if nim else data["results"]
            scored = {int(item["index"]): float(item["logit"] if nim else item["relevance_score"]) for item in items}
            usage = data.get("usage") or {}
            tokens = int(usage.get("prompt_tokens") or usage.get("total_tokens") or 0)
        except (ValueError, KeyError, TypeError, AttributeError):
            shape = "NIM's rankings" if nim else "a rerank results list"
            raise _bad_gateway(self.name, f"a rerank answer that is not {shape}") from None
        if sorted(scored) != list(range(documents)):
            raise _bad_gateway(self.name, f"scores for {len(scored)} of {documents} documents")
        values = [scored[i] for i in range(documents)]
        if nim:
            results = ranked(values, [sigmoid(v) for v in values])
        else:
            # A relevance outside [0, 1] (a server returning raw scores) is a logit already.
            results = ranked([logit_of(v) for v in values], [v if 0 <= v <= 1 else sigmoid(v) for v in values])
        return common_pb2.RerankResponse(results=results, model=model, prompt_tokens=tokens)
