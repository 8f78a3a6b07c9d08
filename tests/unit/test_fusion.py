"""Reciprocal rank fusion."""

from __future__ import annotations

from retrieval.search import rrf


def test_item_ranked_well_by_both_wins() -> None:
    dense = [(1, 0.9), (2, 0.8), (3, 0.7)]
    sparse = [(3, 9.0), (1, 8.0), (4, 1.0)]
    hits = rrf([(dense, 1.0), (sparse, 1.0)], k=60, top_k=4)
    assert [h.position for h in hits] == [1, 3, 2, 4]
    assert hits[0].score == 1 / 61 + 1 / 62


def test_weights_shift_the_balance() -> None:
    dense = [(1, 0.9), (2, 0.8)]
    sparse = [(2, 5.0), (1, 4.0)]
    assert rrf([(dense, 0.9), (sparse, 0.1)], k=60, top_k=1)[0].position == 1
    assert rrf([(dense, 0.1), (sparse, 0.9)], k=60, top_k=1)[0].position == 2


def test_top_k_and_empty_rankings() -> None:
    assert rrf([([], 1.0), ([], 1.0)], k=60, top_k=3) == []
    assert len(rrf([([(i, 1.0) for i in range(10)], 1.0)], k=60, top_k=3)) == 3
