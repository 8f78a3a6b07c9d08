"""One Process call: raw generation chunks in, OpenAI-shaped output out.

Pure logic (no I/O) so it can be tested chunk by chunk; the servicer feeds it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson

from postprocess.stops import StopMatcher
from ragmesh.errors import invalid_request
from ragmesh.v1 import common_pb2, postprocess_pb2

FINISH_NAMES = {
    common_pb2.FINISH_REASON_STOP: "stop",
    common_pb2.FINISH_REASON_LENGTH: "length",
    common_pb2.FINISH_REASON_CONTENT_FILTER: "content_filter",
    common_pb2.FINISH_REASON_TOOL_CALLS: "tool_calls",
}


@dataclass
class _Choice:
    index: int
    matcher: StopMatcher
    started: bool = False
    finish_reason: str | None = None
    completion_tokens: int = 0
    parts: list[str] = field(default_factory=list)


class ProcessSession:
    """Turns the generation of one request into client-ready chunks or one response."""

    def __init__(self, start: postprocess_pb2.ProcessStart) -> None:
        if len(start.stop) > 4:
            raise invalid_request("stop accepts at most 4 sequences", param="stop")
        self._start = start
        self._chat = start.object == postprocess_pb2.OBJECT_KIND_CHAT_COMPLETION
        self._choices = [_Choice(i, StopMatcher(start.stop)) for i in range(max(1, start.n))]
        self._prompt_tokens = 0
        self._cached_tokens = 0
        self.done = False

    # --- input ------------------------------------------------------------------

    def feed(self, chunk: common_pb2.GenerationChunk) -> list[postprocess_pb2.ProcessResponse]:
        """Take one generation chunk; return what to send to the client now."""
        if self.done:
            return []
        if not 0 <= chunk.index < len(self._choices):
            raise invalid_request(f"choice index {chunk.index} out of range", param="n")
        choice = self._choices[chunk.index]
        if choice.finish_reason is not None:
            return []  # a stop sequence already ended this choice; the rest is discarded
        self._prompt_tokens = max(self._prompt_tokens, chunk.prompt_tokens)
        self._cached_tokens = max(self._cached_tokens, chunk.cached_prompt_tokens)
        choice.completion_tokens = max(choice.completion_tokens, chunk.completion_tokens)

        out: list[postprocess_pb2.ProcessResponse] = []
        if not choice.started:
            choice.started = True
            if self._start.stream and self._chat:
                out.append(self._chunk(choice.index, {"role": "assistant", "content": ""}, None))
        text, hit = choice.matcher.push(chunk.text)
        if hit:
            choice.finish_reason = "stop"
        elif chunk.finish_reason != common_pb2.FINISH_REASON_UNSPECIFIED:
            text += choice.matcher.flush()
            choice.finish_reason = FINISH_NAMES.get(chunk.finish_reason, "stop")
        if text:
            choice.parts.append(text)
            if self._start.stream:
                out.append(self._chunk(choice.index, {"content": text}, None))
        if choice.finish_reason is not None:
            if self._start.stream:
                out.append(self._chunk(choice.index, {}, choice.finish_reason))
            if all(c.finish_reason is not None for c in self._choices):
                out.extend(self._final())
        return out

    # --- output -----------------------------------------------------------------

    def usage(self) -> dict[str, Any]:
        completion = sum(c.completion_tokens for c in self._choices)
        return {
            "prompt_tokens": self._prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": self._prompt_tokens + completion,
            "prompt_tokens_details": {"cached_tokens": self._cached_tokens},
        }

    def _final(self) -> list[postprocess_pb2.ProcessResponse]:
        self.done = True
        if not self._start.stream:
            return [postprocess_pb2.ProcessResponse(response_json=self._response_json(), generation_done=True)]
        if self._start.include_usage:
            body = self._envelope()
            body["choices"] = []
            body["usage"] = self.usage()
            return [postprocess_pb2.ProcessResponse(chunk_json=_dumps(body), generation_done=True)]
        return [postprocess_pb2.ProcessResponse(generation_done=True)]

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

    def _chunk(self, index: int, delta: dict[str, Any], finish_reason: str | None) -> postprocess_pb2.ProcessResponse:
        body = self._envelope()
        if self._chat:
            choice: dict[str, Any] = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        else:
            choice = {
                "index": index,
                "text": delta.get("content", ""),
                "logprobs": None,
                "finish_reason": finish_reason,
            }
        body["choices"] = [choice]
        if self._start.include_usage:
            body["usage"] = None
        return postprocess_pb2.ProcessResponse(chunk_json=_dumps(body))

    def _response_json(self) -> str:
        body = self._envelope()
        choices: list[dict[str, Any]] = []
        for c in self._choices:
            text = "".join(c.parts)
            if self._chat:
                message = {"role": "assistant", "content": text, "refusal": None}
                choices.append(
                    {"index": c.index, "message": message, "logprobs": None, "finish_reason": c.finish_reason}
                )
            else:
                choices.append({"index": c.index, "text": text, "logprobs": None, "finish_reason": c.finish_reason})
        body["choices"] = choices
        body["usage"] = self.usage()
        return _dumps(body)


def _dumps(body: dict[str, Any]) -> str:
    return orjson.dumps(body).decode()
