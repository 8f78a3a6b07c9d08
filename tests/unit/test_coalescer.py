"""Embedding calls that arrive while the model is busy share one encode."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from retrieval.embedder import _Coalescer


class FakeModel:
    def __init__(self) -> None:
        self.calls: list[list[str]] = []
        self.fail = False

    async def run(self, texts: list[str]) -> np.ndarray:
        self.calls.append(texts)
        await asyncio.sleep(0.05)
        if self.fail:
            raise RuntimeError("model down")
        return np.array([[float(len(t)), float(ord(t[0]))] for t in texts], dtype=np.float32)


async def test_waiting_calls_go_together_and_each_gets_its_rows() -> None:
    model = FakeModel()
    lane = _Coalescer(model.run)
    first = asyncio.create_task(lane.encode(["a"]))
    await asyncio.sleep(0.01)  # the lane is busy with the first call now
    rest = [asyncio.create_task(lane.encode(texts)) for texts in (["bb", "a"], ["ccc"], ["bb"])]
    results = await asyncio.gather(first, *rest)
    assert model.calls == [["a"], ["bb", "a", "ccc"]]  # one call for the waiting three, duplicates once
    assert results[1].tolist() == [[2.0, 98.0], [1.0, 97.0]]
    assert results[2].tolist() == [[3.0, 99.0]] and results[3].tolist() == [[2.0, 98.0]]


async def test_a_caller_that_left_does_not_disturb_the_others_and_errors_reach_everyone() -> None:
    model = FakeModel()
    lane = _Coalescer(model.run)
    busy = asyncio.create_task(lane.encode(["x"]))
    await asyncio.sleep(0.01)
    gone = asyncio.create_task(lane.encode(["gone"]))
    kept = asyncio.create_task(lane.encode(["kept"]))
    await asyncio.sleep(0)
    gone.cancel()
    await busy
    assert (await kept).tolist() == [[4.0, 107.0]]
    assert model.calls[-1] == ["kept"]
    model.fail = True
    with pytest.raises(RuntimeError, match="model down"):
        await asyncio.gather(lane.encode(["p"]), lane.encode(["q"]))
    model.fail = False
    assert (await lane.encode(["z"])).shape == (1, 2)  # the lane works again after a failure
