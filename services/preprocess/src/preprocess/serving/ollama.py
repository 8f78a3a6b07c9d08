"""Ollama's API (/api/chat, /api/generate, /api/embed, ...) as a front on the same serving layer.

An Ollama request becomes the OpenAI request the mesh already serves (same
validation, limits, RAG aliases, guardrails, cache and metrics): `options` map
to sampling parameters, `format` to `response_format`, `images` to image parts,
Ollama's tool calls (arguments as objects) to OpenAI's (arguments as JSON text).
The answer, OpenAI-shaped, is turned back into Ollama's bodies by
`serving.ollama_answers`.
"""

from __future__ import annotations

from typing import Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictStr

from preprocess.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingsRequest,
    parse_chat_request,
    parse_completion_request,
    validated,
)
from preprocess.settings import PreprocessSettings
from ragmesh.errors import invalid_request

# The Ollama version the API follows (clients check /api/version for features).
OLLAMA_VERSION = "0.12.6"

# Ollama options that are OpenAI (or llama.cpp) sampling parameters of the same meaning.
_SAME_NAME = ("temperature", "top_p", "seed", "presence_penalty", "frequency_penalty", "stop")
# llama.cpp's own samplers: passed on as the engine reads them (an upstream may ignore them).
_LLAMA_SAMPLERS = (
    "top_k",
    "min_p",
    "typical_p",
    "repeat_penalty",
    "repeat_last_n",
    "mirostat",
    "mirostat_tau",
    "mirostat_eta",
    "tfs_z",
)
# What Ollama's options set on the server (context size, threads, GPU layers, memory mapping):
# engine-internal, never taken from a client; accepted and left alone, as the mesh sizes its engine itself.


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="allow")


class OllamaMessage(_Lenient):
    role: Literal["system", "user", "assistant", "tool"]
    content: StrictStr | None = ""
    images: list[StrictStr] | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_name: StrictStr | None = None
    thinking: StrictStr | None = None


class _Generating(_Lenient):
    model: StrictStr = Field(min_length=1)
    format: StrictStr | dict[str, Any] | None = None
    options: dict[str, Any] | None = None
    stream: StrictBool = True
    keep_alive: StrictStr | int | float | None = None
    think: StrictBool | StrictStr | None = None
    logprobs: StrictBool | None = None
    top_logprobs: int | None = None
    # ragmesh's own: answer from a collection, as on the OpenAI routes.
    rag: dict[str, Any] | None = None


class OllamaChatRequest(_Generating):
    """POST /api/chat."""

    messages: list[OllamaMessage] = Field(default_factory=list)
    tools: list[dict[str, Any]] | None = None


class OllamaGenerateRequest(_Generating):
    """POST /api/generate."""

    prompt: StrictStr = ""
    suffix: StrictStr | None = None
    system: StrictStr | None = None
    template: StrictStr | None = None
    raw: StrictBool = False
    images: list[StrictStr] | None = None
    context: list[int] | None = None


class OllamaEmbedRequest(_Lenient):
    """POST /api/embed."""

    model: StrictStr = Field(min_length=1)
    input: StrictStr | list[StrictStr]
    truncate: StrictBool = True
    dimensions: int | None = None
    options: dict[str, Any] | None = None
    keep_alive: StrictStr | int | float | None = None


class OllamaEmbeddingsRequest(_Lenient):
    """POST /api/embeddings (Ollama's older embeddings endpoint)."""

    model: StrictStr = Field(min_length=1)
    prompt: StrictStr
    options: dict[str, Any] | None = None
    keep_alive: StrictStr | int | float | None = None


class OllamaShowRequest(_Lenient):
    """POST /api/show (`name` is the older spelling of `model`)."""

    model: StrictStr | None = None
    name: StrictStr | None = None
    verbose: StrictBool | None = None

    def model_name(self) -> str:
        name = self.model or self.name
        if not name:
            raise invalid_request("Missing required parameter: 'model'.", param="model")
        return name


def model_name(name: str, known: set[str] | None = None) -> str:
    """The mesh's model for an Ollama name: `name:latest` is `name` when only that is served."""
    if name.endswith(":latest") and known is not None and name not in known and name[: -len(":latest")] in known:
        return name[: -len(":latest")]
    return name


def _sampling(req: _Generating) -> dict[str, Any]:
    """Ollama's options and format as OpenAI request fields."""
    out: dict[str, Any] = {}
    options = req.options or {}
    if not isinstance(options, dict):
        raise invalid_request("'options' must be an object.", param="options")
    for name in _SAME_NAME:
        if options.get(name) is not None:
            out[name] = options[name]
    for name in _LLAMA_SAMPLERS:
        if options.get(name) is not None:
            out[name] = options[name]
    limit = options.get("num_predict")
    # -1 (until the context is full) and -2 (fill the context) are the engine's own limit.
    if isinstance(limit, int) and limit > 0:
        out["max_tokens"] = limit
    if req.rag is not None:
        out["rag"] = req.rag
    fmt = req.format
    if fmt == "json":
        out["response_format"] = {"type": "json_object"}
    elif isinstance(fmt, dict):
        out["response_format"] = {"type": "json_schema", "json_schema": {"name": "response", "schema": fmt}}
    elif fmt not in (None, ""):
        raise invalid_request(f'invalid format: {fmt!r} ("json" or a JSON schema)', param="format")
    return out


