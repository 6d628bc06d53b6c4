"""Ranking metrics on hand-computed cases (ties, exclusions) and against a brute-force reference."""

from __future__ import annotations

import math

import pytest
import torch

from seqrec import metrics
from seqrec.metrics import finalize, popularity_scores, ranking_sums, target_ranks

pytestmark = pytest.mark.unit

NEG = -float("inf")


def brute_rank(scores: list[float], target: int, history: list[int] | None) -> int:
    excluded = {0, 1} | (set(history or []) - {target})
    return sum(1 for v, s in enumerate(scores) if v not in excluded and v != target and s >= scores[target])


def test_hand_computed_ranks_with_ties_and_exclusions() -> None:
    #                 pad  unk  2    3    4    5    6    7
    scores = torch.tensor(
        [
            [9.0, 9.0, 0.5, 0.9, 0.1, 0.7, 0.5, 0.2],  # target 2 (0.5): 3, 5 above, 6 ties -> 3
            [NEG, NEG, 0.5, 0.9, 0.1, 0.7, 0.5, 0.2],  # same scores, history {3, 6, 2, 0}: only 5 left -> 1
            [0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0],  # constant model: target 7 ranks last -> 5
            [0.0, 0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6],  # target 7 best -> 0, history repeats 6 -> still 0
        ]
    )
    targets = torch.tensor([2, 2, 7, 7])
    history = torch.tensor([[0, 0, 0, 0], [3, 6, 2, 0], [0, 0, 0, 0], [6, 6, 1, 7]])
    assert target_ranks(scores, targets, None).tolist() == [3, 3, 5, 0]
    assert target_ranks(scores, targets, history).tolist() == [3, 1, 5, 0]


def test_matches_brute_force_with_small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(metrics, "MAX_CHUNK_ELEMENTS", 7)  # many chunks, one smaller than the rest
    gen = torch.Generator().manual_seed(1)
    B, N, L = 6, 23, 5
    scores = torch.randint(0, 4, (B, N), generator=gen).float()  # many ties
    targets = torch.randint(2, N, (B,), generator=gen)
    history = torch.randint(0, N, (B, L), generator=gen)
    history[0, 2] = targets[0]
    for hist in (None, history):
        got = target_ranks(scores, targets, hist).tolist()
        want = [
            brute_rank(scores[b].tolist(), int(targets[b]), None if hist is None else hist[b].tolist())
            for b in range(B)
        ]
        assert got == want


def test_nan_target_score_gets_the_worst_rank() -> None:
    scores = torch.tensor([[0.0, 0.0, float("nan"), 1.0, 2.0, 3.0]])
    assert target_ranks(scores, torch.tensor([2]), None).tolist() == [3]
    assert target_ranks(scores, torch.tensor([2]), torch.tensor([[4, 0]])).tolist() == [2]


def test_reserved_targets_are_refused() -> None:
    with pytest.raises(ValueError, match=r"rows \[1\] have \[1\]"):
        target_ranks(torch.zeros(2, 5), torch.tensor([3, 1]), None)


def test_ranking_sums_hand_computed() -> None:
    sums = ranking_sums(torch.tensor([0, 1, 4, 10]), ks=[1, 5])
    assert sums["count"] == 4
    assert sums["hr@1"] == 1 and sums["hr@5"] == 3
    assert sums["ndcg@1"] == pytest.approx(1.0)
    assert sums["ndcg@5"] == pytest.approx(1 + 1 / math.log2(3) + 1 / math.log2(6))
    assert sums["mrr"] == pytest.approx(1 + 1 / 2 + 1 / 5 + 1 / 11)
    assert all(isinstance(v, float) for v in sums.values())


def test_finalize_divides_sums_across_batches() -> None:
    a, b = ranking_sums(torch.tensor([0, 3]), [2]), ranking_sums(torch.tensor([1]), [2])
    total = {k: a[k] + b[k] for k in a}  # what an all_reduce of the sums gives
    means = finalize(total)
    assert set(means) == {"hr@2", "ndcg@2", "mrr"}
    assert means["hr@2"] == pytest.approx(2 / 3)
    assert means["mrr"] == pytest.approx((1 + 1 / 4 + 1 / 2) / 3)
    with pytest.raises(ValueError, match="0"):
        finalize(ranking_sums(torch.tensor([], dtype=torch.long), [1]))


def test_popularity_scores_order_and_ties() -> None:
    counts = torch.tensor([100, 50, 3, 7, 7, 0, 3])
    scores = popularity_scores(counts, batch_size=3)
    assert scores.shape == (3, 7) and scores.dtype == torch.float32
    assert torch.isinf(scores[:, :2]).all() and (scores[:, :2] < 0).all()
    order = scores[0, 2:].argsort(descending=True, stable=True) + 2
    assert order.tolist() == [3, 4, 2, 6, 5]  # 7, 7 (smaller id first), 3, 3, 0
    assert len(set(scores[0, 2:].tolist())) == 5  # distinct: no pessimistic-tie penalty
    ranks = target_ranks(scores, torch.tensor([3, 4, 5]), None)
    assert ranks.tolist() == [0, 1, 4]
