"""Tiny shard folders written with plain pyarrow, in the layout of seqrec/data/schema.py.

Used by trainer, loader and evaluation tests so they do not need Spark. Sequences carry a planted
pattern (item i is followed by item i + 1 within a user's cycle) so a tiny model can learn them.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from seqrec.data import schema


def _left_pad(values: list[int], width: int) -> list[int]:
    values = values[-width:]
    return [0] * (width - len(values)) + values


def make_sequences(num_users: int, num_items: int, min_len: int, max_len: int, seed: int) -> list[list[int]]:
    """Per-user item id lists (ids >= 2); each user walks a cycle i -> i+1 from a random start."""
    rng = np.random.default_rng(seed)
    seqs = []
    for _ in range(num_users):
        n = int(rng.integers(min_len, max_len + 1))
        start = int(rng.integers(0, num_items - 2))
        seqs.append([2 + (start + k) % (num_items - 2) for k in range(n)])
    return seqs


def write_tiny_dataset(
    root: Path,
    *,
    num_users: int = 64,
    num_items: int = 40,
    max_len: int = 8,
    files_per_split: int = 2,
    row_group_rows: int = 4,
    seed: int = 0,
    sequences: list[list[int]] | None = None,
) -> schema.Manifest:
    """Write a complete shard folder (leave-one-out) and return its manifest."""
    root = Path(root)
    seqs = sequences or make_sequences(num_users, num_items, 5, 3 * max_len, seed)
    width = max_len + 1
    num_actions = 4  # ids 2, 3 used
    rows: dict[str, list[dict]] = {s: [] for s in schema.SPLITS}
    train_count = np.zeros(num_items, dtype=np.int64)
    for u, seq in enumerate(seqs):
        ts = [1_000_000 + 100_000 * u + 60 * k for k in range(len(seq))]
        actions = [2 + (k % 2) for k in range(len(seq))]
        for item in seq[:-2]:
            train_count[item] += 1
        for split, end in (("train", len(seq) - 2), ("valid", len(seq) - 1), ("test", len(seq))):
            row = {
                schema.COL_USER: f"u{u}",
                schema.COL_LENGTH: min(end, width),
                schema.COL_ITEM: _left_pad(seq[:end], width),
                schema.COL_TS: _left_pad(ts[:end], width),
                "action": _left_pad(actions[:end], width),
            }
            if split != "train":
                row[schema.COL_TARGET] = seq[end - 1]
            rows[split].append(row)
    splits = {}
    for split, split_rows in rows.items():
        shard_schema = schema.shard_arrow_schema(["action"], with_target=split != "train")
        table = pa.Table.from_pylist(split_rows, schema=shard_schema)
        (root / split).mkdir(parents=True, exist_ok=True)
        files = []
        per_file = -(-table.num_rows // files_per_split)
        for i in range(files_per_split):
            part = table.slice(i * per_file, per_file)
            rel = f"{split}/part-{i:05d}.parquet"
            pq.write_table(part, root / rel, row_group_size=row_group_rows)
            meta = pq.ParquetFile(root / rel).metadata
            files.append(
                {
                    "path": rel,
                    "rows": part.num_rows,
                    "tokens": int(np.sum(part.column(schema.COL_LENGTH).to_numpy())),
                    "row_groups": meta.num_row_groups,
                    "sha256": schema.sha256_file(root / rel),
                }
            )
        splits[split] = {
            "files": files,
            "rows": table.num_rows,
            "tokens": sum(f["tokens"] for f in files),
        }
    items = pa.table(
        {
            schema.COL_ITEM: pa.array(np.arange(num_items), pa.int32()),
            schema.COL_TRAIN_COUNT: pa.array(train_count, pa.int64()),
            "category": pa.array([0, 1] + [2 + (i % 3) for i in range(num_items - 2)], pa.int32()),
        }
    )
    pq.write_table(items, root / schema.ITEM_FEATURES_FILE)
    manifest = {
        "schema_version": schema.SCHEMA_VERSION,
        "dataset": "tiny",
        "source": {"path": "tests/fixtures.py", "format": "generated"},
        "config": {},
        "max_len": max_len,
        "split_kind": "leave_one_out",
        "features": {
            "item": {"kind": schema.KIND_ITEM, "num_embeddings": num_items},
            "category": {"kind": schema.KIND_ITEM_SINGLE, "num_embeddings": 5},
            "action": {"kind": schema.KIND_EVENT, "num_embeddings": num_actions},
        },
        "splits": splits,
        "stats": {"events_in": sum(map(len, seqs)), "users": len(seqs), "items": num_items - 2},
        "quarantine": {},
        "filtered": {},
    }
    (root / schema.MANIFEST_FILE).write_text(json.dumps(manifest, indent=2))
    return schema.read_manifest(root)
