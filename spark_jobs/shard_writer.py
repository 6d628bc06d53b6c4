"""The executor side of shard writing (Spark's Python workers: no pyspark.sql import).

A task gets one partition of the sorted events (whole users, spark_jobs/tasks.py), analyses each
block of users again exactly as the stats pass did, maps values to ids with the vocabularies
already written to the output folder (pyarrow `index_in`), builds every train/valid/test row with
spark_jobs/rows.py and appends them to one ParquetWriter per split, cutting row groups at exactly
the planned sizes. It returns one stats row per file written.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from seqrec.data import schema
from spark_jobs import storage
from spark_jobs.rows import SPLITS, RowParams, build_rows
from spark_jobs.tasks import Block, Columns, as_strings, partition_id, user_blocks

STATS_SCHEMA = "file int, path string, rows long, tokens long, row_groups int, sha256 string"
"""What the writer returns per file (Spark DDL)."""
_STATS_ARROW = pa.schema(
    [
        ("file", pa.int32()),
        ("path", pa.string()),
        ("rows", pa.int64()),
        ("tokens", pa.int64()),
        ("row_groups", pa.int32()),
        ("sha256", pa.string()),
    ]
)


@dataclass(slots=True)
class FilePlan:
    """One shard file: where it goes and the exact size of each of its row groups."""

    split: str
    path: str  # relative to the output folder
    rows: int
    row_groups: list[int] = field(default_factory=list)


def arrow_schema(feature_cols: list[str], with_target: bool) -> pa.Schema:
    """The exact column types of seqrec/data/schema.py (its one definition)."""
    return schema.shard_arrow_schema(feature_cols, with_target)


def _fixed_lists(matrix_RW: np.ndarray, dtype: pa.DataType) -> pa.ListArray:
    rows, width = matrix_RW.shape
    offsets = pa.array(np.arange(0, rows * width + 1, width, dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, pa.array(matrix_RW.reshape(-1), dtype))


class _FileWriter:
    """Writes one planned file, cutting row groups at exactly the planned sizes."""

    def __init__(self, index: int, plan: FilePlan, root: str, target: pa.Schema) -> None:
        self.index, self.plan, self.target = index, plan, target
        self.uri = schema.join(root, plan.path)
        self.writer = storage.parquet_writer(self.uri, target)
        self.pending: list[pa.Table] = []
        self.buffered = self.written = self.tokens = self.group = 0

    def add(self, table: pa.Table) -> None:
        self.pending.append(table)
        self.buffered += table.num_rows
        while self.group < len(self.plan.row_groups) and self.buffered >= self.plan.row_groups[self.group]:
            self._flush(self.plan.row_groups[self.group])
        if self.group == len(self.plan.row_groups) and self.buffered:
            raise RuntimeError(f"{self.uri}: more rows than the {self.plan.rows} planned")

    def _flush(self, size: int) -> None:
        data = pa.concat_tables(self.pending)
        chunk = data.slice(0, size).combine_chunks()
        self.writer.write_table(chunk, row_group_size=size)
        self.tokens += int(np.asarray(chunk.column(schema.COL_LENGTH)).sum())
        rest = data.slice(size)
        self.pending, self.buffered = ([rest] if rest.num_rows else []), rest.num_rows
        self.written += size
        self.group += 1

    def close(self) -> dict:
        self.writer.close()
        if self.written != self.plan.rows or self.buffered:
            raise RuntimeError(
                f"{self.uri}: wrote {self.written} rows (+{self.buffered} left), planned {self.plan.rows}"
            )
        row_groups = self.group
        return {
            "file": self.index,
            "path": self.plan.path,
            "rows": self.written,
            "tokens": self.tokens,
            "row_groups": row_groups,
            "sha256": storage.sha256(self.uri),
        }


@dataclass(frozen=True, slots=True)
class WriteSpec:
    """Everything a writer task needs (pickled into the Python workers)."""

    root: str
    params: RowParams
    columns: Columns  # features: name -> column, item first
    plans: list[FilePlan]  # all files of all splits; index = position
    files: dict[int, dict[str, int]]  # partition -> {split: index into plans}

    @property
    def event_features(self) -> list[str]:
        return [f for f in self.columns.features if f != "item"]


_LOOKUPS: dict[str, pa.Array] = {}


def _vocab_values(root: str, feature: str) -> pa.Array:
    """The vocabulary values of a feature in id order from id 2 (read once per worker process)."""
    path = schema.join(root, f"{schema.VOCAB_DIR}/{feature}.parquet")
    if path not in _LOOKUPS:
        table = storage.read_table(path)
        _LOOKUPS[path] = table.column("value").combine_chunks().slice(schema.NUM_RESERVED_IDS)
    return _LOOKUPS[path]


def _ids(values: pa.ChunkedArray, vocab: pa.Array) -> np.ndarray:
    """Dense ids: position in the vocabulary + 2; unknown and null values -> 1."""
    index = pc.index_in(as_strings(values), value_set=vocab)
    return np.asarray(pc.fill_null(pc.add(index, schema.NUM_RESERVED_IDS), schema.UNK_ID), dtype=np.int32)


def _split_table(rows: dict[str, np.ndarray], users: np.ndarray, split: str, features: list[str]) -> pa.Table:
    cols = {
        schema.COL_USER: as_strings(pa.array(users[rows["user"]])),
        schema.COL_LENGTH: pa.array(rows["length"], pa.int32()),
        schema.COL_ITEM: _fixed_lists(rows["item"], pa.int32()),
        schema.COL_TS: _fixed_lists(rows["ts"], pa.int64()),
        **{f: _fixed_lists(rows[f], pa.int32()) for f in features},
    }
    if split != "train":
        cols[schema.COL_TARGET] = pa.array(rows["item"][:, -1], pa.int32())
    return pa.table(cols)


class _TaskWriter:
    """One partition: its users' rows go to one file per split (the planned ones)."""

    def __init__(self, spec: WriteSpec, partition: int) -> None:
        self.spec = spec
        self.writers = {
            split: _FileWriter(
                index, spec.plans[index], spec.root, arrow_schema(spec.event_features, split != "train")
            )
            for split, index in spec.files.get(partition, {}).items()
        }
        self.partition = partition

    def add(self, block: Block) -> None:
        a, spec = block.analysis, self.spec
        kept = block.table.filter(pa.array(a.kept_E))
        columns = {"ts": np.asarray(kept.column("ts"), dtype=np.int64)}
        for feature, column in spec.columns.features.items():
            columns[feature] = _ids(kept.column(column), _vocab_values(spec.root, feature))
        built = build_rows(a, columns, spec.params)
        users = block.users[a.user_U]
        for split in SPLITS:
            rows = built[split]
            if len(rows["user"]):
                if split not in self.writers:
                    raise RuntimeError(
                        f"partition {self.partition}: {split} rows, but no {split} file was planned"
                    )
                self.writers[split].add(_split_table(rows, users, split, spec.event_features))

    def finish(self) -> list[dict]:
        return [w.close() for w in self.writers.values()]


def shard_writer(spec: WriteSpec) -> Callable[[Iterator[pa.RecordBatch]], Iterator[pa.RecordBatch]]:
    """The mapInArrow function of the writing pass: one stats row per written file."""

    def write(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        task = _TaskWriter(spec, partition_id())
        for block in user_blocks(batches, spec.columns, spec.params):
            task.add(block)
        stats = task.finish()
        if stats:
            yield pa.RecordBatch.from_pylist(stats, schema=_STATS_ARROW)

    return write
