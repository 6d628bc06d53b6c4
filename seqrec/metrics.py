"""Full-ranking metrics as pure tensor functions (no torch.distributed: callers all-reduce the sums).

`target_ranks` turns scores into the 0-based rank of each target among its candidates,
`ranking_sums` turns ranks into per-batch sums (HR@K, NDCG@K, MRR, count) that add up across
batches and ranks, and `finalize` divides by the count. Ties are pessimistic: an item scoring exactly
as high as the target ranks above it, so a constant model gets no credit.

Legend: B users (rows), N catalogue size (incl. pad 0 and unknown 1), L history length.

Example:
    ranks_B = target_ranks(scores_BN, targets_B, history_BL)
    sums = ranking_sums(ranks_B, ks=[10])   # {"hr@10": ..., "ndcg@10": ..., "mrr": ..., "count": B}
    finalize(sums)                          # {"hr@10": ..., "ndcg@10": ..., "mrr": ...}
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from seqrec.data.schema import NUM_RESERVED_IDS

MAX_CHUNK_ELEMENTS = 1 << 24  # bound on the [B, chunk] comparison temporaries (16M bools)


def _count_at_least(scores_BN: Tensor, target_score_B1: Tensor) -> Tensor:
    """Per row, how many real items (id >= 2) score >= the target's score, in column chunks."""
    num_rows, num_items = scores_BN.shape
    chunk = max(1, MAX_CHUNK_ELEMENTS // max(num_rows, 1))
    count_B = torch.zeros(num_rows, dtype=torch.long, device=scores_BN.device)
    for start in range(NUM_RESERVED_IDS, num_items, chunk):
        count_B += (scores_BN[:, start : start + chunk] >= target_score_B1).sum(1)
    return count_B


def unique_history(history_BL: Tensor, targets_B: Tensor) -> tuple[Tensor, Tensor]:
    """Sorted history and a mask of its entries that are real, not the target, and first copies."""
    sorted_BL, _ = history_BL.sort(dim=1)
    first_BL = torch.ones_like(sorted_BL, dtype=torch.bool)
    first_BL[:, 1:] = sorted_BL[:, 1:] != sorted_BL[:, :-1]
    keep_BL = first_BL & (sorted_BL >= NUM_RESERVED_IDS) & (sorted_BL != targets_B.unsqueeze(1))
    return sorted_BL, keep_BL


def target_ranks(scores_BN: Tensor, targets_B: Tensor, history_BL: Tensor | None) -> Tensor:
    """0-based rank [B] (long) of each target among its candidate items.

    rank = number of candidates other than the target whose score is >= the target's score. Candidates
    are all items except pad (0), unknown (1) and, when `history_BL` is given, the items of the row's
    history (the target itself always stays a candidate). A NaN target score gets the worst rank.
    Memory stays O(B x chunk) beyond the scores themselves.
    """
    if scores_BN.dim() != 2 or targets_B.shape != scores_BN.shape[:1]:
        raise ValueError(
            f"scores must be [B, N] and targets [B]; got {tuple(scores_BN.shape)} and {tuple(targets_B.shape)}"
        )
    bad_B = (targets_B < NUM_RESERVED_IDS) | (targets_B >= scores_BN.shape[1])
    if bool(bad_B.any()):  # one host sync per batch: scoring a pad/unknown target is a data bug
        raise ValueError(
            f"targets must be real item ids in [2, {scores_BN.shape[1]}); rows {bad_B.nonzero().flatten()[:10].tolist()} "
            f"have {targets_B[bad_B][:10].tolist()}"
        )
    target_score_B1 = scores_BN.gather(1, targets_B.unsqueeze(1))
    # Every real item with score >= target's, minus the target itself.
    ranks_B = _count_at_least(scores_BN, target_score_B1) - 1
    num_candidates_B = torch.full_like(ranks_B, scores_BN.shape[1] - NUM_RESERVED_IDS - 1)
    if history_BL is not None:
        items_BL, keep_BL = unique_history(history_BL.long(), targets_B)
        above_BL = scores_BN.gather(1, items_BL) >= target_score_B1
        ranks_B -= (keep_BL & above_BL).sum(1)
        num_candidates_B -= keep_BL.sum(1)
    return torch.where(target_score_B1.squeeze(1).isnan(), num_candidates_B, ranks_B)


def ranking_sums(ranks_B: Tensor, ks: Sequence[int]) -> dict[str, float]:
    """Sums over the batch (float64): hr@k, ndcg@k (1/log2(rank+2) if rank < k), mrr, and count."""
    ranks_B = ranks_B.detach().double()
    gain_B = 1.0 / torch.log2(ranks_B + 2.0)
    sums: dict[str, float] = {}
    for k in ks:
        hit_B = ranks_B < k
        sums[f"hr@{k}"] = float(hit_B.double().sum())
        sums[f"ndcg@{k}"] = float((gain_B * hit_B).sum())
    sums["mrr"] = float((1.0 / (ranks_B + 1.0)).sum())
    sums["count"] = float(ranks_B.numel())
    return sums


def finalize(sums: dict[str, float]) -> dict[str, float]:
    """Means from summed metrics: every key divided by "count" (which is dropped)."""
    count = sums.get("count", 0.0)
    if count <= 0:
        raise ValueError(f"cannot finalize metrics over {count} evaluated rows (empty evaluation split?)")
    return {key: value / count for key, value in sums.items() if key != "count"}


def popularity_scores(item_counts: Tensor, batch_size: int) -> Tensor:
    """[B, N] float32 scores of the popularity baseline (an expanded view: no B x N memory).

    Items are ordered by descending count, ties broken by the smaller id; scores are distinct
    (N - position in that order), pad and unknown get -inf.
    """
    num_items = len(item_counts)
    order_N = torch.argsort(-item_counts.double(), stable=True)
    scores_N = torch.empty(num_items, dtype=torch.float32, device=item_counts.device)
    scores_N[order_N] = torch.arange(num_items, 0, -1, dtype=torch.float32, device=item_counts.device)
    scores_N[:NUM_RESERVED_IDS] = -float("inf")
    return scores_N.unsqueeze(0).expand(batch_size, num_items)
