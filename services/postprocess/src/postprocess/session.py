"""One Process call: raw generation chunks in, OpenAI-shaped output out.

Each choice's text goes through the stop-sequence matcher, then the guardrails,
before it is released; the whole answer is kept for the non-stream response,
for citations, for the response_format check and for the response cache.
Pure logic (no I/O) so it can be tested chunk by chunk; the servicer feeds it.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

import jsonschema
import orjson
from google.protobuf.json_format import MessageToDict, ParseDict

from postprocess.guardrails import StreamGuard
from postprocess.stops import StopMatcher
from ragmesh.errors import ErrorKind, RagmeshError, invalid_request
from ragmesh.v1 import common_pb2, postprocess_pb2

FINISH_NAMES = {
    common_pb2.FINISH_REASON_STOP: "stop",
    common_pb2.FINISH_REASON_LENGTH: "length",
    common_pb2.FINISH_REASON_CONTENT_FILTER: "content_filter",
    common_pb2.FINISH_REASON_TOOL_CALLS: "tool_calls",
}

# [1], [2, 3], [1][4]: citation markers as the RAG prompt asks for them.
_MARKER = re.compile(r"\[(\d{1,3}(?:\s*,\s*\d{1,3})*)\]")


@dataclass(frozen=True)
class GuardConfig:
    pii: tuple[str, ...] = ("email", "phone", "card")
    blocklist: tuple[str, ...] = ()
    stop_on_block: bool = True


@dataclass
class _Choice:
    index: int
    matcher: StopMatcher
    guard: StreamGuard
    started: bool = False
    finish_reason: str | None = None
    completion_tokens: int = 0
    parts: list[str] = field(default_factory=list)
    # What engines pass through besides text: tool calls (merged as OpenAI's
    # SDK does: by index, arguments appended), refusal text, logprobs lists.
    tool_calls: dict[int, dict[str, Any]] = field(default_factory=dict)
    refusal: str = ""
    logprobs: dict[str, list[Any]] = field(default_factory=dict)
    # Legacy completions: characters the logprobs' tokens covered so far (their text_offset).
    offset: int = 0
    # One guard per tool call: its arguments are text a client reads, held to the same guardrails.
    call_guards: dict[int, StreamGuard] = field(default_factory=dict)

    @property
    def text(self) -> str:
        return "".join(self.parts)

    def absorb(self, delta: dict[str, Any], logprobs: dict[str, Any] | None) -> None:
        for call in delta.get("tool_calls") or []:
            merged = self.tool_calls.setdefault(
                int(call.get("index", 0)), {"id": None, "type": "function", "function": {"name": "", "arguments": ""}}
            )
            merged["id"] = call.get("id") or merged["id"]
            merged["type"] = call.get("type") or merged["type"]
            function = call.get("function") or {}
            merged["function"]["name"] += function.get("name") or ""
            merged["function"]["arguments"] += function.get("arguments") or ""
        self.refusal += delta.get("refusal") or ""
        for key, values in (logprobs or {}).items():
            if isinstance(values, list):
                self.logprobs.setdefault(key, []).extend(values)

    def message_extras(self) -> dict[str, Any]:
        extras: dict[str, Any] = {}
        if self.tool_calls:
            extras["tool_calls"] = [self.tool_calls[i] for i in sorted(self.tool_calls)]
        if self.refusal:
            extras["refusal"] = self.refusal
        return extras


def cited_numbers(text: str) -> set[int]:
    return {int(n) for group in _MARKER.findall(text) for n in group.split(",")}


class ProcessSession:
    """Turns the generation of one request into client-ready chunks or one response."""

    def __init__(self, start: postprocess_pb2.ProcessStart, guards: GuardConfig | None = None) -> None:
        if len(start.stop) > 4:
            raise invalid_request("stop accepts at most 4 sequences", param="stop")
        guards = guards or GuardConfig()
        self._guards = guards
        self._start = start
        # UNSPECIFIED is a chat completion (see ObjectKind).
        self._chat = start.object != postprocess_pb2.OBJECT_KIND_TEXT_COMPLETION
        self._choices = [
            _Choice(i, StopMatcher(start.stop), StreamGuard(guards.pii, guards.blocklist, guards.stop_on_block))
            for i in range(max(1, start.n))
        ]
        self._prompt_tokens = 0
        self._cached_tokens = 0
        self.done = False
        self.from_cache = False

    # --- input ------------------------------------------------------------------

    def feed(self, chunk: common_pb2.GenerationChunk) -> list[postprocess_pb2.ProcessResponse]:
        """Take one generation chunk; return what to send to the client now."""
        if self.done:
            return []
        if not 0 <= chunk.index < len(self._choices):
            raise invalid_request(f"choice index {chunk.index} out of range", param="n")
        choice = self._choices[chunk.index]
        if choice.finish_reason is not None:
            return []  # a stop sequence or a guardrail already ended this choice
        self._prompt_tokens = max(self._prompt_tokens, chunk.prompt_tokens)
        self._cached_tokens = max(self._cached_tokens, chunk.cached_prompt_tokens)
        choice.completion_tokens = max(choice.completion_tokens, chunk.completion_tokens)

        out: list[postprocess_pb2.ProcessResponse] = []
        if not choice.started:
            choice.started = True
            if self._start.stream and self._chat:
                out.append(self._chunk(choice.index, {"role": "assistant", "content": ""}, None))
        extras: dict[str, Any] = json.loads(chunk.extra_json) if chunk.extra_json else {}
        finish_override = extras.pop("finish_reason", None)
        logprobs = extras.pop("logprobs", None)
        echoed = ""
        if not self._chat:
            prompt_logprobs = None
            if not choice.parts and self._start.echo:
                # The client's own prompt first, as sent: no stop sequence or guardrail applies to it.
                echoed = self._start.echo
                choice.parts.append(echoed)
                if self._start.echo_tokens:
                    prompt_logprobs = _echo_logprobs(choice, list(self._start.echo_tokens))
            if isinstance(logprobs, dict) and "content" in logprobs:
                logprobs = _completion_logprobs(choice, logprobs["content"] or [])
            if prompt_logprobs is not None:
                logprobs = _joined(prompt_logprobs, logprobs)
        calls_blocked = self._guard_calls(choice, extras.get("tool_calls"))
        choice.absorb(extras, logprobs)
        text, hit = choice.matcher.push(chunk.text)
        ending = hit or chunk.finish_reason != common_pb2.FINISH_REASON_UNSPECIFIED or calls_blocked
        tails: dict[str, Any] = {}
        if ending and not calls_blocked:
            tails, calls_blocked = self._flush_calls(choice)
            choice.absorb(tails, None)
        if not hit and ending:
            text += choice.matcher.flush()
        released = choice.guard.push(text)
        text = released.text
        if not released.blocked and ending:
            tail = choice.guard.flush()
            text += tail.text
            released.blocked = tail.blocked
        if released.blocked or calls_blocked:
            choice.finish_reason = "content_filter"
        elif hit:
            choice.finish_reason = "stop"
        elif ending:
            choice.finish_reason = finish_override or FINISH_NAMES.get(chunk.finish_reason, "stop")
        if text:
            choice.parts.append(text)
        if self._start.stream and (text or extras or logprobs or echoed):
            delta = {"content": echoed + text} if text or echoed else {}
            out.append(self._chunk(choice.index, {**delta, **extras}, None, logprobs=logprobs))
        if self._start.stream and tails:
            out.append(self._chunk(choice.index, tails, None))
        if choice.finish_reason is not None:
            self._check_format(choice)
            last = all(c.finish_reason is not None for c in self._choices)
            if self._start.stream:
                out.append(self._chunk(choice.index, {}, choice.finish_reason, final=last))
            if last:
                out.extend(self._final())
        return out

    def _guard_calls(self, choice: _Choice, calls: Any) -> bool:
        """Tool-call argument deltas through the guardrails (in place: what is released goes on);
        True when a blocklisted term ends the answer."""
        blocked = False
        for call in calls or ():
            function = call.get("function") if isinstance(call, dict) else None
            if not isinstance(function, dict) or not function.get("arguments"):
                continue
            guard = choice.call_guards.setdefault(int(call.get("index", 0)), self._new_guard())
            released = guard.push(str(function["arguments"]))
            function["arguments"] = released.text
            blocked = blocked or released.blocked
        return blocked

    def _flush_calls(self, choice: _Choice) -> tuple[dict[str, Any], bool]:
        """What the tool-call guards still hold at the end of the answer, as one more delta."""
        tails = []
        blocked = False
        for index, guard in sorted(choice.call_guards.items()):
            tail = guard.flush()
            blocked = blocked or tail.blocked
            if tail.text:
                tails.append({"index": index, "function": {"arguments": tail.text}})
        return ({"tool_calls": tails} if tails else {}), blocked

    def _new_guard(self) -> StreamGuard:
        return StreamGuard(self._guards.pii, self._guards.blocklist, self._guards.stop_on_block)

    def _check_format(self, choice: _Choice) -> None:
        """Enforce response_format on a finished answer (a truncated one is left to finish_reason)."""
        kind = self._start.response_format.type
        if kind not in ("json_object", "json_schema") or choice.finish_reason != "stop":
            return
        try:
            value = json.loads(choice.text)
        except ValueError as exc:
            raise _format_error(f"the answer is not valid JSON ({exc})") from None
        if kind == "json_object" and not isinstance(value, dict):
            raise _format_error("the answer is JSON but not an object")
        if kind == "json_schema" and self._start.response_format.schema_json:
            try:
                jsonschema.validate(value, json.loads(self._start.response_format.schema_json))
            except jsonschema.ValidationError as exc:
                raise _format_error(f"the answer does not match the schema: {exc.message}") from None
            except jsonschema.SchemaError as exc:  # preprocess refuses these up front; a client's error all the same
                raise invalid_request(
                    f"response_format.json_schema.schema is not a valid JSON Schema: {exc.message}.",
                    param="response_format.json_schema.schema",
                ) from None

    # --- cache --------------------------------------------------------------------

    def cache_record(self) -> dict[str, Any]:
        """What the response cache keeps of a finished answer."""
        return {
            "choices": [
                {"text": c.text, "finish_reason": c.finish_reason, "extras": c.message_extras(), "logprobs": c.logprobs}
                for c in self._choices
            ],
            "prompt_tokens": self._prompt_tokens,
            "cached_prompt_tokens": self._cached_tokens,
            "completion_tokens": [c.completion_tokens for c in self._choices],
            # The prompt's sources, so a replay cites without fitting the prompt again.
            "sources": [MessageToDict(s, preserving_proto_field_name=True) for s in self._start.sources],
            "rag": MessageToDict(self._start.rag, preserving_proto_field_name=True)
            if self._start.HasField("rag")
            else None,
        }

    def replay(self, record: dict[str, Any]) -> list[postprocess_pb2.ProcessResponse]:
        """The output of a cached answer, shaped for this request (its id, model, stream)."""
        self.from_cache = True
        self._prompt_tokens = int(record["prompt_tokens"])
        self._cached_tokens = int(record.get("cached_prompt_tokens", 0))
        if record.get("rag"):
            self._start.rag.CopyFrom(ParseDict(record["rag"], postprocess_pb2.RagReport()))
            del self._start.sources[:]
            self._start.sources.extend(ParseDict(s, postprocess_pb2.Source()) for s in record.get("sources", []))
        out: list[postprocess_pb2.ProcessResponse] = []
        for choice, saved, tokens in zip(self._choices, record["choices"], record["completion_tokens"], strict=False):
            choice.parts = [saved["text"]]
            choice.finish_reason = saved["finish_reason"]
            choice.absorb(
                {
                    "tool_calls": [
                        {**c, "index": i} for i, c in enumerate(saved.get("extras", {}).get("tool_calls", []))
                    ]
                },
                saved.get("logprobs"),
            )
            choice.refusal = saved.get("extras", {}).get("refusal", "")
            choice.completion_tokens = int(tokens)
        if self._start.stream:
            for i, choice in enumerate(self._choices):
                last = i == len(self._choices) - 1
                if self._chat:
                    out.append(self._chunk(choice.index, {"role": "assistant", "content": ""}, None))
                extras = choice.message_extras()
                if "tool_calls" in extras:
                    extras["tool_calls"] = [{"index": i, **c} for i, c in enumerate(extras["tool_calls"])]
                if choice.text or extras or choice.logprobs:
                    delta = {"content": choice.text} if choice.text else {}
                    out.append(self._chunk(choice.index, {**delta, **extras}, None, logprobs=choice.logprobs or None))
                out.append(self._chunk(choice.index, {}, choice.finish_reason, final=last))
        out.extend(self._final())
        return out

    # --- output -----------------------------------------------------------------

    def usage(self) -> dict[str, Any]:
        completion = sum(c.completion_tokens for c in self._choices)
        details: dict[str, Any] = {"cached_tokens": self._cached_tokens}
        if self._start.HasField("rag"):
            details["retrieval_tokens"] = self._start.rag.context_tokens
        return {
            "prompt_tokens": self._prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": self._prompt_tokens + completion,
            "prompt_tokens_details": details,
        }

    def citations(self) -> list[dict[str, Any]]:
        cited: set[int] = set()
        for choice in self._choices:
            cited |= cited_numbers(choice.text)
        return [
            {
                "index": s.index,
                "document_id": s.document_id,
                "chunk_id": s.chunk_id,
                "title": s.title,
                "score": s.score,
                "snippet": s.snippet,
                "cited": s.index in cited,
                **({"rerank_score": s.rerank_score} if s.HasField("rerank_score") else {}),
            }
            for s in self._start.sources
        ]

    def _extensions(self, body: dict[str, Any]) -> None:
        """ragmesh's own top-level fields: citations and rag (RAG requests), cached (cacheable ones)."""
        if self._start.HasField("rag"):
            body["citations"] = self.citations()
            body["rag"] = MessageToDict(
                self._start.rag, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
            )
        if self._start.cache_key:
            body["cached"] = self.from_cache

    def _final(self) -> list[postprocess_pb2.ProcessResponse]:
        self.done = True
        usage = self.usage()
        final = postprocess_pb2.ProcessResponse(
            generation_done=True,
            usage=common_pb2.Usage(
                prompt_tokens=usage["prompt_tokens"],
                completion_tokens=usage["completion_tokens"],
                total_tokens=usage["total_tokens"],
                cached_prompt_tokens=self._cached_tokens,
            ),
        )
        if not self._start.stream:
            final.response_json = self._response_json()
        elif self._start.include_usage:
            body = self._envelope()
            body["choices"] = []
            body["usage"] = usage
            final.chunk_json = _dumps(body)
        return [final]

    def _envelope(self) -> dict[str, Any]:
        if self._chat:
            object_name = "chat.completion.chunk" if self._start.stream else "chat.completion"
        else:
            object_name = "text_completion"
        return {
            "id": self._start.id,
            "object": object_name,
            "created": self._start.created,
            "model": self._start.model,
        }

    def _chunk(
        self,
        index: int,
        delta: dict[str, Any],
        finish_reason: str | None,
        final: bool = False,
        logprobs: dict[str, Any] | None = None,
    ) -> postprocess_pb2.ProcessResponse:
        body = self._envelope()
        choice: dict[str, Any] = {"index": index}
        if self._chat:
            choice["delta"] = delta
        else:
            choice["text"] = delta.get("content", "")
        choice["logprobs"] = logprobs
        choice["finish_reason"] = finish_reason
        body["choices"] = [choice]
        if self._start.include_usage:
            body["usage"] = None
        if final:  # the last chunk with choices carries the response-level fields
            self._extensions(body)
        return postprocess_pb2.ProcessResponse(chunk_json=_dumps(body))

    def _response_json(self) -> str:
        body = self._envelope()
        choices: list[dict[str, Any]] = []
        for c in self._choices:
            logprobs = c.logprobs or None
            if self._chat:
                extras = c.message_extras()
                content = c.text if c.text or "tool_calls" not in extras else None
                message = {"role": "assistant", "content": content, "refusal": None, **extras}
                choices.append(
                    {"index": c.index, "message": message, "logprobs": logprobs, "finish_reason": c.finish_reason}
                )
            else:
                choice = {"index": c.index, "text": c.text, "logprobs": logprobs, "finish_reason": c.finish_reason}
                choices.append(choice)
        body["choices"] = choices
        body["usage"] = self.usage()
        self._extensions(body)
        return _dumps(body)


