"""Losses against plain-math reference implementations (python loops, float64)."""

from __future__ import annotations

import math
import typing

import pytest
import torch

from seqrec import losses
from seqrec.config import LossConfig
from seqrec.losses import (
    LOSSES,
    FullSoftmaxLoss,
    InBatchSoftmaxLoss,
    SampledSoftmaxLoss,
    build_loss,
    linear_cross_entropy,
)

pytestmark = pytest.mark.unit

V, D, N = 12, 5, 7


@pytest.fixture
def data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    query = torch.randn(N, D, generator=gen, dtype=torch.float64)
    weight = torch.randn(V, D, generator=gen, dtype=torch.float64)
    labels = torch.tensor([2, 5, 5, 11, 3, 2, 7])
    counts = torch.tensor([0, 9, 4, 1, 0, 7, 2, 3, 30, 1, 5, 8])  # item 4 never seen: counts as 1
    return query, labels, weight, counts


def dot(q: torch.Tensor, w: torch.Tensor) -> float:
    return sum(float(a) * float(b) for a, b in zip(q, w, strict=True))


def softmax_nll(pos: float, others: list[float]) -> float:
    top = max([pos, *others])
    return -(pos - top - math.log(sum(math.exp(x - top) for x in [pos, *others])))


def call(loss, query, labels, weight, candidates=None):
    """The loss as the model calls it: rows looked up from `weight` for the ids the loss asks for."""
    candidates = loss.candidate_ids(labels) if candidates is None else candidates
    label_rows = weight[labels] if loss.needs_label_rows else None
    return loss(query, labels, label_rows, candidates, weight[candidates])


def popularity_q(counts: torch.Tensor, alpha: float) -> list[float]:
    w = [0.0, 0.0] + [max(float(c), 1.0) ** alpha for c in counts[2:]]
    return [x / sum(w) for x in w]


@pytest.mark.parametrize("temperature", [0.5, 1.0])  # 1.0 skips the division
def test_full_matches_reference(data: tuple, temperature: float) -> None:
    query, labels, weight, counts = data
    loss = build_loss(LossConfig(kind="full", temperature=temperature), counts)
    assert isinstance(loss, FullSoftmaxLoss)
    want = 0.0
    for n in range(N):
        logits = [dot(query[n], weight[v]) / temperature for v in range(2, V)]
        pos = logits[int(labels[n]) - 2]
        want += softmax_nll(pos, logits[: int(labels[n]) - 2] + logits[int(labels[n]) - 1 :])
    assert float(call(loss, query, labels, weight)) == pytest.approx(want / N, rel=1e-5)


@pytest.mark.parametrize("sampler", ["uniform", "popularity"])
@pytest.mark.parametrize("logq", [True, False])
def test_sampled_matches_reference(data: tuple, sampler: str, logq: bool) -> None:
    query, labels, weight, counts = data
    cfg = LossConfig(
        kind="sampled",
        num_negatives=6,
        sampler=sampler,
        popularity_alpha=0.5,
        logq_correction=logq,
        temperature=2.0,
    )
    loss = build_loss(cfg, counts)
    negatives = torch.tensor([5, 3, 9, 5, 4, 10])  # 5 twice (with replacement), hits rows with label 5 twice
    q = popularity_q(counts, 0.5) if sampler == "popularity" else [0.0, 0.0] + [1 / (V - 2)] * (V - 2)
    M = len(negatives)
    want = 0.0
    for n in range(N):
        label = int(labels[n])
        corr = (lambda v: math.log(M * q[v])) if logq else (lambda v: 0.0)
        pos = dot(query[n], weight[label]) / 2.0 - corr(label)
        others = [dot(query[n], weight[int(m)]) / 2.0 - corr(int(m)) for m in negatives if int(m) != label]
        want += softmax_nll(pos, others)
    got = call(loss, query, labels, weight, negatives)
    assert float(got) == pytest.approx(want / N, rel=1e-5)


@pytest.mark.parametrize("sampler,logq", [("uniform", True), ("uniform", False), ("popularity", False)])
def test_sampled_with_every_item_once_equals_full(data: tuple, sampler: str, logq: bool) -> None:
    query, labels, weight, counts = data
    cfg = LossConfig(kind="sampled", num_negatives=3, sampler=sampler, logq_correction=logq, temperature=0.7)
    sampled = call(build_loss(cfg, counts), query, labels, weight, torch.arange(2, V))
    full = call(build_loss(LossConfig(kind="full", temperature=0.7), counts), query, labels, weight)
    torch.testing.assert_close(sampled, full)


def test_sampling_uses_the_default_generator_and_the_proposal(data: tuple) -> None:
    _, _, _, counts = data
    loss = build_loss(
        LossConfig(kind="sampled", num_negatives=20000, sampler="popularity", popularity_alpha=0.75), counts
    )
    assert isinstance(loss, SampledSoftmaxLoss)
    torch.testing.assert_close(loss.proposal(), torch.tensor(popularity_q(counts, 0.75), dtype=torch.float64))
    torch.manual_seed(3)
    first = loss.sample()
    torch.manual_seed(3)
    assert torch.equal(first, loss.sample())  # reproducible from the global seed
    assert first.min() >= 2
    freq = torch.bincount(first, minlength=V).double() / len(first)
    q = torch.tensor(popularity_q(counts, 0.75), dtype=torch.float64)
    assert torch.all((freq - q).abs() < 5 * torch.sqrt(q * (1 - q) / len(first)) + 1e-9)  # 5 sigma


