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

Logits are `query . item / temperature`, computed in float32 (float64 inputs stay float64). Ids 0 (pad) and 1 (unknown) are never
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


def _wide(x: Tensor) -> Tensor:
    """x in float32, or in its own dtype when that is wider (float64 stays float64)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


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


def _chunk_rows(num_candidates: int) -> int:
    """Query rows per chunk of the fused linear + cross-entropy: about 2M logits (8 MB in fp32),
    which stays in this class of CPU's L3 cache and keeps the matmuls large."""
    return max(16, min(8192, (1 << 21) // max(1, num_candidates)))


class _LinearCrossEntropy(torch.autograd.Function):
    """sum_n CE(query_n . cand / temperature, label_n) with the first `masked` columns at -inf.

    The [N, C] logits are never held whole: chunk by chunk of query rows, the forward computes the
    logits in the inputs' dtype, a softmax in float32 (or the inputs' dtype if wider), the loss, and right away the gradients
    (softmax - one-hot) @ cand and its transpose @ query, which backward only scales. Measured on
    ML-1M's full softmax (13.7k tokens x 3,416 items x 64): 2.5 to 3x faster than
    `F.cross_entropy` over materialised logits, whose log-softmax backward was the slowest op of
    the step (benchmarks/results/profile_step_*.json).
    """

    @staticmethod
    def forward(ctx, query_ND: Tensor, cand_CD: Tensor, labels_N: Tensor, masked: int, temperature: float) -> Tensor:
        need_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        acc = _wide(query_ND[:0]).dtype  # the softmax's dtype
        grad_q_ND = torch.empty_like(query_ND) if need_grad else None
        grad_c_CD = torch.zeros(cand_CD.shape, dtype=acc, device=cand_CD.device) if need_grad else None
        total = torch.zeros((), dtype=acc, device=query_ND.device)
        rows = _chunk_rows(cand_CD.shape[0])
        for s in range(0, query_ND.shape[0], rows):
            q_nD, lab_n = query_ND[s : s + rows], labels_N[s : s + rows]
            z_nC = (q_nD @ cand_CD.T).to(acc)
            if temperature != 1.0:
                z_nC.div_(temperature)
            z_nC[:, :masked] = -float("inf")
            top_n1 = z_nC.amax(1, keepdim=True)
            pos_n1 = z_nC.gather(1, lab_n[:, None])
            z_nC.sub_(top_n1).exp_()  # from here on z holds exp(logit - max)
            sum_n1 = z_nC.sum(1, keepdim=True)
            total += (sum_n1.log() + top_n1 - pos_n1).sum()
            if need_grad:
                z_nC.div_(sum_n1)  # softmax
                z_nC[torch.arange(len(lab_n), device=lab_n.device), lab_n] -= 1.0
                if temperature != 1.0:
                    z_nC.div_(temperature)
                g_nC = z_nC.to(cand_CD.dtype)
                torch.mm(g_nC, cand_CD, out=grad_q_ND[s : s + rows])
                grad_c_CD.addmm_(g_nC.T.to(acc), q_nD.to(acc))
        if need_grad:
            ctx.save_for_backward(grad_q_ND, grad_c_CD.to(cand_CD.dtype))
        return total

    @staticmethod
    def backward(ctx, grad_total: Tensor) -> tuple[Tensor | None, ...]:
        grad_q_ND, grad_c_CD = ctx.saved_tensors
        return grad_q_ND * grad_total.to(grad_q_ND.dtype), grad_c_CD * grad_total.to(grad_c_CD.dtype), None, None, None


def linear_cross_entropy(
    query_ND: Tensor, cand_CD: Tensor, labels_N: Tensor, *, masked: int = 0, temperature: float = 1.0
) -> Tensor:
    """Mean cross-entropy of `labels_N` (column ids of `cand_CD`) under logits query . cand / temperature,
    the first `masked` columns excluded, computed chunk by chunk (`_LinearCrossEntropy`); 0 for N == 0,
    still attached to the graph. Equal to `F.cross_entropy(query @ cand.T / temperature, labels)`."""
    total = _LinearCrossEntropy.apply(query_ND, cand_CD, labels_N, masked, float(temperature))
    return total / max(query_ND.shape[0], 1)


class FullSoftmaxLoss(nn.Module):
    """Cross-entropy over every item (pad and unknown columns masked), through the chunked fused
    linear + cross-entropy: no [N, V] logits are ever held whole."""

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
        return linear_cross_entropy(
            query_ND, cand_VD, labels_N, masked=NUM_RESERVED_IDS, temperature=self.temperature
        )


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
        pos_N = _scaled(_wide((query_ND * label_ND).sum(-1)), self.temperature)
        neg_NM = _scaled(_wide(query_ND @ neg_MD.T), self.temperature)
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
        logits_NC = _scaled(_wide(query_ND @ cand_CD.T), self.temperature)
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
