"""Shard layout and writing: balanced files, exact row groups, written by the executors.

Layout of one split with R rows, F = `shards.files_per_split`, W = `shards.max_world_size`:
- every row gets a bucket, xxhash64(user) mod `NUM_BUCKETS`; buckets go to files largest first,
  each to the file with the fewest rows so far (ties: lowest bucket, lowest file). Files therefore
  differ by at most about one bucket (R / NUM_BUCKETS rows), however long some users' histories
  are (a row holds at most max_len + 1 events anyway). With fewer non-empty buckets than F, fewer
  files are written.
- file f with r_f rows gets ceil(r_f / row_group_rows) row groups, then more (to the file with the
  largest rows per group) until the split has at least W; sizes within a file differ by at most one.
  A split with fewer than W rows cannot feed W ranks and is an error.
- rows are sorted within a file by (xxhash64(user), user, window index): the same input and config
  give the same rows in the same order, and pyarrow writes the same bytes.

All splits are written in one Spark job: rows are shuffled so that each file's rows land in one
partition (`mapInArrow`), where pyarrow's ParquetWriter writes row groups of exactly the planned
size. Spark's own writer sizes row groups in bytes, which cannot guarantee W row groups.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F

from seqrec.config import ShardConfig
from seqrec.data import schema
from spark_jobs import storage
from spark_jobs.adapters import InputDataError

NUM_BUCKETS = 1024
"""Hash buckets per split used to balance files (balance granularity about R / NUM_BUCKETS rows)."""
STATS_SCHEMA = "file int, path string, rows long, tokens long, row_groups int, sha256 string"
_STATS_ARROW = pa.schema(
    [("file", pa.int32()), ("path", pa.string()), ("rows", pa.int64()), ("tokens", pa.int64()), ("row_groups", pa.int32()), ("sha256", pa.string())]
)


@dataclass(slots=True)
class FilePlan:
    """One shard file: where it goes and the exact size of each of its row groups."""

    split: str
    path: str  # relative to the output folder
    rows: int
    row_groups: list[int] = field(default_factory=list)


def assign_buckets(bucket_rows: dict[int, int], num_files: int) -> tuple[dict[int, int], list[int]]:
    """Largest-first greedy: bucket -> file index, and the rows per file (empty files dropped)."""
    buckets = sorted((b for b, r in bucket_rows.items() if r > 0), key=lambda b: (-bucket_rows[b], b))
    num_files = max(1, min(num_files, len(buckets)))
    heap = [(0, f) for f in range(num_files)]
    owner: dict[int, int] = {}
    for b in buckets:
        rows, f = heapq.heappop(heap)
        owner[b] = f
        heapq.heappush(heap, (rows + bucket_rows[b], f))
    sizes = [0] * num_files
    for rows, f in heap:
        sizes[f] = rows
    return owner, sizes


def row_groups(file_rows: list[int], cfg: ShardConfig, split: str) -> list[list[int]]:
    """Row group sizes per file: about `row_group_rows` each, at least `max_world_size` in total."""
    total = sum(file_rows)
    if total < cfg.max_world_size:
        raise InputDataError(
            f"split '{split}' has {total} rows, fewer than prepare.shards.max_world_size = {cfg.max_world_size}: "
            "each rank needs a row group; lower max_world_size or use more data"
        )
    groups = [max(1, math.ceil(r / cfg.row_group_rows)) for r in file_rows]
    while sum(groups) < cfg.max_world_size:
        f = max((i for i in range(len(groups)) if groups[i] < file_rows[i]), key=lambda i: (file_rows[i] / groups[i], -i))
        groups[f] += 1
    return [[r // g + (1 if i < r % g else 0) for i in range(g)] for r, g in zip(file_rows, groups, strict=True)]


def plan_split(split: str, bucket_rows: dict[int, int], cfg: ShardConfig) -> tuple[dict[int, int], list[FilePlan]]:
    owner, sizes = assign_buckets(bucket_rows, cfg.files_per_split)
    groups = row_groups(sizes, cfg, split)
    plans = [FilePlan(split, f"{split}/part-{f:05d}.parquet", r, g) for f, (r, g) in enumerate(zip(sizes, groups, strict=True))]
    return owner, plans


def arrow_schema(feature_cols: list[str], with_target: bool) -> pa.Schema:
    """The exact column types of seqrec/data/schema.py."""
    fields = [
        pa.field(schema.COL_USER, pa.string()),
        pa.field(schema.COL_LENGTH, pa.int32()),
        pa.field(schema.COL_ITEM, pa.list_(pa.int32())),
        pa.field(schema.COL_TS, pa.list_(pa.int64())),
        *[pa.field(c, pa.list_(pa.int32())) for c in feature_cols],
    ]
    if with_target:
        fields.append(pa.field(schema.COL_TARGET, pa.int32()))
    return pa.schema(fields)


class _FileWriter:
    """Writes one planned file, cutting row groups at exactly the planned sizes."""

    def __init__(self, index: int, plan: FilePlan, root: str, target: pa.Schema) -> None:
        self.index, self.plan, self.target = index, plan, target
        self.uri = schema.join(root, plan.path)
        self.writer = storage.parquet_writer(self.uri, target)
        self.pending: list[pa.Table] = []
        self.buffered = self.written = self.tokens = self.group = 0

    def add(self, table: pa.Table) -> None:
        self.pending.append(table.select(self.target.names).cast(self.target))
        self.buffered += table.num_rows
        while self.group < len(self.plan.row_groups) and self.buffered >= self.plan.row_groups[self.group]:
            self._flush(self.plan.row_groups[self.group])

    def _flush(self, size: int) -> None:
        data = pa.concat_tables(self.pending).combine_chunks()
        self.writer.write_table(data.slice(0, size), row_group_size=size)
        self.tokens += int(pc.sum(data.column(schema.COL_LENGTH).slice(0, size)).as_py() or 0)
        rest = data.slice(size)
        self.pending, self.buffered = ([rest] if rest.num_rows else []), rest.num_rows
        self.written += size
        self.group += 1

    def close(self) -> pa.RecordBatch:
        self.writer.close()
        if self.written != self.plan.rows or self.buffered:
            raise RuntimeError(f"{self.uri}: wrote {self.written} rows (+{self.buffered} left), planned {self.plan.rows}")
        return pa.RecordBatch.from_pylist(
            [
                {
                    "file": self.index,
                    "path": self.plan.path,
                    "rows": self.written,
                    "tokens": self.tokens,
                    "row_groups": self.group,
                    "sha256": storage.sha256(self.uri),
                }
            ],
            schema=_STATS_ARROW,
        )


def shard_writer(plans: list[FilePlan], root: str, schemas: dict[str, pa.Schema]):  # noqa: ANN201
    """The mapInArrow function: batches sorted by `_file` in, one stats row per written file out."""

    def write(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        current: _FileWriter | None = None
        for batch in batches:
            files = batch.column("_file").to_numpy()
            cuts = np.flatnonzero(np.diff(files)) + 1
            for start, stop in zip(np.r_[0, cuts], np.r_[cuts, len(files)], strict=True):
                f = int(files[start])
                if current is None or current.index != f:
                    if current is not None:
                        yield current.close()
                    current = _FileWriter(f, plans[f], root, schemas[plans[f].split])
                current.add(pa.Table.from_batches([batch.slice(start, stop - start)]))
        if current is not None:
            yield current.close()

    return write


def partition_keys(spark: object, num_partitions: int) -> list[int]:
    """Keys k_0.. such that Spark's hash partitioning sends key k_f to partition f (one file per task)."""
    found: dict[int, int] = {}
    probe = spark.range(0, 64 * num_partitions).select("id", F.pmod(F.hash("id"), F.lit(num_partitions)).alias("p"))  # type: ignore[attr-defined]
    for row in probe.collect():
        found.setdefault(row["p"], row["id"])
    missing = [p for p in range(num_partitions) if p not in found]
    assert not missing, f"no hash key found for partitions {missing}"
    return [found[p] for p in range(num_partitions)]


