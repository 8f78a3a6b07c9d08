"""Guardrails: filters over streamed text (PII redaction, a blocklist).

A filter sees the answer delta by delta, so a match may arrive split across
two deltas ("jane.doe@exa" + "mple.com"). Each filter holds back the tail of
the text where a match could still be growing and releases the rest, redacted.
Nothing that might need redacting ever leaves before the filter has seen all
of it, and nothing is held longer than a match can be long: the hold starts at
the earliest place a match could begin whose text has not all arrived yet.

So prose streams one word behind (a word could still become an email address),
while a run without spaces (a long number, a URL, minified JSON) streams on once
it is longer than any match could be: a digit run that is not a card, phone or
email by now never becomes one, however it goes on.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

# Bounded patterns: a match never spans more than these shapes allow.
PII_PATTERNS: dict[str, re.Pattern[str]] = {
    "email": re.compile(r"\b[A-Za-z0-9._%+-]{1,64}@[A-Za-z0-9.-]{1,253}\.[A-Za-z]{2,24}\b"),
    # 13-19 digits in groups (cards): checked with Luhn before redacting.
    "card": re.compile(r"\b(?:\d[ -]?){12,18}\d\b"),
    # International or North American style numbers: 7-15 digits with separators.
    "phone": re.compile(r"(?<![\w+])(?:\+\d{1,3}[ .-]?)?(?:\(\d{2,4}\)[ .-]?)?\d{2,4}(?:[ .-]\d{2,4}){1,4}\b"),
}
PLACEHOLDER = {
    "email": "[email redacted]",
    "card": "[card number redacted]",
    "phone": "[phone redacted]",
    "blocklist": "[blocked]",
}

# For each pattern, what the text from a place to the end of the buffer looks like when it
# may be the beginning of a match (the whole of it a prefix of some match, a finished match
# included: it may grow, and its closing \b needs the next character). Each admits every
# prefix of its pattern's matches (and a few strings more): it may hold a little too much,
# never too little. Their bounded repeats are what bound the hold.
UNFINISHED: dict[str, re.Pattern[str]] = {
    "email": re.compile(r"\b[A-Za-z0-9._%+-]{1,64}(?:@[A-Za-z0-9.-]{0,279})?\Z"),
    "card": re.compile(r"\b(?:\d[ -]?){1,19}\Z"),
    "phone": re.compile(
        r"(?<![\w+])(?=[+(\d])(?:\+\d{0,3}[ .-]?)?(?:\(\d{0,4}\)?[ .-]?)?\d{0,4}(?:[ .-]\d{0,4}){0,4}\Z"
    ),
}
# How far back from the end each of those can start (their longest match, and one).
_REACH = {"email": 64 + 1 + 279 + 1, "card": 38 + 1, "phone": 36 + 1}
# Whole matches the hold would keep past this (a long chain of overlapping card and phone
# matches, each beginning inside the one after it: never seen in answers, but possible) are
# cut at the hold instead, and the cut match is redacted whole on both sides of the cut.
MAX_HELD = 512

_DATE = re.compile(r"^\d{4}[-./]\d{1,2}[-./]\d{1,2}$|^\d{1,2}[-./]\d{1,2}[-./]\d{4}$")


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


# The last digit of a group that more groups follow: where a card may end inside a longer run.
_GROUP_END = re.compile(r"\d(?=[ -]\d)")


def card_length(number: str, prefixes: bool = True) -> int:
    """How much of a card pattern's match to redact: all of it when it passes Luhn, else
    its longest prefix ending at a group boundary that does (0 if none).

    The pattern is greedy, so a card followed by another digit group ("4111 1111 1111 1111
    555") matches as one longer number that fails Luhn; the card in it must still go. The
    rest stays, for the phone pattern. Only group boundaries are tried: a run of digits
    without separators is one number, not a card and some more. Without `prefixes` (a
    match that may still grow), only the whole match counts.
    """
    if luhn_ok(number):
        return len(number)
    if not prefixes:
        return 0
    for end in reversed([found.end() for found in _GROUP_END.finditer(number)]):
        if luhn_ok(number[:end]):
            return end
    return 0


@dataclass
class FilterResult:
    text: str
    blocked: bool = False  # a blocklisted term was seen and the action is "stop"


def _word_char(c: str) -> bool:
    return c.isalnum() or c == "_"


class StreamGuard:
    """PII redaction and a blocklist over one choice's streamed text."""

    def __init__(self, pii: Sequence[str], blocklist: Sequence[str], stop_on_block: bool) -> None:
        self._pii = [(name, PII_PATTERNS[name]) for name in ("email", "card", "phone") if name in pii]
        terms = [w.strip().lower() for w in blocklist if w.strip()]
        self._terms = terms
        self._longest = max((len(t) for t in terms), default=0)
        self._block = (
            re.compile(r"\b(?:" + "|".join(re.escape(t) for t in terms) + r")\b", re.IGNORECASE) if terms else None
        )
        self._stop_on_block = stop_on_block
        # In order of precedence where matches overlap.
        self._stages: list[tuple[str, re.Pattern[str]]] = [("blocklist", self._block)] if self._block else []
        self._stages += self._pii
        self._held = ""
        # The last character released (raw): what a pattern's \b or look-behind sees before the
        # next part.
        self._before = ""
        # Characters of the held text that belong to a match already redacted (see MAX_HELD).
        self._masked = 0
        self.redactions: dict[str, int] = {}

    @property
    def active(self) -> bool:
        return bool(self._pii or self._block)

    @property
    def held(self) -> str:
        """The text seen but not released yet (a match may still be growing in it)."""
        return self._held

    def push(self, text: str) -> FilterResult:
        """Take a delta; return what can be released now."""
        if not self.active:
            return FilterResult(text)
        buffer = self._held + text
        cut = self._safe_cut(buffer)
        released, self._held = buffer[:cut], buffer[cut:]
        return self._clean(released, self._held)

    def flush(self) -> FilterResult:
        """The end of the answer: release (redacted) whatever was held back."""
        held, self._held = self._held, ""
        if not self.active:
            return FilterResult(held)
        return self._clean(held, "")

    def _safe_cut(self, buffer: str) -> int:
        """Where to split `buffer` into released and held text: at the earliest place a match
        could begin that has not all arrived, and never through a match found already."""
        subject = self._before + buffer
        offset = len(self._before)
        cut = len(subject)
        for name, _ in self._pii:
            start = max(offset, len(subject) - _REACH[name])
            found = UNFINISHED[name].search(subject, start)
            if found:
                cut = min(cut, found.start())
        cut = min(cut, self._unfinished_term(subject, offset))
        # A match that began before the cut and ends after it is whole already (it began where
        # nothing is unfinished): hold it back entire, so that it is redacted in one piece.
        patterns = [pattern for _, pattern in self._stages]
        unfinished = cut
        moved = True
        while moved:
            moved = False
            for pattern in patterns:
                for match in pattern.finditer(subject, offset):
                    if match.start() >= cut:
                        break
                    if match.end() > cut:
                        cut, moved = match.start(), True
                        break
        if len(subject) - cut > MAX_HELD:
            cut = unfinished  # _clean redacts a match it cuts through, both parts of it
        return cut - offset

    def _unfinished_term(self, subject: str, offset: int) -> int:
        """The earliest word start from which the rest of `subject` begins a blocklisted term
        (the whole term included: its closing \\b needs the next character)."""
        if not self._terms:
            return len(subject)
        tail_from = max(offset, len(subject) - self._longest)
        for start in range(tail_from, len(subject)):
            before = subject[start - 1] if start > 0 else ""
            if before and _word_char(before) and _word_char(subject[start]):
                continue  # not a word boundary: no term starts here
            rest = subject[start:].lower()
            if any(term.startswith(rest) for term in self._terms):
                return start
        return len(subject)

    def _clean(self, text: str, after: str) -> FilterResult:
        """Redact `text`, the next part of the answer.

        Every pattern runs over the raw text (not over what another pattern redacted), seeing
        the character released before `text` and the held text `after` it for its \\b and
        look-behind: so the matches are the ones a single pass over the whole answer finds,
        however the answer was cut into parts. Where matches overlap, the blocklist goes
        first, then email, card, phone.
        """
        if not text:
            return FilterResult("")
        before, self._before = self._before, text[-1]
        subject = before + text + after
        begin, end = len(before), len(before) + len(text)
        # The rest of a match redacted with the part before (see MAX_HELD) is not shown.
        masked = min(self._masked, len(text))
        self._masked -= masked
        chosen: list[tuple[int, int, str]] = [(begin, begin + masked, "")] if masked else []
        for name, pattern in self._stages:
            for match in pattern.finditer(subject, begin):
                if match.start() >= end:
                    break
                stop = match.end()
                if name == "card":
                    # The whole match is held until known (see _safe_cut), so the part of it
                    # redacted is the same however the answer was split. One cut at MAX_HELD
                    # may still grow: a prefix of it is no card yet, only the whole of it.
                    length = card_length(match.group(0), prefixes=match.end() <= end)
                    if not length:
                        continue
                    stop = match.start() + length
                elif name == "phone" and not phone_ok(match.group(0)):
                    continue
                if any(match.start() < e and s < stop for s, e, _ in chosen):
                    continue
                chosen.append((match.start(), min(stop, end), name))
                # Only past MAX_HELD does a match run on into the held text.
                self._masked = max(self._masked, stop - end)
        chosen.sort()
        blocked = False
        out: list[str] = []
        last = begin
        for start, stop, name in chosen:
            if name == "blocklist" and self._stop_on_block:
                blocked = True
                break
            out.append(subject[last:start])
            last = stop
            if not name:
                continue  # the masked rest of a match redacted before
            out.append(PLACEHOLDER[name])
            self.redactions[name] = self.redactions.get(name, 0) + 1
        if blocked:
            self.redactions["blocklist"] = self.redactions.get("blocklist", 0) + 1
            # The answer ends before the term; what came before it is still redacted.
            out.append(subject[last:start])
        else:
            out.append(subject[last:end])
        return FilterResult("".join(out), blocked=blocked)
