"""Training objectives over the item table: full softmax, sampled softmax (logQ), in-batch negatives.

Losses never read the item table: they get the rows they need from the model's one table lookup,
so the same loss works on a dense table and on a TorchRec table sharded across ranks. A loss says
which item rows it needs (`candidate_ids(labels_N)`, plus the label rows when `needs_label_rows`),
and is called as `loss(query_ND, labels_N, label_ND, candidates_C, cand_CD) -> scalar`, the mean over
the N counted labels (0 when N == 0, still attached to the graph); `label_ND` is None when the loss
does not need it. `build_loss` picks one through the single dict `LOSSES` keyed by `LossConfig.kind`.

- full: every item is a candidate (`candidates_C` = 0..V-1, pad and unknown masked): for catalogues
  whose [N, V] logits fit.
- sampled: the label rows plus `num_negatives` shared negatives: for large catalogues.
- in_batch: the unique labels of the batch are the candidates.

Logits are `query . item / temperature`, computed in float32. Ids 0 (pad) and 1 (unknown) are never
candidates. Sampled and in-batch logits subtract log(expected occurrences of the item among the
negatives) from the positive AND the negative logits (logQ correction, Yi et al. 2019), which makes
the sampled softmax a consistent estimate of the full one.

Legend: N counted labels (query rows), D width, V catalogue size (incl. pad/unk), M sampled
negatives, C candidates (V, M or the unique labels).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from seqrec.config import LossConfig
from seqrec.data.schema import NUM_RESERVED_IDS


def _mean(losses_N: Tensor) -> Tensor:
    # An empty selection gives 0 (not NaN) and keeps the graph, so every rank can still backward.
    return losses_N.sum() / max(losses_N.numel(), 1)


def _scaled(logits: Tensor, temperature: float) -> Tensor:
    """logits / temperature; at temperature 1 the division (a full pass over [N, V] logits, 11% of
    an ML-1M step in benchmarks/results/profile_step_before.json) is skipped: x / 1.0 == x exactly."""
    return logits if temperature == 1.0 else logits / temperature


def _popularity_q(item_counts_V: Tensor, alpha: float) -> Tensor:
    """q(item) proportional to count^alpha over real items, 0 for pad/unk (float64).

    Items never seen in training count as seen once: every real item can be drawn and log q stays
    finite for any label.
    """
    weights_V = item_counts_V.double().clamp(min=1.0) ** alpha
    weights_V[:NUM_RESERVED_IDS] = 0.0
    return weights_V / weights_V.sum()


def _uniform_q(item_counts_V: Tensor, alpha: float) -> Tensor:
    """q(item) = 1 / number of real items, 0 for pad/unk (float64; `alpha` is unused)."""
    q_V = torch.full_like(item_counts_V, 1.0 / (len(item_counts_V) - NUM_RESERVED_IDS), dtype=torch.float64)
    q_V[:NUM_RESERVED_IDS] = 0.0
    return q_V


PROPOSALS = {"uniform": _uniform_q, "popularity": _popularity_q}  # LossConfig.sampler -> q


class _CountsLoss(nn.Module):
    """Base of the losses that need training counts.

    The counts live in an int64 buffer: it follows `.to(device)` but not `.to(bfloat16)` (which
    DeepSpeed's bf16 mode applies to every float buffer), and q is derived from it in float64.
    """

    def __init__(self, cfg: LossConfig, item_counts: Tensor) -> None:
        super().__init__()
        self.temperature = cfg.temperature
        self.logq_correction = cfg.logq_correction
        self._item_counts = item_counts.detach().cpu().round().long()  # the source init_buffers restores
        self.register_buffer("item_counts_V", self._item_counts.clone(), persistent=False)

        self._cache: dict[tuple[str, float], Tensor] = {}

    def init_buffers(self) -> None:
        """Restore the counts buffer (e.g. after `to_empty` from the meta device)."""
        with torch.no_grad():
            self.item_counts_V.copy_(self._item_counts)
        self._cache.clear()

    def _cdf(self, sampler: str, alpha: float) -> Tensor:
        """Cumulative q [V] (float64), computed once: the only O(V) work, never per step."""
        key = (sampler, alpha)
        if key not in self._cache or self._cache[key].device != self.item_counts_V.device:
            self._cache[key] = torch.cumsum(PROPOSALS[sampler](self.item_counts_V, alpha), 0)
        return self._cache[key]

    def q_at(self, ids: Tensor, sampler: str, alpha: float) -> Tensor:
        """q(ids) (float64) without touching the other V - len(ids) items."""
        num_items = len(self.item_counts_V)
        if sampler == "uniform":
            q = torch.full(ids.shape, 1.0 / (num_items - NUM_RESERVED_IDS), dtype=torch.float64, device=ids.device)
        else:
            key = ("total", alpha)
            if key not in self._cache or self._cache[key].device != self.item_counts_V.device:
                self._cache[key] = (self.item_counts_V[NUM_RESERVED_IDS:].double().clamp(min=1.0) ** alpha).sum()
            q = self.item_counts_V[ids].double().clamp(min=1.0) ** alpha / self._cache[key]
        return torch.where(ids < NUM_RESERVED_IDS, 0.0, q)


class FullSoftmaxLoss(nn.Module):
    """Cross-entropy over every item (pad and unknown columns masked)."""

    needs_label_rows = False
    all_items = True  # the candidates are the whole table, in id order

    def __init__(self, cfg: LossConfig, item_counts: Tensor) -> None:
        super().__init__()
        self.temperature = cfg.temperature
        self.num_items = len(item_counts)

    def init_buffers(self) -> None:
        """Nothing derived from data to restore."""

    def candidate_ids(self, labels_N: Tensor) -> Tensor:
        """Every item id 0..V-1 (the label's column is its id)."""
        return torch.arange(self.num_items, device=labels_N.device)

    def forward(
        self, query_ND: Tensor, labels_N: Tensor, label_ND: Tensor | None, candidates_V: Tensor, cand_VD: Tensor
    ) -> Tensor:
        logits_NV = _scaled((query_ND @ cand_VD.T).float(), self.temperature)
        logits_NV[:, :NUM_RESERVED_IDS] = -float("inf")
        return _mean(F.cross_entropy(logits_NV, labels_N, reduction="none"))


class SampledSoftmaxLoss(_CountsLoss):
    """Softmax over the label plus `num_negatives` items shared by the whole batch.

    Negatives are drawn with replacement from q (uniform over real items, or count^alpha) on the
    default generator (`candidate_ids`, before the table lookup); no step does O(V) work, so the
    loss costs the same for 10^4 and 10^8 items. A
    negative equal to a row's label is masked for that row (accidental hit). With all real items
    once as the negatives and a uniform q this is exactly the full softmax.
    """

    needs_label_rows = True

    def __init__(self, cfg: LossConfig, item_counts: Tensor) -> None:
        super().__init__(cfg, item_counts)
        self.num_negatives = cfg.num_negatives
        self.sampler = cfg.sampler
        self.alpha = cfg.popularity_alpha

    def proposal(self) -> Tensor:
        """q [V] (float64) that negatives are drawn from."""
        return PROPOSALS[self.sampler](self.item_counts_V, self.alpha)

    def sample(self) -> Tensor:
        """`num_negatives` item ids drawn with replacement from q, in O(num_negatives x log V): uniform
        ids directly, popularity by inverting the cumulative q (cached once)."""
        device = self.item_counts_V.device
        if self.sampler == "uniform":
            return torch.randint(NUM_RESERVED_IDS, len(self.item_counts_V), (self.num_negatives,), device=device)
        cdf_V = self._cdf(self.sampler, self.alpha)
        u = torch.rand(self.num_negatives, dtype=torch.float64, device=device) * cdf_V[-1]
        return torch.searchsorted(cdf_V, u, right=True).clamp(max=len(cdf_V) - 1)

    def candidate_ids(self, labels_N: Tensor) -> Tensor:
        """The shared negatives of this batch."""
        return self.sample().to(labels_N.device)

    def forward(
        self, query_ND: Tensor, labels_N: Tensor, label_ND: Tensor | None, negatives_M: Tensor, neg_MD: Tensor
    ) -> Tensor:
        assert label_ND is not None, "the sampled softmax needs the label rows"
        pos_N = _scaled((query_ND * label_ND).sum(-1).float(), self.temperature)
        neg_NM = _scaled((query_ND @ neg_MD.T).float(), self.temperature)
        if self.logq_correction:
            M = len(negatives_M)
            pos_N = pos_N - (self.q_at(labels_N, self.sampler, self.alpha) * M).log().float()
            neg_NM = neg_NM - (self.q_at(negatives_M, self.sampler, self.alpha) * M).log().float()
        hit_NM = negatives_M.unsqueeze(0) == labels_N.unsqueeze(1)
        neg_NM = neg_NM.masked_fill(hit_NM, -float("inf"))
        logits_N1M = torch.cat([pos_N.unsqueeze(1), neg_NM], dim=1)
        target_N = torch.zeros_like(labels_N)
        return _mean(F.cross_entropy(logits_N1M, target_N, reduction="none"))


class InBatchSoftmaxLoss(_CountsLoss):
    """Softmax over the unique labels of the batch; each row's own label is its positive.

    With N labels drawn from the label distribution p (p proportional to training counts), an item
    appears among the unique candidates with probability 1 - (1 - p)^N; the log of that is subtracted
    from every logit when `logq_correction` is on (popular items are not over-penalised).
    """

    needs_label_rows = False

    def candidate_ids(self, labels_N: Tensor) -> Tensor:
        """The unique labels of the batch, sorted."""
        return torch.unique(labels_N, sorted=True)

    def forward(
        self, query_ND: Tensor, labels_N: Tensor, label_ND: Tensor | None, candidates_C: Tensor, cand_CD: Tensor
    ) -> Tensor:
        target_N = torch.searchsorted(candidates_C, labels_N)
        logits_NC = _scaled((query_ND @ cand_CD.T).float(), self.temperature)
        if self.logq_correction:
            p_C = self.q_at(candidates_C, "popularity", 1.0)
            # log(1 - (1 - p)^N), computed stably for tiny p.
            log_incl_C = torch.log(-torch.expm1(len(labels_N) * torch.log1p(-p_C))).float()
            logits_NC = logits_NC - log_incl_C
        return _mean(F.cross_entropy(logits_NC, target_N, reduction="none"))


LOSSES: dict[str, type[nn.Module]] = {
    "full": FullSoftmaxLoss,
    "sampled": SampledSoftmaxLoss,
    "in_batch": InBatchSoftmaxLoss,
}


def build_loss(cfg: LossConfig, item_counts: Tensor) -> nn.Module:
    """The loss module for `cfg.kind`; `item_counts` [V] are training counts per item id."""
    if cfg.kind not in LOSSES:
        raise ValueError(f"loss.kind must be one of {sorted(LOSSES)}, got {cfg.kind!r}")
    if cfg.temperature <= 0:
        raise ValueError(f"loss.temperature must be > 0, got {cfg.temperature}")
    if cfg.kind == "sampled" and cfg.num_negatives <= 0:
        raise ValueError(f"loss.num_negatives must be > 0, got {cfg.num_negatives}")
    if cfg.popularity_alpha < 0:
        raise ValueError(f"loss.popularity_alpha must be >= 0, got {cfg.popularity_alpha}")
    if item_counts.dim() != 1 or len(item_counts) <= NUM_RESERVED_IDS or bool((item_counts < 0).any()):
        raise ValueError(
            f"item_counts must be [num_items] non-negative counts with num_items > 2, got shape {tuple(item_counts.shape)}"
        )
    return LOSSES[cfg.kind](cfg, item_counts)
