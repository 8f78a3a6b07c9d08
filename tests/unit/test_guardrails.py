"""Guardrails over streamed text, including matches split across deltas."""

from __future__ import annotations

import random

import pytest

from postprocess import guardrails
from postprocess.guardrails import MAX_HELD, StreamGuard, luhn_ok


def stream(guard: StreamGuard, deltas: list[str]) -> tuple[str, bool]:
    out, blocked = [], False
    for delta in deltas:
        result = guard.push(delta)
        out.append(result.text)
        if result.blocked:
            return "".join(out), True
    last = guard.flush()
    out.append(last.text)
    return "".join(out), blocked or last.blocked


def pii() -> StreamGuard:
    return StreamGuard(["email", "phone", "card"], [], stop_on_block=True)


@pytest.mark.parametrize(
    "deltas",
    [
        ["Write to jane.doe@example.com today"],
        ["Write to jane", ".doe@exa", "mple.com today"],
        ["Write to j", "a", "n", "e", ".", "doe", "@", "example", ".", "com", " today"],
    ],
)
def test_email_is_redacted_even_when_split(deltas: list[str]) -> None:
    text, _ = stream(pii(), deltas)
    assert text == "Write to [email redacted] today"


def test_phone_and_card_numbers_split_across_deltas() -> None:
    text, _ = stream(pii(), ["Call +1 555", "-123-", "4567 or pay with 4111 1111 ", "1111 1111 now."])
    assert text == "Call [phone redacted] or pay with [card number redacted] now."


def test_numbers_that_are_not_pii_pass() -> None:
    text, _ = stream(pii(), ["In 2023-01-15 we had 42 cats and 3.14159 pies; card 1234 5678 9012 3456 fails Luhn."])
    assert "2023-01-15" in text and "42 cats" in text and "3.14159" in text
    assert "1234 5678 9012 3456" in text
    assert luhn_ok("4111111111111111") and not luhn_ok("1234567890123456")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # The card pattern's greedy match runs on into the next group (19 digits, Luhn fails):
        # the Luhn-valid card it begins with is still redacted, and what follows is left to the
        # phone pattern (the phone pattern's own 19-digit match "4111 ... 555" is no phone).
        ("card 4111 1111 1111 1111 555 123 4567", "card [card number redacted] 555 [phone redacted]"),
        ("card 4111-1111-1111-1111-99 ok", "card [card number redacted]-99 ok"),
        ("visa 4012 8888 8888 1881 7 then", "visa [card number redacted] 7 then"),
        # No Luhn-valid card at a group boundary: nothing new is redacted.
        ("id 1234 5678 9012 3456 555 end", "id 1234 5678 9012 3456 555 end"),
        # A run without separators has no group boundary to cut at.
        ("ref 41111111111111112 end", "ref 41111111111111112 end"),
    ],
)
def test_a_card_followed_by_more_digit_groups_is_redacted(text: str, expected: str) -> None:
    assert stream(pii(), [text]) == (expected, False)
    assert stream(pii(), list(text)) == (expected, False)  # the same, a character at a time


def test_text_is_released_as_it_comes_one_word_behind() -> None:
    guard = pii()
    assert guard.push("Hello there").text == "Hello "
    assert guard.push(" friend").text == "there "
    assert guard.flush().text == "friend"


def test_blocklist_stop_ends_the_answer_before_the_term() -> None:
    guard = StreamGuard([], ["forbidden"], stop_on_block=True)
    text, blocked = stream(guard, ["This is forb", "idden knowledge"])
    assert blocked and text == "This is "


def test_blocklist_redact_keeps_going() -> None:
    guard = StreamGuard([], ["secret plan"], stop_on_block=False)
    text, blocked = stream(guard, ["the Secret ", "Plan is here"])
    assert not blocked and text == "the [blocked] is here"


def test_long_text_without_spaces_is_not_held_forever() -> None:
    guard = pii()
    released = guard.push("x" * 2000).text
    assert len(released) >= 2000 - 512


