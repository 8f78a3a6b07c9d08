"""Guardrails over streamed text, including matches split across deltas."""

from __future__ import annotations

import pytest

from postprocess.guardrails import StreamGuard, luhn_ok


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