def _lookup_expr(values: list[int], index_sql: str) -> Column:
    """values[index] as one SQL expression (one literal array; building it from F.lit per element
    costs a py4j round trip each)."""
    return F.expr(f"element_at(array({', '.join(map(str, values))}), {index_sql} + 1)")


def write_splits(rows: dict[str, DataFrame], cfg: ShardConfig, root: str, feature_cols: list[str]) -> dict[str, dict]:
    """Write every split's shards under `root`; return the manifest's `splits` section."""
    spark = next(iter(rows.values())).sparkSession
    tagged = [
        df.withColumn("_split", F.lit(i)).withColumn("_hash", F.xxhash64("user"))
        .withColumn("_bucket", F.pmod(F.col("_hash"), F.lit(NUM_BUCKETS)).cast("int"))
        for i, df in enumerate(rows.values())
    ]
    names = list(rows)
    if "target" not in tagged[0].columns:  # train rows carry no target; union needs one column set
        tagged[0] = tagged[0].withColumn("target", F.lit(None).cast("int"))
    union = tagged[0].unionByName(tagged[1]).unionByName(tagged[2]) if len(tagged) == 3 else tagged[0]
    counts: dict[str, dict[int, int]] = {n: {} for n in names}
    for r in union.groupBy("_split", "_bucket").count().collect():
        counts[names[r["_split"]]][r["_bucket"]] = r["count"]
    plans: list[FilePlan] = []
    file_of = np.zeros(len(names) * NUM_BUCKETS, dtype=np.int64)
    for i, name in enumerate(names):
        owner, split_plans = plan_split(name, counts[name], cfg)
        for b, f in owner.items():
            file_of[i * NUM_BUCKETS + b] = len(plans) + f
        plans.extend(split_plans)
    keys = partition_keys(spark, len(plans))
    file_col = _lookup_expr(file_of.tolist(), f"_split * {NUM_BUCKETS} + _bucket")
    key_col = _lookup_expr(keys, "_file")
    laid = union.withColumn("_file", file_col).withColumn("_pkey", key_col)
    laid = laid.repartition(len(plans), "_pkey").sortWithinPartitions("_file", "_hash", "user", "_k")
    schemas = {n: arrow_schema(feature_cols, with_target=n != "train") for n in names}
    stats = laid.drop("_pkey", "_bucket", "_split").mapInArrow(shard_writer(plans, root, schemas), STATS_SCHEMA).collect()
    return _splits_section(names, plans, stats)


def _splits_section(names: list[str], plans: list[FilePlan], stats: list) -> dict[str, dict]:
    by_file = {s["file"]: s for s in stats}
    if sorted(by_file) != list(range(len(plans))):
        raise RuntimeError(f"shard writer reported files {sorted(by_file)}, planned {len(plans)}")
    out: dict[str, dict] = {}
    for name in names:
        files = [
            {k: by_file[i][k] for k in ("path", "rows", "tokens", "row_groups", "sha256")}
            for i, p in enumerate(plans)
            if p.split == name
        ]
        out[name] = {"files": files, "rows": sum(f["rows"] for f in files), "tokens": sum(f["tokens"] for f in files)}
    return out
