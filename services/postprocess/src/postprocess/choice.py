"""One choice of an answer, channel by channel.

A client reads more than `content`: reasoning text (`reasoning_content`), a
`refusal`, tool-call arguments, and whatever other text field an upstream puts
in a delta. Each of those is a channel with its own stop-sequence matcher and
guardrail filter, so nothing a client can read skips either: a stop sequence in
any channel ends the choice, a redaction applies wherever the text shows up.

Logprobs cannot be filtered without lying (a redacted token has no honest
logprob), so with the guardrails on they are never released (preprocess refuses
the request up front, naming the parameter); without guardrails they are held
while the stop matcher holds text back and dropped with a stop sequence's tokens.
Structured fields an upstream adds that are not text (anything but tool calls)
cannot be filtered either and are dropped.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from postprocess.guardrails import StreamGuard
from postprocess.stops import StopMatcher

# Delta fields that are not text a model wrote.
_STRUCTURAL = frozenset({"role", "index"})

# A tool call's arguments channel: ("tool_calls", index); a text field's: (field,).
ChannelKey = tuple[str, ...]


@dataclass
class Guards:
    """What every channel of a choice is filtered with (a factory: each channel holds its own state)."""

    stops: tuple[str, ...]
    pii: tuple[str, ...]
    blocklist: tuple[str, ...]
    stop_on_block: bool

    def matcher(self) -> StopMatcher:
        return StopMatcher(self.stops)

    def guard(self) -> StreamGuard:
        return StreamGuard(self.pii, self.blocklist, self.stop_on_block)

    @property
    def active(self) -> bool:
        return bool(self.pii or [t for t in self.blocklist if t.strip()])


@dataclass
class Released:
    """What a channel lets out of one push: text, and whether it ended the choice (and how)."""

    text: str = ""
    stop: bool = False
    blocked: bool = False


class Channel:
    """Stop sequences, then guardrails, over one stream of text."""

    def __init__(self, guards: Guards) -> None:
        self._matcher = guards.matcher()
        self._guard = guards.guard()

    @property
    def holding(self) -> bool:
        return self._matcher.holding

    def push(self, text: str, ending: bool) -> Released:
        out, hit = self._matcher.push(text)
        if ending and not hit:
            out += self._matcher.flush()
        released = self._guard.push(out)
        result = Released(released.text, stop=hit, blocked=released.blocked)
        if not released.blocked and (ending or hit):
            tail = self._guard.flush()
            result.text += tail.text
            result.blocked = tail.blocked
        return result


@dataclass
class Choice:
    index: int
    guards: Guards
    started: bool = False
    finish_reason: str | None = None
    completion_tokens: int = 0
    parts: list[str] = field(default_factory=list)
    channels: dict[ChannelKey, Channel] = field(default_factory=dict)
    # Released (filtered) output besides content, merged as OpenAI's SDK does.
    tool_calls: dict[int, dict[str, Any]] = field(default_factory=dict)
    fields: dict[str, str] = field(default_factory=dict)  # refusal, reasoning_content, ...
    logprobs: dict[str, list[Any]] = field(default_factory=dict)
    # Legacy completions: characters the logprobs' tokens covered so far (their text_offset).
    offset: int = 0
    _pending_logprobs: list[dict[str, Any]] = field(default_factory=list)

    @property
    def text(self) -> str:
        return "".join(self.parts)

    def _channel(self, key: ChannelKey) -> Channel:
        if key not in self.channels:
            self.channels[key] = Channel(self.guards)
        return self.channels[key]

    def push(
        self, text: str, extras: dict[str, Any], logprobs: dict[str, Any] | None, ending: bool
    ) -> tuple[str, dict[str, Any], dict[str, Any] | None, Released]:
        """One generation chunk through every channel: (content, other delta fields, logprobs,
        how it ended). `ending`: the engine finished this choice with this chunk."""
        verdict = Released()
        content = self._push(("content",), text, ending, verdict)
        delta: dict[str, Any] = {}
        calls = []
        for position, call in enumerate(extras.get("tool_calls") or []):
            if not isinstance(call, dict):
                continue
            index = int(call.get("index", position))
            out = {k: v for k, v in call.items() if k != "function"}
            out["index"] = index
            raw_function = call.get("function")
            function: dict[str, Any] = raw_function if isinstance(raw_function, dict) else {}
            released_args = self._push(("tool_calls", str(index)), str(function.get("arguments") or ""), False, verdict)
            out_function = {k: v for k, v in function.items() if k != "arguments"}
            if "arguments" in function or released_args:
                out_function["arguments"] = released_args
            if out_function or "function" in call:
                out["function"] = out_function
            calls.append(out)
            self._merge_call(out)
        if calls:
            delta["tool_calls"] = calls
        for name, value in extras.items():
            if name == "tool_calls" or name in _STRUCTURAL or value is None:
                continue
            if isinstance(value, str):
                released = self._push((name,), value, False, verdict)
                if released:
                    delta[name] = released
                    self.fields[name] = self.fields.get(name, "") + released
            # Anything else an upstream adds cannot be filtered: it is not passed on.
        if (ending or verdict.stop) and not verdict.blocked:
            # The choice ends here: every channel lets out what it held back (filtered); after
            # a blocked term nothing more is let out.
            content += self._push(("content",), "", True, verdict)
            self._flush_others(delta, verdict)
        return content, delta, self._logprobs(logprobs, verdict), verdict

    def _push(self, key: ChannelKey, text: str, ending: bool, verdict: Released) -> str:
        if not text and not ending and key not in self.channels:
            return ""
        released = self._channel(key).push(text, ending)
        verdict.stop = verdict.stop or released.stop
        verdict.blocked = verdict.blocked or released.blocked
        return released.text

    def _flush_others(self, delta: dict[str, Any], verdict: Released) -> None:
        """The choice ends: every channel lets out what it held (filtered)."""
        for key in list(self.channels):
            if key == ("content",):
                continue
            tail = self._push(key, "", True, verdict)
            if not tail:
                continue
            if key[0] == "tool_calls":
                index = int(key[1])
                call = {"index": index, "function": {"arguments": tail}}
                delta.setdefault("tool_calls", []).append(call)
                self._merge_call(call)
            else:
                delta[key[0]] = delta.get(key[0], "") + tail
                self.fields[key[0]] = self.fields.get(key[0], "") + tail

    def _merge_call(self, call: dict[str, Any]) -> None:
        merged = self.tool_calls.setdefault(
            int(call.get("index", 0)), {"id": None, "type": "function", "function": {"name": "", "arguments": ""}}
        )
        merged["id"] = call.get("id") or merged["id"]
        merged["type"] = call.get("type") or merged["type"]
        function = call.get("function") or {}
        merged["function"]["name"] += function.get("name") or ""
        merged["function"]["arguments"] += function.get("arguments") or ""

    def _logprobs(self, logprobs: dict[str, Any] | None, verdict: Released) -> dict[str, Any] | None:
        """Logprobs released with the text they cover: held while a stop sequence may be starting,
        dropped with one; never released under guardrails (a redacted token has no honest logprob)."""
        if self.guards.active:
            return None
        if logprobs:
            self._pending_logprobs.append(logprobs)
        if verdict.stop:
            self._pending_logprobs.clear()
            return None
        if any(c.holding for c in self.channels.values()):
            return None
        pending, self._pending_logprobs = self._pending_logprobs, []
        merged: dict[str, Any] = {}
        for item in pending:
            for key, values in item.items():
                if isinstance(values, list):
                    merged.setdefault(key, []).extend(values)
                    self.logprobs.setdefault(key, []).extend(values)
        return merged or None

    def restore(self, saved: dict[str, Any], tokens: int) -> None:
        """A cached (already filtered) answer, as this choice."""
        self.parts = [saved["text"]]
        self.finish_reason = saved["finish_reason"]
        extras = dict(saved.get("extras", {}))
        for i, call in enumerate(extras.pop("tool_calls", [])):
            self._merge_call({**call, "index": i})
        self.fields = {k: v for k, v in extras.items() if isinstance(v, str)}
        for key, values in (saved.get("logprobs") or {}).items():
            if isinstance(values, list):
                self.logprobs.setdefault(key, []).extend(values)
        self.completion_tokens = tokens

    def message_extras(self) -> dict[str, Any]:
        extras: dict[str, Any] = {}
        if self.tool_calls:
            extras["tool_calls"] = [self.tool_calls[i] for i in sorted(self.tool_calls)]
        extras.update(self.fields)
        return extras
