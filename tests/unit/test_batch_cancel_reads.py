"""Lines in flight learn of a cancel through one shared status read per batch and second."""

import asyncio
from typing import Any

import pytest

from preprocess import batches as batches_module
from preprocess.batches import Batches
from preprocess.settings import PreprocessSettings


class CountingStore:
    def __init__(self) -> None:
        self.reads: list[str] = []
        self.status = "in_progress"

    async def load(self, batch_id: str) -> dict[str, Any]:
        self.reads.append(batch_id)
        await asyncio.sleep(0.01)
        if batch_id == "gone":
            raise KeyError(batch_id)
        return {"status": self.status}


async def test_lines_share_one_read_per_batch_and_period_and_see_a_cancel(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(batches_module, "CANCEL_CHECK_SECONDS", 0.05)
    batches = Batches(PreprocessSettings(), None, None, None)  # type: ignore[arg-type]
    store = CountingStore()
    batches.store = store  # type: ignore[assignment]
    answers = await asyncio.gather(*(batches._batch_cancelled("b1") for _ in range(20)), batches._batch_cancelled("b2"))
    assert answers == [False] * 21
    assert sorted(store.reads) == ["b1", "b2"]
    store.status = "cancelling"
    assert await batches._batch_cancelled("b1") is False  # still the same period's answer
    await asyncio.sleep(0.06)
    assert await asyncio.gather(*(batches._batch_cancelled("b1") for _ in range(5))) == [True] * 5
    assert store.reads.count("b1") == 2


async def test_an_unreadable_batch_counts_as_not_cancelled() -> None:
    batches = Batches(PreprocessSettings(), None, None, None)  # type: ignore[arg-type]
    batches.store = CountingStore()  # type: ignore[assignment]
    assert await batches._batch_cancelled("gone") is False
