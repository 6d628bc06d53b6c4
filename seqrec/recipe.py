"""Training defaults derived from the data: what a config leaves unset (0 or absent) is chosen here
from the manifest's statistics, before anything is built, and logged with its reason.

The rules (docs/recipes.md explains each and the evidence behind it):

- `train.global_batch_size` (0): 128 sequences, the SASRec-family default, for up to 128,000
  training rows; larger datasets get the power of two nearest below rows / 1,000, at most 1,024,
  so a step stays a small fraction of an epoch. Rounded up to a multiple of the ranks.
- `train.micro_batch_size` (0): global batch / ranks, halved until it is at most 256 sequences
  (the rest becomes gradient accumulation).
- `train.max_steps` (0): `train.epochs` x optimizer steps per epoch; `train.epochs` (0) is derived
  as about 3,000 optimizer steps, within 1 to 200 epochs. Validation-based early stopping ends runs
  that stop improving sooner, and the best checkpoint is the one tested.
- `model.dropout` (unset): from the mean training history length m (tokens / rows): 0.5 for
  m <= 10 (sparse logs such as e-commerce, SASRec's value), 0.1 for m >= 100 (dense logs such as
  MovieLens, SASRec+'s value with the full softmax), log-linear in between.
- `train.eval_every` (0): about 25 validations per run; `train.save_every` (0): the same.
- `train.early_stopping_patience` (unset): 5 validations (a fifth of the run) without improvement.

A manifest these rules cannot use (an empty training split, no real item) fails with one line
naming the manifest field. The resolved values are what `config.json` and every checkpoint record,
so a resumed run or `seqrec evaluate` never derives them again.
"""

from __future__ import annotations

import logging
import math

from seqrec.config import ConfigError, RunConfig
from seqrec.data.schema import NUM_RESERVED_IDS, Manifest

log = logging.getLogger(__name__)

BASE_BATCH = 128
MAX_BATCH = 1024
MAX_MICRO_BATCH = 256
TARGET_STEPS = 3000
MAX_EPOCHS = 200
NUM_VALIDATIONS = 25
PATIENCE = 5
DROPOUT_SPARSE, DROPOUT_DENSE = 0.5, 0.1  # at mean history <= 10 and >= 100 events
SPARSE_HISTORY, DENSE_HISTORY = 10.0, 100.0


def _pow2_floor(x: float) -> int:
    return 1 << max(0, int(math.floor(math.log2(max(x, 1.0)))))


def data_stats(manifest: Manifest) -> dict[str, float]:
    """The statistics the rules read; a field they cannot use raises ConfigError naming it."""
    where = manifest.manifest_path
    rows = manifest.rows("train")
    if rows <= 0:
        raise ConfigError(f"{where}: splits.train.rows is {rows}: no training rows to derive a batch size or epochs from")
    items = manifest.num_items - NUM_RESERVED_IDS
    if items < 2:
        raise ConfigError(
            f"{where}: features.item.num_embeddings is {manifest.num_items} ({items} real item): "
            "next-item training needs at least 2 items"
        )
    tokens = float(manifest.raw["splits"]["train"].get("tokens", 0))
    if tokens <= 0:
        raise ConfigError(f"{where}: splits.train.tokens is {tokens:g}: the training rows hold no events")
    return {"rows": rows, "items": items, "mean_history": tokens / rows}


def derived_dropout(mean_history: float) -> float:
    """0.5 at <= 10 events per history, 0.1 at >= 100, log-linear in between (two decimals)."""
    x = min(max(mean_history, SPARSE_HISTORY), DENSE_HISTORY)
    t = math.log(x / SPARSE_HISTORY) / math.log(DENSE_HISTORY / SPARSE_HISTORY)
    return round(DROPOUT_SPARSE + t * (DROPOUT_DENSE - DROPOUT_SPARSE), 2)


def resolve(cfg: RunConfig, manifest: Manifest, world_size: int) -> list[str]:
    """Fill the unset training fields of `cfg` in place from `manifest`; one line per derived value."""
    train, notes = cfg.train, []
    if not (train.global_batch_size and train.micro_batch_size and train.max_steps and cfg.model.dropout is not None):
        stats = data_stats(manifest)
    if not train.global_batch_size:
        g = BASE_BATCH if stats["rows"] <= BASE_BATCH * 1000 else min(MAX_BATCH, _pow2_floor(stats["rows"] / 1000))
        per = world_size * (train.micro_batch_size or 1)
        train.global_batch_size = -(-g // per) * per
        notes.append(f"train.global_batch_size = {train.global_batch_size} ({stats['rows']:,} training rows)")
    if not train.micro_batch_size:
        if train.global_batch_size % world_size:
            raise ConfigError(
                f"train.global_batch_size ({train.global_batch_size}) must be a multiple of the {world_size} ranks"
            )
        micro = train.global_batch_size // world_size
        while micro > MAX_MICRO_BATCH and micro % 2 == 0:
            micro //= 2
        train.micro_batch_size = micro
        notes.append(f"train.micro_batch_size = {micro} (global {train.global_batch_size} over {world_size} ranks)")
    if not train.max_steps:
        steps_per_epoch = max(1, manifest.rows("train") // train.global_batch_size)
        if not train.epochs:
            wanted = max(1, round(TARGET_STEPS / steps_per_epoch))
            train.epochs = float(min(MAX_EPOCHS, wanted))
            why = f"about {TARGET_STEPS:,} steps at {steps_per_epoch} per epoch"
            notes.append(f"train.epochs = {train.epochs:g} ({why}" + (f", capped at {MAX_EPOCHS})" if wanted > MAX_EPOCHS else ")"))
        train.max_steps = max(1, round(train.epochs * steps_per_epoch))
        notes.append(f"train.max_steps = {train.max_steps} ({train.epochs:g} epochs x {steps_per_epoch} steps)")
    if cfg.model.dropout is None:
        cfg.model.dropout = derived_dropout(stats["mean_history"])
        notes.append(f"model.dropout = {cfg.model.dropout} (mean training history {stats['mean_history']:.1f} events)")
    if not train.eval_every:
        train.eval_every = max(1, round(train.max_steps / NUM_VALIDATIONS))
        notes.append(f"train.eval_every = {train.eval_every} (about {NUM_VALIDATIONS} validations)")
    if not train.save_every:
        train.save_every = train.eval_every
        notes.append(f"train.save_every = {train.save_every}")
    if train.early_stopping_patience is None:
        train.early_stopping_patience = PATIENCE
        notes.append(f"train.early_stopping_patience = {PATIENCE} validations")
    for note in notes:
        log.info("derived %s", note)
    return notes
