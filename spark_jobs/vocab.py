"""Vocabularies (raw value -> dense id) and the item feature table.

Ids: 0 = `<pad>`, 1 = `<unk>`, then values by descending count with ties broken by value ascending
(string order), so the same counts always give the same ids. Values seen fewer than
`vocab_min_count` times are left out and map to 1. With `reuse_vocab`, an earlier output's files are
taken as they are: the same value keeps its id, a value it does not know maps to 1.

Counts: item, action and context values count kept events; item side-feature values count kept
items having the value (an item with two genres counts once for each).

Each vocabulary is written to `vocab/<feature>.parquet` (id int32, value string, count int64, with
the two reserved rows; `<unk>` counts the occurrences that map to it). Vocabularies are built on the
driver from collected counts: one row per distinct value, which is fine up to tens of millions.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa

from seqrec.data import schema
from spark_jobs import storage
from spark_jobs.adapters import InputDataError

log = logging.getLogger(__name__)

VOCAB_SCHEMA = pa.schema([("id", pa.int32()), ("value", pa.string()), ("count", pa.int64())])


@dataclass(slots=True)
class Vocab:
    """One feature's vocabulary: `values[i]` has id i + 2."""

    feature: str
    values: list[str]
    counts: list[int]
    unk_count: int = 0

    @property
    def num_embeddings(self) -> int:
        return len(self.values) + schema.NUM_RESERVED_IDS

    def ids(self) -> dict[str, int]:
        return {v: i + schema.NUM_RESERVED_IDS for i, v in enumerate(self.values)}

    def lookup_frame(self) -> pd.DataFrame:
        """value -> id as a pandas frame (to join in Spark)."""
        ids = np.arange(schema.NUM_RESERVED_IDS, self.num_embeddings, dtype=np.int32)
        return pd.DataFrame({"value": pd.Series(self.values, dtype=object), "id": ids})

    def table(self) -> pa.Table:
        return pa.table(
            {
                "id": pa.array(np.arange(self.num_embeddings, dtype=np.int32)),
                "value": pa.array([schema.PAD_VALUE, schema.UNK_VALUE, *self.values], pa.string()),
                "count": pa.array([0, self.unk_count, *self.counts], pa.int64()),
            },
            schema=VOCAB_SCHEMA,
        )


def build_vocab(feature: str, counts: dict[str | None, int], min_count: int) -> Vocab:
    """Ids by descending count, then value ascending; values under `min_count` map to <unk>."""
    kept = sorted(
        ((v, c) for v, c in counts.items() if v is not None and c >= min_count),
        key=lambda vc: (-vc[1], vc[0]),
    )
    unk = sum(c for v, c in counts.items() if v is None or c < min_count)  # null values map to <unk> too
    return Vocab(feature, [v for v, _ in kept], [c for _, c in kept], unk)


def vocab_path(root: str, feature: str) -> str:
    return schema.join(root, f"{schema.VOCAB_DIR}/{feature}.parquet")


def write_vocab(vocab: Vocab, root: str) -> None:
    storage.write_table(vocab.table(), vocab_path(root, vocab.feature))


def read_vocab(root: str, feature: str) -> Vocab:
    """An earlier output's vocabulary (for `reuse_vocab`); raises InputDataError naming the file."""
    path = vocab_path(root, feature)
    if not storage.exists(path):
        raise InputDataError(f"{path}: prepare.reuse_vocab has no vocabulary for feature '{feature}'")
    table = storage.read_table(path)
    ids = table.column("id").to_pylist()
    if ids != list(range(len(ids))) or len(ids) < schema.NUM_RESERVED_IDS:
        raise InputDataError(f"{path}: ids must run 0..N-1 with the reserved rows 0 and 1")
    values = table.column("value").to_pylist()[schema.NUM_RESERVED_IDS :]
    counts = table.column("count").to_pylist()
    return Vocab(feature, values, counts[schema.NUM_RESERVED_IDS :], counts[schema.UNK_ID])


def make_vocab(feature: str, counts: dict[str | None, int], min_count: int, reuse: str) -> Vocab:
    return read_vocab(reuse, feature) if reuse else build_vocab(feature, counts, min_count)


# --------------------------------------------------------------------------------------------------
# Item feature table
# --------------------------------------------------------------------------------------------------