def test_in_batch_matches_reference(data: tuple) -> None:
    query, labels, weight, counts = data
    for logq in (True, False):
        loss = build_loss(LossConfig(kind="in_batch", logq_correction=logq, temperature=0.5), counts)
        assert isinstance(loss, InBatchSoftmaxLoss)
        p = popularity_q(counts, 1.0)
        candidates = sorted({int(x) for x in labels})
        corr = {c: (math.log(1 - (1 - p[c]) ** N) if logq else 0.0) for c in candidates}
        want = 0.0
        for n in range(N):
            label = int(labels[n])
            pos = dot(query[n], weight[label]) / 0.5 - corr[label]
            others = [dot(query[n], weight[c]) / 0.5 - corr[c] for c in candidates if c != label]
            want += softmax_nll(pos, others)
        assert float(call(loss, query, labels, weight)) == pytest.approx(want / N, rel=1e-5)


@pytest.mark.parametrize("kind", sorted(LOSSES))
def test_gradients_flow_and_empty_batches_give_zero(kind: str, data: tuple) -> None:
    query, labels, weight, counts = data
    loss_fn = build_loss(LossConfig(kind=kind, num_negatives=4), counts)
    query = query.float().requires_grad_()
    weight = weight.float().requires_grad_()
    loss = call(loss_fn, query, labels, weight)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(query.grad).all() and weight.grad.abs().sum() > 0
    assert torch.all(weight.grad[:2] == 0)  # pad and unknown are never candidates
    empty = call(loss_fn, query[:0], labels[:0], weight)
    assert float(empty.detach()) == 0.0 and empty.requires_grad


@pytest.mark.parametrize("rows_per_chunk", [1, 3, 16, 1000])  # several chunks, a ragged last one, one chunk
@pytest.mark.parametrize("temperature", [1.0, 0.3])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_linear_cross_entropy_equals_materialised_logits(
    monkeypatch: pytest.MonkeyPatch, rows_per_chunk: int, temperature: float, dtype: torch.dtype
) -> None:
    monkeypatch.setattr(losses, "_chunk_rows", lambda num_candidates: rows_per_chunk)
    gen = torch.Generator().manual_seed(1)
    n, c, d = 37, 23, 6
    query = (3 * torch.randn(n, d, generator=gen, dtype=dtype)).requires_grad_()
    cand = torch.randn(c, d, generator=gen, dtype=dtype).requires_grad_()
    labels = torch.randint(2, c, (n,), generator=gen)
    upstream = 1.7  # the backward scales by whatever multiplies the loss later
    (upstream * linear_cross_entropy(query, cand, labels, masked=2, temperature=temperature)).backward()
    got = (query.grad.clone(), cand.grad.clone())
    query.grad, cand.grad = None, None
    logits = query @ cand.T / temperature
    logits = torch.cat([torch.full_like(logits[:, :2], -float("inf")), logits[:, 2:]], dim=1)
    want_loss = torch.nn.functional.cross_entropy(logits, labels)
    (upstream * want_loss).backward()
    tol = {"rtol": 1e-10, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 1e-4, "atol": 1e-6}
    # float32 softmax inside: the loss itself is float32 whatever the input dtype.
    torch.testing.assert_close(
        linear_cross_entropy(query, cand, labels, masked=2, temperature=temperature).double(),
        want_loss.double(), rtol=1e-6, atol=1e-6,
    )
    torch.testing.assert_close(got[0], query.grad, **tol)
    torch.testing.assert_close(got[1], cand.grad, **tol)
    assert torch.all(got[1][:2] == 0)


def test_linear_cross_entropy_without_grad_computes_no_gradients() -> None:
    query, cand, labels = torch.randn(5, 4), torch.randn(9, 4), torch.randint(2, 9, (5,))
    with torch.no_grad():
        loss = linear_cross_entropy(query, cand, labels, masked=2)
    want = torch.nn.functional.cross_entropy(
        torch.cat([torch.full((5, 2), -float("inf")), (query @ cand.T)[:, 2:]], dim=1), labels
    )
    torch.testing.assert_close(loss, want)


def test_losses_cover_every_config_choice() -> None:
    kinds = typing.get_args(typing.get_type_hints(LossConfig)["kind"])
    assert set(LOSSES) == set(kinds)


@pytest.mark.parametrize(
    "cfg,match",
    [
        (LossConfig(temperature=0.0), "loss.temperature"),
        (LossConfig(kind="sampled", num_negatives=0), "loss.num_negatives"),
        (LossConfig(popularity_alpha=-1.0), "loss.popularity_alpha"),
    ],
)
def test_bad_configs_are_refused(cfg: LossConfig, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        build_loss(cfg, torch.ones(10))
    with pytest.raises(ValueError, match="non-negative"):
        build_loss(LossConfig(), torch.tensor([0, 0, 3, -1]))


def test_meta_build_restores_buffers_in_init_buffers() -> None:
    counts = torch.arange(10)
    with torch.device("meta"):
        loss = build_loss(LossConfig(kind="sampled", sampler="popularity"), counts)
    loss.to_empty(device="cpu")
    loss.init_buffers()
    torch.testing.assert_close(loss.proposal(), _popularity_q_reference(counts, 0.75))


def test_counts_survive_a_bf16_cast() -> None:
    counts = torch.tensor([0, 0, 1001, 1003, 5, 7])  # 1001 and 1003 are one bf16 value
    loss = build_loss(LossConfig(kind="sampled", sampler="popularity", popularity_alpha=1.0), counts)
    loss.to(torch.bfloat16)  # what DeepSpeed's bf16 mode does to a module's float buffers
    assert loss.item_counts_V.dtype == torch.long
    torch.testing.assert_close(loss.proposal(), _popularity_q_reference(counts, 1.0))


def _popularity_q_reference(counts: torch.Tensor, alpha: float) -> torch.Tensor:
    return torch.tensor(popularity_q(counts, alpha), dtype=torch.float64)
