"""DataSpec: everything the model needs to know about the data, read from a shard folder's manifest
and item feature table (sizes, per-item side features, training counts), checked on the way in.
The model takes a DataSpec and never reads files itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from seqrec.data import schema
from seqrec.data.schema import Manifest


@dataclass
class DataSpec:
    """Everything the model needs to know about the data (built from the manifest, not hand-typed).

    Args:
        max_len: input events per row (rows hold max_len + 1 ids).
        num_items: item catalogue size V, including pad (0) and unknown (1).
        event_features: per-event feature name -> num_embeddings (action, context columns).
        item_features: item side feature name -> LongTensor [V] (single-valued) or [V, K] (multi-valued,
            padded with 0), indexed by item id.
        item_feature_sizes: item side feature name -> num_embeddings.
        item_counts: [V] training counts per item id (popularity proposal, logQ, baseline).
    """

    max_len: int
    num_items: int
    event_features: dict[str, int]
    item_features: dict[str, Tensor]
    item_feature_sizes: dict[str, int]
    item_counts: Tensor

    def __post_init__(self) -> None:
        if self.max_len <= 0 or self.num_items <= schema.NUM_RESERVED_IDS:
            raise ValueError(
                f"DataSpec: need max_len > 0 and num_items > 2, got {self.max_len}, {self.num_items}"
            )
        if tuple(self.item_counts.shape) != (self.num_items,):
            raise ValueError(
                f"DataSpec.item_counts must be [{self.num_items}], got {tuple(self.item_counts.shape)}"
            )
        for name, ids in self.item_features.items():
            if name not in self.item_feature_sizes:
                raise ValueError(f"DataSpec: item feature '{name}' has no entry in item_feature_sizes")
            if ids.dim() not in (1, 2) or ids.shape[0] != self.num_items:
                raise ValueError(
                    f"DataSpec: item feature '{name}' must be [{self.num_items}] or [{self.num_items}, K], got {tuple(ids.shape)}"
                )

    @classmethod
    def from_manifest(cls, manifest: Manifest) -> DataSpec:
        """Read sizes from the manifest and the per-item tables from item_features.parquet."""
        table = schema.item_features_table(manifest)
        path = manifest.path(schema.ITEM_FEATURES_FILE)
        order = _item_order(table.column(schema.COL_ITEM), manifest.num_items, path)
        features = manifest.features
        item_features: dict[str, Tensor] = {}
        for name in manifest.item_side_features:
            spec = features[name]
            multi = spec.kind == schema.KIND_ITEM_MULTI
            values = (
                _list_column(table.column(name), path, name)
                if multi
                else _int_column(table.column(name), path, name)
            )
            _check_ids(values, spec.num_embeddings, path, name)
            item_features[name] = torch.from_numpy(values[order])
        counts = _int_column(table.column(schema.COL_TRAIN_COUNT), path, schema.COL_TRAIN_COUNT)
        return cls(
            max_len=manifest.max_len,
            num_items=manifest.num_items,
            event_features={n: features[n].num_embeddings for n in manifest.event_features},
            item_features=item_features,
            item_feature_sizes={n: features[n].num_embeddings for n in manifest.item_side_features},
            item_counts=torch.from_numpy(counts[order]),
        )


def _item_order(column: Any, num_items: int, path: str) -> np.ndarray:
    """Row order that sorts the table by item id; the ids must be exactly 0..num_items-1."""
    ids = _int_column(column, path, schema.COL_ITEM)
    order = np.argsort(ids, kind="stable")
    if not np.array_equal(ids[order], np.arange(num_items)):
        raise schema.SchemaError(
            f"{path}: column '{schema.COL_ITEM}' must hold every id 0..{num_items - 1} exactly once"
        )
    return order


def _int_column(column: Any, path: str, name: str) -> np.ndarray:
    if column.null_count:
        row = column.is_null().to_numpy(zero_copy_only=False).argmax()
        raise schema.SchemaError(f"{path}: column '{name}' has a null at row {row}")
    return column.to_numpy().astype("int64")


def _list_column(column: Any, path: str, name: str) -> np.ndarray:
    """list<int> column -> int64 [rows, K], right-padded with 0 to the longest list."""
    lists = column.combine_chunks()
    if lists.null_count:
        raise schema.SchemaError(
            f"{path}: column '{name}' has a null list at row {lists.is_null().to_numpy(zero_copy_only=False).argmax()}"
        )
    offsets = lists.offsets.to_numpy()
    values = _int_column(lists.flatten(), path, name)
    lengths = np.diff(offsets)
    out = np.zeros((len(lengths), max(int(lengths.max(initial=0)), 1)), dtype=np.int64)
    rows = np.repeat(np.arange(len(lengths)), lengths)
    out[rows, np.arange(len(values)) - np.repeat(offsets[:-1] - offsets[0], lengths)] = values
    return out


def _check_ids(values: np.ndarray, num_embeddings: int, path: str, name: str) -> None:
    bad = (values < 0) | (values >= num_embeddings)
    if bad.any():
        row = int(bad.reshape(len(values), -1).any(1).argmax())
        raise schema.SchemaError(
            f"{path}: column '{name}' row {row} holds {values[row].tolist()}, outside [0, {num_embeddings}) from the manifest"
        )
