"""Export a checkpoint to a self-contained folder and serve top-K recommendations from it.

An export folder loads without DeepSpeed or a process group:

    model.pt                 {"state_dict": fp32 weights (ZeRO shards consolidated), "config": run config}
    manifest.json            the data manifest (vocabulary sizes, features, max_len)
    item_features.parquet    per-item side features and training counts
    vocab/<feature>.parquet  raw value <-> id, to map recommendations back to catalogue ids

`recommend` reads histories in the shard layout (any split folder or file written by `seqrec
prepare`, a local path or a URL such as s3://bucket/prefix/test), scores every item for the next
event after the whole history, excludes items already in the history, and writes `user, rank, item,
score` rows, batch by batch.
"""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from seqrec import checkpoint as ckpt
from seqrec.config import RunConfig, from_dict, to_dict
from seqrec.data import storage
from seqrec.data.schema import (
    COL_ITEM,
    COL_USER,
    ITEM_FEATURES_FILE,
    MANIFEST_FILE,
    PAD_ID,
    VOCAB_DIR,
    Manifest,
    SchemaError,
    read_manifest,
)
from seqrec.data.spec import DataSpec
from seqrec.model import SeqRecModel

log = logging.getLogger(__name__)

MODEL_FILE = "model.pt"


def consolidated_state_dict(folder: Path, zero_stage: int) -> dict[str, torch.Tensor]:
    """fp32 weights of a DeepSpeed checkpoint folder, ZeRO partitions merged (no process group needed)."""
    if zero_stage == 0:
        module = torch.load(folder / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
        return {k: v.float() if v.is_floating_point() else v for k, v in module.items()}
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    state = get_fp32_state_dict_from_zero_checkpoint(str(folder.parent), tag=folder.name)
    # zero_to_fp32 returns parameters; buffers (item side features) come from the module states file.
    module = torch.load(next(folder.glob("*model_states.pt")), map_location="cpu", weights_only=False)["module"]
    for name, value in module.items():
        if name not in state and not value.is_floating_point():
            state[name] = value
    return state


def scoring_model(cfg: RunConfig, folder: Path, spec: DataSpec) -> tuple[SeqRecModel, RunConfig]:
    """The weights of checkpoint `folder` in a model that owns its tables, with the config that
    builds it: a run with sharded TorchRec tables (embeddings.backend = "torchrec") gets its tables
    consolidated from their shards into the dense layout (`seqrec.tables.consolidate`), so export,
    recommend and `seqrec evaluate` need no process group."""
    from seqrec.engine import TABLES_DIR

    state = consolidated_state_dict(folder, cfg.dist.zero_stage)
    if cfg.model.dropout is None:  # a config with the data-derived dropout unresolved: scoring never drops
        cfg = replace(cfg, model=replace(cfg.model, dropout=0.0))
    if cfg.embeddings.backend == "torchrec":
        from seqrec.tables import consolidate

        cfg = replace(cfg, embeddings=replace(cfg.embeddings, backend="dense"))
        model = SeqRecModel(spec, cfg.model, cfg.embeddings, cfg.loss)
        try:
            state["embeddings.weight"] = consolidate(folder / TABLES_DIR, model.tables, cfg.embeddings.dim)
        except FileNotFoundError as e:
            raise SchemaError(str(e)) from None
    else:
        model = SeqRecModel(spec, cfg.model, cfg.embeddings, cfg.loss)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or [m for m in missing if not m.startswith("loss.")]:
        raise SchemaError(f"{folder}: weights do not fit the model of this config (missing {missing}, unexpected {unexpected})")
    return model, cfg


def export_model(cfg: RunConfig, *, checkpoint: str = "best", output: str | Path) -> Path:
    """Write a self-contained export of `checkpoint` ('best', 'last' or a folder) of cfg.run_dir.

    The data folder (cfg.data.path) may be a URL; the export folder and the run folder are local.
    """
    out = Path(output)
    try:
        folder = ckpt.resolve(ckpt.checkpoint_root(cfg.run_dir), checkpoint)
    except FileNotFoundError as e:
        raise SchemaError(str(e)) from None
    manifest = read_manifest(cfg.data.path)
    model, cfg = scoring_model(cfg, folder, DataSpec.from_manifest(manifest))
    out.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": model.state_dict(), "config": to_dict(cfg), "checkpoint": str(folder)}, out / MODEL_FILE)
    # The data folder may be a URL (s3://...): copy through the storage layer.
    storage.copy_file(manifest.manifest_path, out / MANIFEST_FILE)
    storage.copy_file(manifest.path(ITEM_FEATURES_FILE), out / ITEM_FEATURES_FILE)
    vocab = manifest.path(VOCAB_DIR)
    if storage.is_dir(vocab):
        storage.copy_tree(vocab, out / VOCAB_DIR)
    log.info("exported %s to %s", folder, out)
    return out


def load_exported(folder: str | Path) -> tuple[SeqRecModel, Manifest, RunConfig]:
    """The exported model in eval mode, its manifest and run config."""
    folder = Path(folder)
    if not (folder / MODEL_FILE).is_file():
        raise SchemaError(f"{folder / MODEL_FILE}: not an export folder (run `seqrec export` first)")
    blob = torch.load(folder / MODEL_FILE, map_location="cpu", weights_only=False)
    cfg = from_dict(blob["config"], str(folder / MODEL_FILE))
    manifest = read_manifest(folder)
    model = SeqRecModel(DataSpec.from_manifest(manifest), cfg.model, cfg.embeddings, cfg.loss)
    model.load_state_dict(blob["state_dict"])
    return model.eval(), manifest, cfg


def next_event_batch(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Shift rows left by one and pad the last slot: the model then reads the WHOLE history as input
    and its last state predicts the event after it (score() predicts item[:, -1])."""
    out = {}
    for k, v in batch.items():
        if v.dim() == 2:
            shifted = torch.zeros_like(v)
            shifted[:, :-1] = v[:, 1:]
            out[k] = shifted
        else:
            out[k] = v
    return out


def _item_values(folder: Path, num_items: int) -> np.ndarray:
    """id -> raw item value (strings); ids without a vocabulary file map to themselves."""
    path = folder / VOCAB_DIR / "item.parquet"
    values = np.array([str(i) for i in range(num_items)], dtype=object)
    if path.is_file():
        table = pq.read_table(path)
        ids = table.column("id").to_numpy()
        values[ids] = np.array(table.column("value").to_pylist(), dtype=object)
    return values


def _history_files(path: str) -> list[str]:
    """The Parquet files of a history folder, or the one file given; local paths or URLs."""
    files = storage.list_files(path, ".parquet") if storage.is_dir(path) else [path]
    if not files:
        raise SchemaError(f"{path}: no Parquet files with histories")
    return files


@torch.no_grad()
def recommend(*, model_dir: str | Path, histories: str | Path, output: str | Path, k: int = 10, batch_size: int = 512) -> dict[str, Any]:
    """Top-k unseen items per history row -> Parquet (user, rank, item, score)."""
    model, manifest, _ = load_exported(model_dir)
    values = _item_values(Path(model_dir), manifest.num_items)
    tensor_cols = [COL_ITEM, "ts", *manifest.event_features]
    writer, rows = None, 0
    tmp = Path(str(output) + ".tmp")
    for file in _history_files(str(histories)):
        pf = storage.parquet_file(file)
        missing = [c for c in [COL_USER, *tensor_cols] if c not in pf.schema_arrow.names]
        if missing:
            raise SchemaError(f"{file}: missing columns {missing} (expected the shard layout of `seqrec prepare`)")
        for rb in pf.iter_batches(batch_size=batch_size, columns=[COL_USER, *tensor_cols]):
            batch = {c: torch.from_numpy(np.stack(rb.column(c).to_numpy(zero_copy_only=False)).astype(np.int64)) for c in tensor_cols}
            shifted = next_event_batch(batch)
            scores = model(shifted, task="score")["scores"]
            seen = batch[COL_ITEM]
            scores.scatter_(1, seen, float("-inf"))  # never recommend what the user already had
            scores[:, PAD_ID] = float("-inf")
            top = torch.topk(scores, k=min(k, manifest.num_items - 2), dim=1)
            users = np.repeat(np.array(rb.column(COL_USER).to_pylist(), dtype=object), top.indices.shape[1])
            table = pa.table(
                {
                    "user": pa.array(users.tolist(), pa.string()),
                    "rank": pa.array(np.tile(np.arange(1, top.indices.shape[1] + 1), len(rb)), pa.int32()),
                    "item": pa.array(values[top.indices.numpy().ravel()].tolist(), pa.string()),
                    "score": pa.array(top.values.numpy().ravel(), pa.float32()),
                }
            )
            writer = writer or pq.ParquetWriter(tmp, table.schema)
            writer.write_table(table)
            rows += len(rb)
    if writer is None:
        raise SchemaError(f"{histories}: no history rows")
    writer.close()
    tmp.replace(output)
    summary = {"users": rows, "k": k, "output": str(output)}
    log.info("recommend: %s", json.dumps(summary))
    return summary
