"""Distributed full-ranking evaluation: every item is a candidate, history items excluded by default.

Each rank scores its disjoint part of the split (row-group striping). The per-user ranks (ints) are
gathered from all ranks, sorted, and turned into metrics in that canonical order, so 1 rank and N
ranks give exactly the same numbers. All ranks run the same number of forward calls (a short rank
runs padding batches whose results are dropped): under ZeRO-3 every forward is a collective.

Metric names carry the protocol: `test/ndcg@10_full` (full ranking). Sampled metrics, if ever
added, must carry `_sampledN`.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from seqrec import checkpoint as ckpt
from seqrec import faults
from seqrec.config import EvalConfig, RunConfig
from seqrec.data.loader import Batch, ShardLoader
from seqrec.data.schema import (
    COL_ITEM,
    COL_TARGET,
    NUM_RESERVED_IDS,
    SCHEMA_VERSION,
    Manifest,
    SchemaError,
    read_manifest,
    verify_split,
)
from seqrec.distributed import DistInfo, all_gather_1d
from seqrec.engine import init_distributed, resolve_precision
from seqrec.metrics import finalize, popularity_scores, ranking_sums, target_ranks

log = logging.getLogger(__name__)

PROTOCOL_SUFFIX = "_full"

Scorer = Callable[[Batch], torch.Tensor]  # batch -> scores [B, num_items]
Ranker = Callable[[Batch], torch.Tensor]  # batch -> 0-based target ranks [B] (long)


def by_scores(scorer: Scorer, exclude_seen: bool) -> Ranker:
    """A ranker from a scorer of the whole catalogue (`metrics.target_ranks`)."""

    def rank(batch: Batch) -> torch.Tensor:
        history = batch[COL_ITEM][:, :-1] if exclude_seen else None
        return target_ranks(scorer(batch).float().cpu(), batch[COL_TARGET], history)

    return rank


def protocol(manifest: Manifest, cfg: EvalConfig) -> str:
    seen = "seen items excluded" if cfg.exclude_seen else "seen items included"
    return f"{manifest.split_kind}, full ranking over all {manifest.num_items - 2} items, {seen}"


def _padding_batch(like: Batch) -> Batch:
    """One row shaped like `like`, scored and discarded on a rank that ran out (its forward keeps the
    ranks' collectives in step): no history, and the first real item as its target, so that it
    passes the rankers' input checks."""
    batch = {k: torch.zeros_like(v[:1]) for k, v in like.items()}
    batch[COL_TARGET][:] = NUM_RESERVED_IDS
    batch[COL_ITEM][:, -1] = NUM_RESERVED_IDS  # the shard contract: target == item[-1]
    return batch


@torch.no_grad()
def rank_targets(
    ranker: Ranker,
    manifest: Manifest,
    split: str,
    cfg: EvalConfig,
    info: DistInfo,
    *,
    max_users: int = 0,
) -> torch.Tensor:
    """0-based ranks of every target of `split` (this rank's part, gathered from all ranks)."""
    loader = ShardLoader(
        manifest, split, dp_rank=info.rank, dp_world_size=info.world_size, batch_size=cfg.batch_size, train=False, shuffle=False
    )
    rows = loader.rank_rows
    if max_users:
        rows = [min(r, math.ceil(max_users / info.world_size)) for r in rows]
    num_batches = max(math.ceil(r / cfg.batch_size) for r in rows)
    my_rows = rows[info.rank]
    ranks: list[torch.Tensor] = []
    taken, template = 0, None
    with iter(loader) as batches:  # joins the prefetch thread even when stopping early (max_users)
        for _ in range(num_batches):
            batch = next(batches, None) if taken < my_rows else None
            if batch is not None:
                batch = {k: v[: my_rows - taken] for k, v in batch.items()}
                template = template or batch
            batch_ranks = ranker(batch if batch is not None else _padding_batch(template or _first_batch(manifest, split, cfg)))
            if batch is None:
                continue
            taken += len(batch[COL_TARGET])
            ranks.append(batch_ranks.cpu())
            faults.point("eval")
    local = torch.cat(ranks) if ranks else torch.zeros(0, dtype=torch.long)
    device = info.device if info.device.type == "cuda" else torch.device("cpu")
    return all_gather_1d(local.to(device=device, dtype=torch.long)).cpu()


def _first_batch(manifest: Manifest, split: str, cfg: EvalConfig) -> Batch:
    """Any one batch of the split (template for padding batches on a rank with no rows at all)."""
    with iter(ShardLoader(manifest, split, dp_rank=0, dp_world_size=1, batch_size=1, train=False, shuffle=False)) as batches:
        return next(batches)


def metrics_from_ranks(ranks: torch.Tensor, ks: list[int]) -> dict[str, float]:
    """Metrics in a canonical order (sorted ranks), identical for any number of ranks."""
    ordered = torch.sort(ranks).values
    return finalize(ranking_sums(ordered, ks)) | {"count": float(len(ordered))}


def evaluate(
    ranker: Ranker, manifest: Manifest, split: str, cfg: EvalConfig, info: DistInfo, *, max_users: int = 0
) -> dict[str, float]:
    """{"hr@10": ..., "ndcg@10": ..., "mrr": ..., "count": ...} for one split (`by_scores` makes a
    ranker from a scorer; sharded tables rank with `Engine.rank`)."""
    return metrics_from_ranks(rank_targets(ranker, manifest, split, cfg, info, max_users=max_users), cfg.ks)


def popularity_scorer(item_counts: torch.Tensor) -> Scorer:
    """The popularity baseline: every user gets the training-count ranking."""

    def score(batch: Batch) -> torch.Tensor:
        return popularity_scores(item_counts, len(batch[COL_ITEM]))

    return score


def named(metrics: dict[str, float], split: str) -> dict[str, float]:
    """`{"ndcg@10": x}` -> `{"test/ndcg@10_full": x}` (count stays unsuffixed)."""
    return {f"{split}/{k}" + ("" if k == "count" else PROTOCOL_SUFFIX): v for k, v in metrics.items()}


# ---------------------------------------------------------------------------------- seqrec evaluate
def evaluate_checkpoint(
    cfg: RunConfig, *, checkpoint: str = "best", split: str = "test", output: str | Path | None = None
) -> dict[str, Any]:
    """`seqrec evaluate`: full-ranking metrics of one checkpoint on one split, beside popularity.

    Read-only: the weights are loaded for scoring only (no optimizer, no training loader, no
    tracker, no DeepSpeed engine) and nothing in the run folder is rewritten; the result goes to
    `output` (default `<run_dir>/eval/<split>_<checkpoint>.json`). The model runs in the precision
    the training run used, so the numbers equal the run's own evaluation of that checkpoint. Runs in
    one process or under torchrun (each rank scores its part of the split).
    """
    from seqrec.data.spec import DataSpec
    from seqrec.export import scoring_model

    info = init_distributed(cfg.dist) if DistInfo.launched() else DistInfo.single()
    try:
        folder = ckpt.resolve(ckpt.checkpoint_root(cfg.run_dir), checkpoint)
    except FileNotFoundError as e:
        raise SchemaError(str(e)) from None
    manifest = read_manifest(cfg.data.path)
    verify_split(manifest, split)
    client = ckpt.client_state(folder)
    if client.get("schema_version") != SCHEMA_VERSION:
        raise SchemaError(f"{folder}: checkpoint schema_version {client.get('schema_version')} != {SCHEMA_VERSION}")
    spec = DataSpec.from_manifest(manifest)
    model, _ = scoring_model(cfg, folder, spec)
    precision = client.get("precision") or resolve_precision(cfg.train, info.device)
    model = model.to(device=info.device, dtype=torch.bfloat16 if precision == "bf16" else torch.float32).eval()

    def score(batch: Batch) -> torch.Tensor:
        return model({k: v.to(info.device) for k, v in batch.items()}, task="score")["scores"]

    metrics = evaluate(by_scores(score, cfg.eval.exclude_seen), manifest, split, cfg.eval, info)
    result = {
        "checkpoint": str(folder),
        "step": ckpt.step_of(folder),
        "split": split,
        "dataset": manifest.dataset,
        "protocol": protocol(manifest, cfg.eval),
        "precision": precision,
        "metrics": named(metrics, split),
        "popularity": named(
            evaluate(by_scores(popularity_scorer(spec.item_counts), cfg.eval.exclude_seen), manifest, split, cfg.eval, info),
            split,
        ),
    }
    if info.is_main:
        out = Path(output) if output else Path(cfg.run_dir) / "eval" / f"{split}_{folder.name}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(json.dumps(result, indent=2) + "\n")
        tmp.replace(out)
        result["output"] = str(out)
        log.info("evaluate %s on %s: %s -> %s", folder.name, split, json.dumps(result["metrics"]), out)
    return result
