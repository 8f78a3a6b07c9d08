"""Ollama's answers from the mesh's OpenAI-shaped ones: one JSON body, or NDJSON lines.

The counterpart of `serving.ollama` (requests): a chat.completion or text_completion
becomes Ollama's /api/chat or /api/generate body, a stream of OpenAI chunk events
becomes Ollama's lines, ending in the `done: true` line with the token counts.
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

import orjson

from ragmesh.errors import RagmeshError


class _Second:
    """The date-and-time part of the current second, formatted once a second rather than once a
    line (strftime was half of a streamed line's cost)."""

    at = -1
    text = ""


def created_at() -> str:
    """Ollama's timestamp: RFC 3339 in UTC, with microseconds."""
    now = time.time()
    second = int(now)
    if second != _Second.at:
        _Second.text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        _Second.at = second
    return f"{_Second.text}.{min(999_999, int((now - second) * 1_000_000)):06d}Z"


def _token_logprobs(choice: dict[str, Any]) -> list[dict[str, Any]] | None:
    """A choice's logprobs as Ollama lists them: OpenAI's chat `content` entries."""
    logprobs = choice.get("logprobs")
    return logprobs.get("content") if isinstance(logprobs, dict) else None


def _ollama_calls(calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """OpenAI's tool calls as Ollama's: arguments as an object."""
    out = []
    for call in calls:
        function = call.get("function") or {}
        raw = function.get("arguments") or "{}"
        try:
            arguments = orjson.loads(raw) if isinstance(raw, str) else raw
        except orjson.JSONDecodeError:
            arguments = {}  # a call the model left unfinished (cut by max_tokens)
        out.append({"id": call.get("id"), "function": {"name": function.get("name", ""), "arguments": arguments}})
    return out


def _done_reason(finish: str | None) -> str:
    # Ollama says "stop" for an answer that ended in tool calls too.
    return "length" if finish == "length" else "stop"


def _counts(usage: dict[str, Any] | None, started: float) -> dict[str, Any]:
    total = int((time.perf_counter() - started) * 1e9)
    usage = usage or {}
    return {
        "total_duration": total,
        "load_duration": 0,
        "prompt_eval_count": int(usage.get("prompt_tokens", 0)),
        "prompt_eval_duration": 0,
        "eval_count": int(usage.get("completion_tokens", 0)),
        "eval_duration": total,
    }


def chat_body(openai: dict[str, Any], model: str, started: float) -> dict[str, Any]:
    """A chat.completion as Ollama's /api/chat answer."""
    choice = openai["choices"][0]
    message = choice["message"]
    out: dict[str, Any] = {"role": "assistant", "content": message.get("content") or ""}
    if message.get("tool_calls"):
        out["tool_calls"] = _ollama_calls(message["tool_calls"])
    logprobs = _token_logprobs(choice)
    return {
        "model": model,
        "created_at": created_at(),
        "message": out,
        **({"logprobs": logprobs} if logprobs else {}),
        "done": True,
        "done_reason": _done_reason(choice.get("finish_reason")),
        **_counts(openai.get("usage"), started),
        **_rag_fields(openai),
    }


def generate_body(openai: dict[str, Any], model: str, started: float) -> dict[str, Any]:
    """A chat.completion or text_completion as Ollama's /api/generate answer."""
    choice = openai["choices"][0]
    text = choice["message"].get("content") or "" if "message" in choice else choice.get("text", "")
    return {
        "model": model,
        "created_at": created_at(),
        "response": text,
        "done": True,
        "done_reason": _done_reason(choice.get("finish_reason")),
        **_counts(openai.get("usage"), started),
        **_rag_fields(openai),
    }


def loaded_body(model: str) -> dict[str, Any]:
    """The answer to an empty /api/generate prompt: the model is ready."""
    return {"model": model, "created_at": created_at(), "response": "", "done": True, "done_reason": "load"}


def _rag_fields(openai: dict[str, Any]) -> dict[str, Any]:
    """ragmesh's own fields (citations, rag) kept on the answer, as on the OpenAI routes."""
    return {k: openai[k] for k in ("citations", "rag") if k in openai}


def error_line(err: RagmeshError) -> bytes:
    """A failure once the stream started, as Ollama sends it: a line with `error` (the client raises it)."""
    return orjson.dumps({"error": err.message}) + b"\n"


async def ndjson_lines(
    chunks: AsyncIterator[str], model: str, chat: bool, started: float
) -> AsyncGenerator[bytes, None]:
    """OpenAI chunk events (JSON text) as Ollama's NDJSON lines: text as it comes, tool calls whole
    (Ollama never streams a call's arguments), then the `done` line with the counts."""
    finish: str | None = None
    usage: dict[str, Any] | None = None
    extras: dict[str, Any] = {}
    calls: dict[int, dict[str, Any]] = {}
    async for raw in chunks:
        event = orjson.loads(raw)
        if event.get("usage"):
            usage = event["usage"]
        if "citations" in event or "rag" in event:  # only the last chunk with choices has them
            extras.update(_rag_fields(event))
        for choice in event.get("choices") or ():
            finish = choice.get("finish_reason") or finish
            delta = choice.get("delta")
            text = (delta.get("content") if delta is not None else choice.get("text")) or ""
            for call in (delta or {}).get("tool_calls") or ():
                merged = calls.setdefault(int(call.get("index", 0)), {"function": {"name": "", "arguments": ""}})
                merged["id"] = call.get("id") or merged.get("id")
                function = call.get("function") or {}
                merged["function"]["name"] += function.get("name") or ""
                merged["function"]["arguments"] += function.get("arguments") or ""
            if text:
                yield _line(model, chat, text, _token_logprobs(choice))
    if calls:
        message = {"role": "assistant", "content": "", "tool_calls": _ollama_calls([calls[i] for i in sorted(calls)])}
        yield orjson.dumps({"model": model, "created_at": created_at(), "message": message, "done": False}) + b"\n"
    last: dict[str, Any] = {"model": model, "created_at": created_at()}
    if chat:
        last["message"] = {"role": "assistant", "content": ""}
    else:
        last["response"] = ""
    last.update({"done": True, "done_reason": _done_reason(finish), **_counts(usage, started), **extras})
    yield orjson.dumps(last) + b"\n"


def _line(model: str, chat: bool, text: str, logprobs: list[dict[str, Any]] | None = None) -> bytes:
    body: dict[str, Any] = {"model": model, "created_at": created_at()}
    if chat:
        body["message"] = {"role": "assistant", "content": text}
    else:
        body["response"] = text
    if logprobs:
        body["logprobs"] = logprobs
    body["done"] = False
    return orjson.dumps(body) + b"\n"
