"""Stop sequences across delta boundaries."""

from __future__ import annotations

import pytest

from postprocess.stops import StopMatcher


def run(stops: list[str], deltas: list[str]) -> tuple[str, bool]:
    matcher = StopMatcher(stops)
    out = []
    for delta in deltas:
        text, hit = matcher.push(delta)
        out.append(text)
        if hit:
            return "".join(out), True
    out.append(matcher.flush())
    return "".join(out), False


def test_no_stops_passes_text_through_unchanged() -> None:
    matcher = StopMatcher([])
    assert matcher.push("abc") == ("abc", False)


def test_stop_inside_one_delta_is_cut() -> None:
    assert run(["END"], ["hello END world"]) == ("hello ", True)


@pytest.mark.parametrize(
    "deltas",
    [
        ["Hello\n", "\nUser: hi"],
        ["Hello\n\n", "User: hi"],
        ["Hello", "\n", "\n", "U", "s", "e", "r", ":"],
        ["Hello\n\nUs", "er:"],
    ],
)
def test_stop_split_across_deltas_never_leaks(deltas: list[str]) -> None:
    assert run(["\n\nUser:"], deltas) == ("Hello", True)


def test_partial_match_that_is_not_a_stop_is_released() -> None:
    matcher = StopMatcher(["STOP"])
    assert matcher.push("ab ST") == ("ab ", False)
    assert matcher.push("ART") == ("START", False)


def test_held_text_is_flushed_at_the_end() -> None:
    assert run(["STOP"], ["the end ST"]) == ("the end ST", False)


def test_earliest_of_several_stops_wins() -> None:
    assert run(["world", "lo w"], ["hello world"]) == ("hel", True)


def test_overlapping_prefixes_of_different_stops() -> None:
    # "ab" could start "abc" or be the stop "bx" later: both must be considered.
    assert run(["abc", "bx"], ["za", "b", "x"]) == ("za", True)


def test_stop_at_the_very_start() -> None:
    assert run(["\n"], ["\nrest"]) == ("", True)


def test_unicode_stop() -> None:
    assert run(["。"], ["日本", "語。次"]) == ("日本語", True)