def _logprobs(req: _Generating) -> dict[str, Any]:
    """Ollama's logprobs / top_logprobs: OpenAI's chat fields of the same names."""
    out: dict[str, Any] = {}
    if req.logprobs:
        out["logprobs"] = True
        if req.top_logprobs:
            out["top_logprobs"] = req.top_logprobs
    return out


def _image_part(data: str) -> dict[str, Any]:
    """An Ollama image (base64, no media type) as an OpenAI image part with a data: URL."""
    kind = "jpeg" if data.startswith("/9j/") else "gif" if data.startswith("R0lG") else "png"
    return {"type": "image_url", "image_url": {"url": f"data:image/{kind};base64,{data}"}}


def _openai_messages(messages: list[OllamaMessage]) -> list[dict[str, Any]]:
    """Ollama's messages as OpenAI's: images as parts, tool calls with ids, tool results linked to them."""
    out: list[dict[str, Any]] = []
    calls_by_name: dict[str, list[str]] = {}
    for i, m in enumerate(messages):
        text = m.content or ""
        message: dict[str, Any] = {"role": m.role, "content": text}
        if m.images:
            message["content"] = [{"type": "text", "text": text}, *(_image_part(img) for img in m.images)]
        if m.role == "assistant" and m.tool_calls:
            calls = []
            for j, call in enumerate(m.tool_calls):
                function = call.get("function") or {}
                arguments = function.get("arguments", {})
                call_id = str(call.get("id") or f"call_{i}_{j}")
                name = str(function.get("name", ""))
                calls_by_name.setdefault(name, []).append(call_id)
                calls.append(
                    {
                        "id": call_id,
                        "type": "function",
                        "function": {
                            "name": name,
                            "arguments": arguments if isinstance(arguments, str) else orjson.dumps(arguments).decode(),
                        },
                    }
                )
            message["tool_calls"] = calls
            message["content"] = text or None
        if m.role == "tool":
            name = m.tool_name or str((m.model_extra or {}).get("name") or "")
            pending = calls_by_name.get(name) or next((ids for ids in calls_by_name.values() if ids), [])
            message["tool_call_id"] = str((m.model_extra or {}).get("tool_call_id") or "") or (
                pending.pop(0) if pending else f"call_{i}"
            )
            if name:
                message["name"] = name
        out.append(message)
    return out


def chat_request(body: Any, settings: PreprocessSettings, known: set[str] | None = None) -> ChatCompletionRequest:
    """An Ollama /api/chat body as the chat completion request the mesh runs (400 on any problem)."""
    req = validated(OllamaChatRequest, body)
    if not req.messages:
        raise invalid_request("'messages' must not be empty.", param="messages")
    openai: dict[str, Any] = {
        "model": model_name(req.model, known),
        "messages": _openai_messages(req.messages),
        "stream": req.stream,
        **_sampling(req),
    }
    if req.stream:
        openai["stream_options"] = {"include_usage": True}  # the done line's counts
    if req.tools:
        openai["tools"] = req.tools
    return parse_chat_request(
        {**openai, **_logprobs(req)}, settings.max_n, settings.max_data_url_bytes, settings.request_bounds()
    )


def generate_request(
    body: Any, settings: PreprocessSettings, known: set[str] | None = None
) -> tuple[OllamaGenerateRequest, ChatCompletionRequest | CompletionRequest | None]:
    """An Ollama /api/generate body and the request the mesh runs: a chat turn (the model's template
    applies, as Ollama does), a raw completion with `raw: true`, or None for an empty prompt (Ollama's
    "load the model" call, answered at once)."""
    req = validated(OllamaGenerateRequest, body)
    if req.suffix:
        raise invalid_request("'suffix' is not supported: the mesh's models do not fill in the middle.", param="suffix")
    if req.template:
        raise invalid_request("'template' is not supported: the model's own chat template applies.", param="template")
    if not req.prompt and not req.images:
        return req, None
    model = model_name(req.model, known)
    common: dict[str, Any] = {"model": model, "stream": req.stream, **_sampling(req)}
    if req.stream:
        common["stream_options"] = {"include_usage": True}
    if req.raw:
        common.pop("response_format", None)
        if req.format:
            raise invalid_request("'format' needs the chat template: leave out 'raw'.", param="format")
        common.setdefault("max_tokens", None)
        return req, parse_completion_request(
            {**common, "prompt": req.prompt}, settings.max_n, bounds=settings.request_bounds()
        )
    messages: list[OllamaMessage] = []
    if req.system:
        messages.append(OllamaMessage(role="system", content=req.system))
    messages.append(OllamaMessage(role="user", content=req.prompt, images=req.images))
    chat = {**common, "messages": _openai_messages(messages), **_logprobs(req)}
    return req, parse_chat_request(chat, settings.max_n, settings.max_data_url_bytes, settings.request_bounds())


def embed_request(body: Any) -> EmbeddingsRequest:
    """An Ollama /api/embed body as an embeddings request."""
    req = validated(OllamaEmbedRequest, body)
    openai: dict[str, Any] = {"model": req.model, "input": req.input, "truncate": "END" if req.truncate else "NONE"}
    if req.dimensions is not None:
        openai["dimensions"] = req.dimensions
    return validated(EmbeddingsRequest, openai)


def embeddings_request(body: Any) -> EmbeddingsRequest:
    """An Ollama /api/embeddings body (one prompt) as an embeddings request."""
    req = validated(OllamaEmbeddingsRequest, body)
    return validated(EmbeddingsRequest, {"model": req.model, "input": req.prompt, "truncate": "END"})
