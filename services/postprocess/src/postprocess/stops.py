"""Stop sequences over a stream: find them even when one spans several deltas."""

from __future__ import annotations

from collections.abc import Sequence


class StopMatcher:
    """Releases streamed text up to the first stop sequence, never including it.

    Text that could be the start of a stop sequence is held back until the next
    delta shows whether it is one, so a stop split across deltas ("\\n" + "\\nUser:")
    is still found and never leaks to the client.
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = [s for s in stops if s]
        self._held = ""

    def push(self, text: str) -> tuple[str, bool]:
        """Add a delta; return (text safe to release, whether a stop sequence was hit)."""
        if not self._stops:
            return text, False
        buf = self._held + text
        hit = min((i for i in (buf.find(s) for s in self._stops) if i >= 0), default=-1)
        if hit >= 0:
            self._held = ""
            return buf[:hit], True
        hold = self._longest_partial_suffix(buf)
        self._held = buf[len(buf) - hold :] if hold else ""
        return buf[: len(buf) - hold], False

    def flush(self) -> str:
        """At the end of generation, release what was held back (it was no stop)."""
        held, self._held = self._held, ""
        return held

    def _longest_partial_suffix(self, buf: str) -> int:
        # Only suffixes shorter than a whole stop matter: a whole one was found above.
        best = 0
        for stop in self._stops:
            for k in range(min(len(stop) - 1, len(buf)), best, -1):
                if buf.endswith(stop[:k]):
                    best = k
                    break
        return best
