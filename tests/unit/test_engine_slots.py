"""How many engine slots batch work may take (no model loaded: slot accounting only)."""

import time

import pytest

from inference.engine import LlamaCppEngine
from inference.settings import InferenceSettings
from ragmesh.v1 import inference_pb2


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
