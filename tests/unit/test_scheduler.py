"""The embedded engine's slot scheduler on its own (no model loaded): admission, interactive-first
slots, batch preemption, and waiters woken when a slot frees or the reserve window ends."""

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

import pytest

from inference.engine_batch import merged
from inference.scheduler import SlotScheduler
from ragmesh.errors import RagmeshError
from ragmesh.v1 import common_pb2


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def scheduler(reserved: int = 3, n_parallel: int = 4, window: float = 5.0, clock: Clock | None = None) -> SlotScheduler:
    return SlotScheduler(n_parallel, 64, reserved, window, clock or Clock())


@pytest.mark.parametrize(("reserved", "room"), [(0, 4), (1, 3), (2, 2), (9, 1)])
def test_recent_interactive_traffic_keeps_the_reserved_slots_and_batch_at_least_one(reserved: int, room: int) -> None:
    slots = scheduler(reserved)
    slots.interactive_arrived()
    assert slots.batch_room() == room


def test_no_recent_interactive_traffic_leaves_every_slot_to_batch() -> None:
    clock = Clock()
    slots = scheduler(2, clock=clock)
    assert slots.batch_room() == 4
    slots.interactive_arrived()
    assert slots.batch_room() == 2
    clock.now += 5.0
    assert slots.batch_room() == 4  # the window is over
    for _ in range(3):
        slots.occupy(batch=True)
    assert slots.batch_room() == 1 and slots.in_slots() == 3


def test_an_interactive_request_preempts_the_newest_batch_choice_only_when_no_slot_is_free() -> None:
    slots = scheduler(1, n_parallel=2)
    older = slots.occupy(batch=True)
    assert slots.preempt_for(1) == []  # one slot still free
    newer = slots.occupy(batch=True)
    assert slots.preempt_for(1) == [newer]
    assert newer.preempted and newer.stop.is_set() and newer.leaving and not older.preempted
    # The first interactive request now holds a slot, the victim still leaving its own:
    # a second one takes the older choice's slot, not a third.
    slots.occupy(batch=False)
    assert slots.preempt_for(1) == [older]


def test_a_cancelled_preempted_choice_still_in_its_slot_is_not_preempted_for_twice() -> None:
    """Three batch choices; an interactive request preempts the newest, whose caller then goes away
    while its thread still decodes. A second interactive request needs one slot: one more
    preemption, not two."""
    slots = scheduler(0, n_parallel=3)
    a, b, c = (slots.occupy(batch=True) for _ in range(3))
    assert slots.preempt_for(1) == [c]
    slots.stop(c)  # its batch line was cancelled: c is still in its slot until its next token
    slots.occupy(batch=False)
    assert slots.preempt_for(1) == [b]
    assert not a.preempted
    slots.vacate(c)
    assert not c.leaving and slots.in_slots() == 3


def test_a_batch_choice_whose_caller_left_counts_as_a_slot_freeing_soon() -> None:
    slots = scheduler(0, n_parallel=2)
    a, b = slots.occupy(batch=True), slots.occupy(batch=True)
    slots.stop(b)  # the line was cancelled; b leaves at its next token
    assert slots.preempt_for(1) == [] and not a.preempted


async def test_a_batch_waiter_wakes_when_a_slot_is_vacated() -> None:
    slots = scheduler(0, n_parallel=1)
    held = slots.occupy(batch=True)
    waiter = asyncio.ensure_future(slots.wait_for_batch_room())
    await asyncio.sleep(0)
    assert not waiter.done()
    slots.vacate(held)
    await asyncio.wait_for(waiter, 5)


class FakeTimeLoop(asyncio.SelectorEventLoop):
    """An event loop whose time is the test's clock: the scheduler's timer fires when the test
    moves the clock past it, never because real time passed."""

    def __init__(self, clock: Clock) -> None:
        super().__init__()
        self._fake = clock

    def time(self) -> float:
        return self._fake.now


def on_fake_time(test: Callable[[Clock], Coroutine[Any, Any, None]]) -> None:
    clock = Clock()
    loop = FakeTimeLoop(clock)
    try:
        loop.run_until_complete(test(clock))
    finally:
        loop.close()


async def turns(n: int = 5) -> None:
    """Let the loop run its ready callbacks and due timers a few times (no real time passes)."""
    for _ in range(n):
        await asyncio.sleep(0)


def test_a_batch_waiter_wakes_when_the_reserve_window_ends_with_no_slot_released() -> None:
    """Interactive traffic reserved the free slot; nothing finishes. When the window ends the slot
    is batch's: the waiter must get it then, not at the next release (there may be none)."""

    async def run(clock: Clock) -> None:
        slots = scheduler(1, n_parallel=2, window=5.0, clock=clock)
        slots.occupy(batch=True)
        slots.interactive_arrived()
        assert slots.batch_room() == 0
        waiter = asyncio.ensure_future(slots.wait_for_batch_room())
        await turns()
        clock.now += 4.9
        await turns()
        assert not waiter.done(), "the window is not over yet"
        clock.now += 0.1
        await turns()
        assert waiter.done() and slots.batch_room() == 1

    on_fake_time(run)


def test_the_window_extended_by_new_traffic_keeps_the_waiter_waiting_until_it_ends() -> None:
    async def run(clock: Clock) -> None:
        slots = scheduler(1, n_parallel=2, window=5.0, clock=clock)
        slots.occupy(batch=True)
        slots.interactive_arrived()
        waiter = asyncio.ensure_future(slots.wait_for_batch_room())
        await turns()
        clock.now += 3.0
        slots.interactive_arrived()  # the window starts again: it now ends 5 s from here
        clock.now += 2.0  # the first window's end: its timer fires, the waiter looks and waits on
        await turns()
        assert not waiter.done() and slots.batch_room() == 0
        clock.now += 3.0
        await turns()
        assert waiter.done() and slots.batch_room() == 1

    on_fake_time(run)


def test_admission_past_the_limit_is_overload() -> None:
    slots = SlotScheduler(2, 3, 0, 5.0)
    slots.admit(2)
    with pytest.raises(RagmeshError) as info:
        slots.admit(2)
    assert info.value.http_status == 503 and info.value.code == "overloaded"
    slots.release()
    slots.admit(2)
    assert slots.active == 3


def test_merged_joins_text_chunks_and_keeps_extras_and_the_finish_apart() -> None:
    chunk = common_pb2.GenerationChunk
    out = merged(
        [
            chunk(text="", completion_tokens=0),
            chunk(text="Hel", completion_tokens=1),
            chunk(text="lo", completion_tokens=2, prompt_tokens=9, cached_prompt_tokens=4),
            chunk(text="!", completion_tokens=3, extra_json='{"logprobs": {}}'),
            chunk(text=" x", completion_tokens=4),
            chunk(completion_tokens=4, finish_reason=common_pb2.FINISH_REASON_LENGTH),
        ]
    )
    assert [(c.text, c.completion_tokens, bool(c.extra_json), c.finish_reason) for c in out] == [
        ("Hello", 2, False, 0),
        ("!", 3, True, 0),
        (" x", 4, False, 0),
        ("", 4, False, common_pb2.FINISH_REASON_LENGTH),
    ]
    assert (out[0].prompt_tokens, out[0].cached_prompt_tokens) == (9, 4)