def _completion_logprobs(choice: _Choice, content: list[dict[str, Any]]) -> dict[str, list[Any]]:
    """Chat-shaped logprobs (llama.cpp gives these for completions too) in the legacy completions
    shape: tokens, token_logprobs, top_logprobs (token -> logprob), text_offset in the choice's text."""
    out: dict[str, list[Any]] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for entry in content:
        token = str(entry.get("token", ""))
        out["tokens"].append(token)
        out["token_logprobs"].append(entry.get("logprob"))
        top = entry.get("top_logprobs")
        out["top_logprobs"].append({str(t.get("token", "")): t.get("logprob") for t in top} if top else None)
        out["text_offset"].append(choice.offset)
        choice.offset += len(token)
    return out


def _echo_logprobs(choice: _Choice, tokens: list[str]) -> dict[str, list[Any]]:
    """The echoed prompt's tokens: the engine does not score a prompt, so their logprobs are null."""
    return _completion_logprobs(choice, [{"token": t, "logprob": None} for t in tokens])


def _joined(first: dict[str, list[Any]], then: Any) -> Any:
    """Two completions-shaped logprobs as one (the echoed prompt's, then the first generated token's)."""
    if not isinstance(then, dict):
        return first
    return {key: first.get(key, []) + list(then.get(key, [])) for key in {*first, *then}}


def _format_error(detail: str) -> RagmeshError:
    return RagmeshError(
        ErrorKind.INTERNAL,
        f"The model's answer does not satisfy response_format: {detail}.",
        param="response_format",
        code="response_format_violation",
    )


def _dumps(body: dict[str, Any]) -> str:
    return orjson.dumps(body).decode()