def _dedupe_items(items: pd.DataFrame) -> pd.DataFrame:
    """Index by item; an item table listing an item twice keeps its first row in value order."""
    duplicated = items["item"].duplicated()
    if duplicated.any():
        log.warning(
            "item table: %d duplicate rows for the same item ignored (first in value order kept)",
            int(duplicated.sum()),
        )
        keyed = items.assign(_k=items.drop(columns="item").astype(str).agg("\x1f".join, axis=1))
        items = keyed.sort_values(["item", "_k"], kind="mergesort").drop_duplicates("item").drop(columns="_k")
    return items.set_index("item")


def _single_counts(values: pd.Series) -> dict[str, int]:
    return {str(k): int(v) for k, v in values.dropna().value_counts(sort=False).items()}


def _multi_counts(values: pd.Series) -> dict[str, int]:
    flat = values.dropna().explode().dropna()
    return {str(k): int(v) for k, v in flat.value_counts(sort=False).items()}


def _cap(values: object, max_values: int) -> list[str]:
    """Distinct values in input order, at most `max_values` (none for a missing value)."""
    if values is None or isinstance(values, float):  # NaN: item missing or value null
        return []
    return list(dict.fromkeys(str(v) for v in values))[:max_values]


@dataclass(slots=True)
class ItemFeatures:
    table: pa.Table
    vocabs: dict[str, Vocab]
    max_values: dict[str, int]


def item_features(
    item_vocab: Vocab,
    train_counts: dict[str, int],
    item_rows: pd.DataFrame | None,
    single: list[str],
    multi: list[str],
    max_values_per_item: int,
    min_count: int,
    reuse: str,
) -> ItemFeatures:
    """The `item_features.parquet` table (one row per item id) and the side-feature vocabularies.

    Items missing from the item table get <unk> (1) for single-valued features and [1, 0, ...] for
    multi-valued ones; the padding item 0 gets 0 everywhere.
    """
    n = item_vocab.num_embeddings
    train = np.zeros(n, dtype=np.int64)
    for value, item_id in item_vocab.ids().items():
        train[item_id] = train_counts.get(value, 0)
    # train events of values mapped to <unk> (vocab_min_count, reused vocabularies) count for id 1
    known = set(item_vocab.values)
    train[schema.UNK_ID] = sum(c for v, c in train_counts.items() if v not in known)
    columns: dict[str, pa.Array] = {
        schema.COL_ITEM: pa.array(np.arange(n, dtype=np.int32)),
        schema.COL_TRAIN_COUNT: pa.array(train),
    }
    vocabs: dict[str, Vocab] = {}
    max_values: dict[str, int] = {}
    table = item_rows if item_rows is not None else pd.DataFrame(columns=["item", *single, *multi])
    # one row per known item, in id order; `_present` is NaN for items missing from the item table
    rows = _dedupe_items(table.assign(_present=True)).reindex(item_vocab.values)
    for f in single:
        vocab = make_vocab(f, _single_counts(rows[f]), min_count, reuse)
        ids = vocab.ids()
        mapped = [ids.get(v, schema.UNK_ID) if isinstance(v, str) else schema.UNK_ID for v in rows[f]]
        columns[f] = pa.array([schema.PAD_ID, schema.UNK_ID, *mapped], pa.int32())
        vocabs[f] = vocab
    present = rows["_present"].notna().to_numpy()
    for f in multi:
        capped = [_cap(v, max_values_per_item) for v in rows[f]]
        vocab = make_vocab(
            f,
            _multi_counts(pd.Series([c for c, p in zip(capped, present, strict=True) if p], dtype=object)),
            min_count,
            reuse,
        )
        ids = vocab.ids()
        width = max([1, *map(len, capped)])
        lists = [[schema.PAD_ID] * width, [schema.UNK_ID] + [schema.PAD_ID] * (width - 1)]
        for vals, p in zip(capped, present, strict=True):
            mapped = [ids.get(v, schema.UNK_ID) for v in vals] if p else [schema.UNK_ID]
            lists.append(mapped + [schema.PAD_ID] * (width - len(mapped)))
        columns[f] = pa.array(lists, pa.list_(pa.int32()))
        vocabs[f], max_values[f] = vocab, width
    return ItemFeatures(pa.table(columns), vocabs, max_values)


def write_item_features(table: pa.Table, root: str) -> None:
    storage.write_table(table, schema.join(root, schema.ITEM_FEATURES_FILE))
