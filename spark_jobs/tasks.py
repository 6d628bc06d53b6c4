"""Executor-side passes over the user-partitioned, sorted events (Python workers: no pyspark).

Each Spark partition holds whole users, its events sorted by (user, ts, `_row`). `user_blocks`
cuts the Arrow batches of a partition into blocks of complete users (a user split across two
batches is carried over) and runs the per-user analysis of spark_jobs/rows.py on each block.

`stats_pass` counts (duplicates, users and events removed per reason, rows per split for this
partition) and the values of the kept events per feature (plus training-part item counts): what
the driver needs for the vocabularies and the shard plan. The writer (spark_jobs/shard_writer.py)
runs the same analysis again and builds the rows.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from spark_jobs.rows import SPLITS, USER_REASONS, Analysis, RowParams, analyze, num_rows

STATS_SCHEMA = "partition int, kind string, key string, count long, train long"
"""Stats pass output (Spark DDL): kind `stat` (key: counter name, per partition) or `value:<feature>`."""
_STATS_ARROW = pa.schema(
    [
        ("partition", pa.int32()),
        ("kind", pa.string()),
        ("key", pa.string()),
        ("count", pa.int64()),
        ("train", pa.int64()),
    ]
)


@dataclass(frozen=True, slots=True)
class Columns:
    """Event columns of the sorted events: categorical features (name -> column) and the dedup keys."""

    features: dict[str, str]  # feature name -> column (item first)
    numeric_keys: list[str]  # extra numeric dedup keys (rating)


def as_strings(values: pa.ChunkedArray | pa.Array) -> pa.ChunkedArray | pa.Array:
    """Integer ids travel as integers through Spark; vocabularies and outputs hold strings."""
    return values if pa.types.is_string(values.type) else pc.cast(values, pa.string())


def _user_array(table: pa.Table) -> np.ndarray:
    users = table.column("user")
    if pa.types.is_integer(users.type):
        return np.asarray(pc.fill_null(users, np.iinfo(np.int64).min), dtype=np.int64)
    return np.asarray(users.to_numpy(zero_copy_only=False), dtype=object)


def _codes(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """Equality codes of a column within one block (null -> a value no real one has)."""
    if pa.types.is_integer(column.type):
        return np.asarray(pc.fill_null(column, np.iinfo(np.int64).min), dtype=np.int64)
    if pa.types.is_floating(column.type):
        values = np.asarray(pc.fill_null(column, np.nan), dtype=np.float64)
        return np.where(np.isnan(values), np.iinfo(np.int64).min, values.view(np.int64))
    encoded = (
        pc.dictionary_encode(column).combine_chunks()
        if isinstance(column, pa.ChunkedArray)
        else pc.dictionary_encode(column)
    )
    return np.asarray(pc.fill_null(encoded.indices, -1), dtype=np.int64)


@dataclass(slots=True)
class Block:
    table: pa.Table  # the block's events
    users: np.ndarray  # user ids, one per event (int64, or objects for string ids)
    new_user: np.ndarray  # bool per event: first event of its user
    analysis: Analysis


def _new_users(users: np.ndarray) -> np.ndarray:
    new = np.ones(len(users), dtype=bool)
    new[1:] = users[1:] != users[:-1]
    return new


def _analyze(table: pa.Table, users: np.ndarray, new: np.ndarray, cols: Columns, p: RowParams) -> Block:
    keys = [_codes(table.column(c)) for c in [*cols.features.values(), *cols.numeric_keys]]
    ts = np.asarray(table.column("ts"), dtype=np.int64)
    row = np.asarray(table.column("_row"), dtype=np.int64)
    return Block(table, users, new, analyze(new, ts, row, keys, p))


def user_blocks(batches: Iterator[pa.RecordBatch], cols: Columns, p: RowParams) -> Iterator[Block]:
    """Analysed blocks of whole users from a partition's sorted batches."""
    carry: pa.Table | None = None
    for batch in batches:
        if not batch.num_rows:
            continue
        table = pa.Table.from_batches([batch])
        if carry is not None:
            table = pa.concat_tables([carry, table])
        users = _user_array(table)
        new = _new_users(users)
        cut = int(np.flatnonzero(new)[-1])  # the last user may continue in the next batch
        if cut:
            yield _analyze(table.slice(0, cut), users[:cut], new[:cut], cols, p)
        carry = table.slice(cut)
    if carry is not None and carry.num_rows:
        users = _user_array(carry)
        yield _analyze(carry, users, _new_users(users), cols, p)


def partition_id() -> int:
    """The Spark partition this task processes (the file group it writes)."""
    from pyspark import TaskContext  # light: the worker has pyspark loaded already

    return TaskContext.get().partitionId()


def _value_counts(values: pa.ChunkedArray, train: np.ndarray | None) -> pa.Table:
    table = pa.table(
        {
            "key": as_strings(values),
            "count": pa.array(np.ones(len(values), dtype=np.int64)),
            "train": pa.array(
                train.astype(np.int64) if train is not None else np.zeros(len(values), np.int64)
            ),
        }
    )
    return table.group_by("key").aggregate([("count", "sum"), ("train", "sum")])


def stats_pass(cols: Columns, p: RowParams) -> Callable[[Iterator[pa.RecordBatch]], Iterator[pa.RecordBatch]]:
    """The mapInArrow function of the counting pass."""

    def run(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        stats = dict.fromkeys(
            ["events", "duplicates", "kept", "users", *USER_REASONS, *(f"rows_{s}" for s in SPLITS)], 0
        )
        values: dict[str, list[pa.Table]] = {f: [] for f in cols.features}
        for block in user_blocks(batches, cols, p):
            a = block.analysis
            stats["events"] += block.table.num_rows
            stats["duplicates"] += int(a.duplicate_E.sum())
            stats["kept"] += int(a.kept_E.sum())
            stats["users"] += len(a.user_U)
            for reason, n in a.reason_counts.items():
                stats[reason] += n
            for split, n in num_rows(a, p).items():
                stats[f"rows_{split}"] += n
            kept = block.table.filter(pa.array(a.kept_E))
            for feature, column in cols.features.items():
                train = a.train_E[a.kept_E] if feature == "item" else None
                values[feature].append(_value_counts(kept.column(column), train))
        part = partition_id()
        out = [
            {"partition": part, "kind": "stat", "key": k, "count": v, "train": 0} for k, v in stats.items()
        ]
        yield pa.RecordBatch.from_pylist(out, schema=_STATS_ARROW)
        for feature, tables in values.items():
            if not tables:
                continue
            merged = (
                pa.concat_tables(tables)
                .group_by("key")
                .aggregate([("count_sum", "sum"), ("train_sum", "sum")])
            )
            n = merged.num_rows
            yield pa.RecordBatch.from_arrays(
                [
                    pa.array(np.full(n, part, np.int32)),
                    pa.array([f"value:{feature}"] * n),
                    merged.column("key").cast(pa.string()).combine_chunks(),
                    merged.column("count_sum_sum").combine_chunks(),
                    merged.column("train_sum_sum").combine_chunks(),
                ],
                schema=_STATS_ARROW,
            )

    return run
