"""Stop sequences over a stream: find them even when one spans several deltas."""

from __future__ import annotations

from collections.abc import Sequence


def longest_partial_suffix(text: str, terms: Sequence[str]) -> int:
    """Length of the longest tail of `text` that is a proper prefix of one of `terms`.

    Such a tail may still become a whole term once the next delta arrives, so a
    streaming filter holds it back.
    """
    best = 0
    for term in terms:
        for k in range(min(len(term) - 1, len(text)), best, -1):
            if text.endswith(term[:k]):
                best = k
                break
    return best


class StopMatcher:
    """Releases streamed text up to the first stop sequence, never including it.

    Text that could be the start of a stop sequence is held back until the next
    delta shows whether it is one, so a stop split across deltas ("\\n" + "\\nUser:")
    is still found and never leaks to the client.
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = [s for s in stops if s]
        self._held = ""

    @property
    def holding(self) -> bool:
        """Whether text is held back (it may be the start of a stop sequence)."""
        return bool(self._held)

    def push(self, text: str) -> tuple[str, bool]:
        """Add a delta; return (text safe to release, whether a stop sequence was hit)."""
        if not self._stops:
            return text, False
        buf = self._held + text
        hit = min((i for i in (buf.find(s) for s in self._stops) if i >= 0), default=-1)
        if hit >= 0:
            self._held = ""
            return buf[:hit], True
        hold = longest_partial_suffix(buf, self._stops)
        self._held = buf[len(buf) - hold :] if hold else ""
        return buf[: len(buf) - hold], False

    def flush(self) -> str:
        """At the end of generation, release what was held back (it was no stop)."""
        held, self._held = self._held, ""
        return held
