"""Guardrails: filters over streamed text (PII redaction, a blocklist).

A filter sees the answer delta by delta, so a match may arrive split across
two deltas ("jane.doe@exa" + "mple.com"). Each filter holds back the tail of
the text that could still grow into a match (the trailing word, or a trailing
run of digits and separators) and releases the rest, redacted. Nothing that
might need redacting ever leaves before the filter has seen all of it.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from postprocess.stops import longest_partial_suffix

# Bounded patterns: a match never spans more than these shapes allow.
PII_PATTERNS: dict[str, re.Pattern[str]] = {
    "email": re.compile(r"\b[A-Za-z0-9._%+-]{1,64}@[A-Za-z0-9.-]{1,253}\.[A-Za-z]{2,24}\b"),
    # 13-19 digits in groups (cards): checked with Luhn before redacting.
    "card": re.compile(r"\b(?:\d[ -]?){12,18}\d\b"),
    # International or North American style numbers: 7-15 digits with separators.
    "phone": re.compile(r"(?<![\w+])(?:\+\d{1,3}[ .-]?)?(?:\(\d{2,4}\)[ .-]?)?\d{2,4}(?:[ .-]\d{2,4}){1,4}\b"),
}
PLACEHOLDER = {"email": "[email redacted]", "card": "[card number redacted]", "phone": "[phone redacted]"}

# The tail that could still become (part of) a match: the last word, or a
# trailing run of digits and the separators numbers use.
_TRAILING_WORD = re.compile(r"\S+$")
_TRAILING_NUMBER = re.compile(r"[\d+(][\d ()+.-]*$")


_DATE = re.compile(r"^\d{4}[-./]\d{1,2}[-./]\d{1,2}$|^\d{1,2}[-./]\d{1,2}[-./]\d{4}$")

# A held-back tail longer than this (text without spaces: a URL, minified JSON)
# is released up to its last characters; longer than any bounded match.
MAX_HELD = 512
KEEP_HELD = 384


def phone_ok(number: str) -> bool:
    """7 to 15 digits, and not a date."""
    digits = sum(c.isdigit() for c in number)
    return 7 <= digits <= 15 and not _DATE.match(number.strip())


def luhn_ok(number: str) -> bool:
    digits = [int(c) for c in number if c.isdigit()]
    if not 13 <= len(digits) <= 19:
        return False
    total = 0
    for i, d in enumerate(reversed(digits)):
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


@dataclass
class FilterResult:
    text: str
    blocked: bool = False  # a blocklisted term was seen and the action is "stop"


class StreamGuard:
    """PII redaction and a blocklist over one choice's streamed text."""

    def __init__(self, pii: Sequence[str], blocklist: Sequence[str], stop_on_block: bool) -> None:
        self._pii = [(name, PII_PATTERNS[name]) for name in ("email", "card", "phone") if name in pii]
        terms = [w.strip().lower() for w in blocklist if w.strip()]
        self._terms = terms
        self._block = (
            re.compile(r"\b(?:" + "|".join(re.escape(t) for t in terms) + r")\b", re.IGNORECASE) if terms else None
        )
        self._stop_on_block = stop_on_block
        self._held = ""
        self.redactions: dict[str, int] = {}

    @property
    def active(self) -> bool:
        return bool(self._pii or self._block)

    def push(self, text: str) -> FilterResult:
        """Take a delta; return what can be released now."""
        if not self.active:
            return FilterResult(text)
        buffer = self._held + text
        cut = len(buffer)
        for tail in (_TRAILING_WORD, _TRAILING_NUMBER):
            match = tail.search(buffer)
            if match:
                cut = min(cut, match.start())
        # Blocklisted phrases can span words: hold back a tail that begins one.
        longest = max((len(t) for t in self._terms), default=0)
        cut = min(cut, len(buffer) - longest_partial_suffix(buffer[-longest:].lower() if longest else "", self._terms))
        if len(buffer) - cut > MAX_HELD:
            cut = len(buffer) - KEEP_HELD
        self._held = buffer[cut:]
        return self._clean(buffer[:cut])

    def flush(self) -> FilterResult:
        """The end of the answer: release (redacted) whatever was held back."""
        held, self._held = self._held, ""
        return self._clean(held) if self.active else FilterResult(held)

    def _clean(self, text: str) -> FilterResult:
        if not text:
            return FilterResult("")
        if self._block is not None:
            match = self._block.search(text)
            if match and self._stop_on_block:
                self.redactions["blocklist"] = self.redactions.get("blocklist", 0) + 1
                return FilterResult(text[: match.start()], blocked=True)
            text = self._block.sub(self._count("blocklist", "[blocked]"), text)
        for name, pattern in self._pii:
            text = pattern.sub(self._count(name, PLACEHOLDER[name]), text)
        return FilterResult(text)

    def _count(self, name: str, placeholder: str):  # type: ignore[no-untyped-def]
        def replace(match: re.Match[str]) -> str:
            valid = {"card": luhn_ok, "phone": phone_ok}.get(name)
            if valid is not None and not valid(match.group(0)):
                return match.group(0)
            self.redactions[name] = self.redactions.get(name, 0) + 1
            return placeholder

        return replace