def pushed(guard: StreamGuard, deltas: list[str]) -> list[str]:
    """What each push released (the flush last)."""
    return [guard.push(delta).text for delta in deltas] + [guard.flush().text]


def test_a_long_digit_run_streams_as_it_comes() -> None:
    # A run of digits longer than any match can be is no card, phone or email, however it
    # goes on: once it is that long, every digit leaves with the delta that brought it.
    digits = "1234567890" * 20
    released = pushed(pii(), list(digits))
    assert "".join(released) == digits
    longest_email_local_part = 64
    assert all(released[i] == digits[i] for i in range(longest_email_local_part + 1, len(digits)))


def test_nothing_is_held_longer_than_a_match_can_be() -> None:
    for text in ("x" * 2000, "7" * 2000):
        guard = pii()
        for char in text:
            guard.push(char)
            assert len(guard.held) <= 65  # what may still be an email's local part (64)
    # Number groups: the hold also keeps whole matches that began before it (redacted in one piece).
    for text in ("1-2-3-" * 300, "a.b" * 600, "555 123 " * 200):
        guard = pii()
        for char in text:
            guard.push(char)
            assert len(guard.held) <= MAX_HELD, text[:12]


def test_past_max_held_a_match_cut_in_two_is_redacted_on_both_sides(monkeypatch: pytest.MonkeyPatch) -> None:
    # Overlapping card and phone matches hold each other back; past MAX_HELD the hold is cut
    # through one: it may redact more than one pass over the whole answer, never less.
    monkeypatch.setattr(guardrails, "MAX_HELD", 10)
    text = "call 4111 1111 1111 1111 555 123 4567 555 123 4567 4111 1111 1111 1111 then"
    guard = pii()
    out = ""
    for char in text:
        out += guard.push(char).text
        assert len(guard.held) <= 40
    out += guard.flush().text
    assert out.endswith(" [card number redacted] then")


def test_a_card_in_a_stream_of_digits_is_held_until_whole() -> None:
    guard = pii()
    out = ""
    for char in "Pay 4111111111111111 now":
        out += guard.push(char).text
        assert "4111" not in out  # nothing of the card leaves before it is known whole
    out += guard.flush().text
    assert out == "Pay [card number redacted] now"


def test_text_before_a_blocked_term_is_still_redacted() -> None:
    guard = StreamGuard(["email"], ["forbidden"], stop_on_block=True)
    result = guard.push("mail jane@example.com forbidden now")
    assert result.blocked and result.text == "mail [email redacted] "


@pytest.mark.parametrize("stop_on_block", [False, True])
def test_streamed_redaction_is_the_one_pass_over_the_whole_answer(stop_on_block: bool) -> None:
    # However the answer is cut into deltas, the client reads what one pass over the whole
    # answer gives: a match is never cut in two, nor found in a piece where the whole has none.
    rng = random.Random(7)
    pieces = [*"0123456789" * 4, *" -.+()@abxyz_", " ", "4111 1111 1111 1111", "jane@ex.com"]
    pieces += ["+1 555-123-4567", "Secret ", "Plan", "secret plan"]
    # A card run on into more groups (the card pattern's match fails Luhn, its prefix passes).
    pieces += ["4111 1111 1111 1111 555 123 4567", "4111-1111-1111-1111-", " 55", " 123"]

    def run(text: str, cuts: random.Random | None) -> tuple[str, bool]:
        guard = StreamGuard(["email", "card", "phone"], ["secret plan"], stop_on_block)
        out, i = [], 0
        while i < len(text):
            step = cuts.randint(1, 4) if cuts else len(text)
            result = guard.push(text[i : i + step])
            out.append(result.text)
            if result.blocked:
                return "".join(out), True
            i += step
        last = guard.flush()
        return "".join(out) + last.text, last.blocked

    for _ in range(400):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(1, 100)))
        assert run(text, rng) == run(text, None), text
