"""How many engine slots batch work may take (no model loaded: slot accounting only)."""

import threading
import time

import pytest

from inference.engine import LlamaCppEngine, _BatchRun, _merged
from inference.settings import InferenceSettings
from ragmesh.v1 import common_pb2, inference_pb2


def engine_with(reserved: int, n_parallel: int = 4) -> LlamaCppEngine:
    return LlamaCppEngine(InferenceSettings(n_parallel=n_parallel, interactive_reserved_slots=reserved))


@pytest.mark.parametrize(("reserved", "room"), [(0, 4), (1, 3), (2, 2), (9, 1)])
def test_recent_interactive_traffic_keeps_the_reserved_slots_and_batch_at_least_one(reserved: int, room: int) -> None:
    engine = engine_with(reserved)
    engine._last_interactive = time.monotonic()
    assert engine._batch_room() == room


def test_no_recent_interactive_traffic_leaves_every_slot_to_batch() -> None:
    engine = engine_with(2)
    assert engine._batch_room() == 4
    engine._slots_changed(inference_pb2.PRIORITY_BATCH, 3)
    assert engine._batch_room() == 1


def test_running_requests_take_room_from_batch() -> None:
    engine = engine_with(1)
    engine._last_interactive = time.monotonic()
    engine._slots_changed(inference_pb2.PRIORITY_INTERACTIVE, 1)
    engine._slots_changed(inference_pb2.PRIORITY_BATCH, 1)
    assert engine._batch_room() == 1


def test_an_interactive_request_preempts_the_newest_batch_choice_only_when_no_slot_is_free() -> None:
    engine = engine_with(1, n_parallel=2)
    older, newer = _BatchRun(threading.Event()), _BatchRun(threading.Event())
    engine._batch_runs = [older, newer]
    engine._slots_changed(inference_pb2.PRIORITY_BATCH, 1)
    engine._preempt_for(1)  # one slot still free
    assert not older.preempted and not newer.preempted
    engine._slots_changed(inference_pb2.PRIORITY_BATCH, 1)
    engine._preempt_for(1)
    assert newer.preempted and newer.cancelled.is_set()
    assert not older.preempted and engine._batch_runs == [older]
    # The first interactive request now holds a slot, the victim still leaving its own:
    # a second one takes the older choice's slot, not a third.
    engine._slots_changed(inference_pb2.PRIORITY_INTERACTIVE, 1)
    engine._preempt_for(1)
    assert older.preempted and engine._leaving == 2


def test_merged_joins_text_chunks_and_keeps_extras_and_the_finish_apart() -> None:
    chunk = common_pb2.GenerationChunk
    merged = _merged(
        [
            chunk(text="", completion_tokens=0),
            chunk(text="Hel", completion_tokens=1),
            chunk(text="lo", completion_tokens=2, prompt_tokens=9, cached_prompt_tokens=4),
            chunk(text="!", completion_tokens=3, extra_json='{"logprobs": {}}'),
            chunk(text=" x", completion_tokens=4),
            chunk(completion_tokens=4, finish_reason=common_pb2.FINISH_REASON_LENGTH),
        ]
    )
    assert [(c.text, c.completion_tokens, bool(c.extra_json), c.finish_reason) for c in merged] == [
        ("Hello", 2, False, 0),
        ("!", 3, True, 0),
        (" x", 4, False, 0),
        ("", 4, False, common_pb2.FINISH_REASON_LENGTH),
    ]
    assert (merged[0].prompt_tokens, merged[0].cached_prompt_tokens) == (9, 4)
