"""Lines in flight learn that their batch stopped through one shared state read per batch and second."""

import asyncio

import pytest

from preprocess.batches import worker as worker_module
from preprocess.batches.store import LineState
from preprocess.batches.worker import BatchWorker
from preprocess.settings import PreprocessSettings


class CountingStore:
    def __init__(self) -> None:
        self.reads: list[str] = []
        self.status = "in_progress"
        self.redis = None

    async def line_state(self, batch_id: str) -> LineState | None:
        self.reads.append(batch_id)
        await asyncio.sleep(0.01)
        if batch_id == "broken":
            raise ConnectionError("Redis away")
        if batch_id == "gone":
            return None
        return LineState(self.status, None, expires_at=float("inf"))


def worker_with(store: CountingStore) -> BatchWorker:
    return BatchWorker(PreprocessSettings(auth="off"), store, None, None, None)  # type: ignore[arg-type]


async def test_lines_share_one_read_per_batch_and_period_and_see_a_cancel(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(worker_module, "CANCEL_CHECK_SECONDS", 0.05)
    store = CountingStore()
    worker = worker_with(store)
    answers = await asyncio.gather(*(worker._stop_reason("b1") for _ in range(20)), worker._stop_reason("b2"))
    assert answers == [None] * 21
    assert sorted(store.reads) == ["b1", "b2"]
    store.status = "cancelling"
    assert await worker._stop_reason("b1") is None  # still the same period's answer
    await asyncio.sleep(0.06)
    assert await asyncio.gather(*(worker._stop_reason("b1") for _ in range(5))) == ["cancelled"] * 5
    assert store.reads.count("b1") == 2


async def test_an_unreadable_batch_lets_lines_go_on_and_a_deleted_one_stops_them() -> None:
    worker = worker_with(CountingStore())
    assert await worker._stop_reason("broken") is None
    assert await worker._stop_reason("gone") == "gone"
