"""Shard layout and the two executor passes over the user-sorted events.

The events are partitioned by user into F = `shards.files_per_split` partitions and sorted by
(user, ts, `_row`); partition f writes `train/part-f`, `valid/part-f` and `test/part-f`. Users fall
into `NUM_BUCKETS` hash buckets, and buckets are dealt to partitions by their event counts (counted
while validating), largest first: partitions differ by about one bucket of events, so files are
balanced in rows too, however long some histories are (a row holds at most max_len + 1 events).
A partition without rows in a split writes no file there (tiny data); files are numbered densely.

A split's file with r rows gets ceil(r / `row_group_rows`) row groups, then more (to the file with
the most rows per group) until the split has at least W = `max_world_size`; sizes within a file
differ by at most one. A split with fewer than W rows cannot feed W ranks and is an error. Rows are
ordered by user within a file, so the same input and config give the same rows in the same order,
and pyarrow writes the same bytes.

The stats pass (spark_jobs/tasks.py) counts rows per partition and split before anything is
written; the writing pass (spark_jobs/shard_writer.py) writes row groups of exactly the planned
size. Spark's own writer sizes row groups in bytes, which cannot guarantee W of them.
"""

from __future__ import annotations

import heapq
import math
from collections import defaultdict

from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F

from seqrec.config import ShardConfig
from spark_jobs.adapters import ROW, InputDataError
from spark_jobs.rows import SPLITS, RowParams
from spark_jobs.shard_writer import STATS_SCHEMA as FILE_STATS_SCHEMA
from spark_jobs.shard_writer import FilePlan, WriteSpec, shard_writer
from spark_jobs.tasks import STATS_SCHEMA, Columns, stats_pass

NUM_BUCKETS = 1024
"""User hash buckets used to balance partitions (granularity about events / NUM_BUCKETS)."""


def bucket(user: Column) -> Column:
    """A user's balancing bucket."""
    return F.pmod(F.xxhash64(user), F.lit(NUM_BUCKETS)).cast("int")


def assign_buckets(bucket_events: dict[int, int], num_groups: int) -> list[int]:
    """Bucket -> partition: largest bucket first, each to the partition with the fewest events so far
    (ties: lowest bucket, lowest partition). Partitions then differ by about one bucket of events."""
    heap = [(0, g) for g in range(num_groups)]
    group_of = [0] * NUM_BUCKETS
    for b in sorted(bucket_events, key=lambda b: (-bucket_events[b], b)):
        load, g = heapq.heappop(heap)
        group_of[b] = g
        heapq.heappush(heap, (load + bucket_events[b], g))
    return group_of


def _spark_hash_int(value: int, seed: int = 42) -> int:
    """Spark's `hash()` (Murmur3_x86_32.hashInt) of an int column value, as a signed 32-bit int."""

    def rotl(x: int, r: int) -> int:
        return ((x << r) | (x >> (32 - r))) & 0xFFFFFFFF

    k1 = rotl((value * 0xCC9E2D51) & 0xFFFFFFFF, 15) * 0x1B873593 & 0xFFFFFFFF
    h1 = rotl(seed ^ k1, 13) * 5 + 0xE6546B64 & 0xFFFFFFFF
    h1 ^= 4
    h1 = (h1 ^ (h1 >> 16)) * 0x85EBCA6B & 0xFFFFFFFF
    h1 = (h1 ^ (h1 >> 13)) * 0xC2B2AE35 & 0xFFFFFFFF
    h1 ^= h1 >> 16
    return h1 - (1 << 32) if h1 >= 1 << 31 else h1


def partition_keys(num_partitions: int) -> list[int]:
    """Int keys k_g such that Spark's hash partitioning sends k_g to partition g."""
    found: dict[int, int] = {}
    key = 0
    while len(found) < num_partitions:
        found.setdefault(_spark_hash_int(key) % num_partitions, key)  # Python % is Spark's pmod here
        key += 1
    return [found[p] for p in range(num_partitions)]


def sort_by_user(events: DataFrame, group_of: list[int]) -> DataFrame:
    """Whole users per partition (partition g = the users of the buckets assigned to g), each
    partition sorted by (user, ts, input position)."""
    num_groups = max(group_of) + 1
    keys = partition_keys(num_groups)
    key_of_bucket = ", ".join(str(keys[g]) for g in group_of)
    pkey = F.expr(f"element_at(array({key_of_bucket}), cast(pmod(xxhash64(user), {NUM_BUCKETS}) as int) + 1)")
    return events.repartition(num_groups, pkey).sortWithinPartitions("user", "ts", ROW)


def collect_stats(
    events: DataFrame, columns: Columns, params: RowParams
) -> tuple[dict[int, dict[str, int]], dict[str, dict]]:
    """Run the stats pass: ({partition: {counter: n}}, {feature: {value: (count, train count)}})."""
    stats = events.mapInArrow(stats_pass(columns, params), STATS_SCHEMA)
    merged = stats.groupBy(
        F.when(F.col("kind") == "stat", F.col("partition")).otherwise(-1).alias("p"), "kind", "key"
    )
    per_partition: dict[int, dict[str, int]] = defaultdict(dict)
    values: dict[str, dict] = {f: {} for f in columns.features}
    for r in merged.agg(F.sum("count").alias("count"), F.sum("train").alias("train")).collect():
        if r["kind"] == "stat":
            per_partition[r["p"]][r["key"]] = r["count"]
        else:
            values[r["kind"].split(":", 1)[1]][r["key"]] = (r["count"], r["train"])
    return dict(per_partition), values


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
        f = max(
            (i for i in range(len(groups)) if groups[i] < file_rows[i]),
            key=lambda i: (file_rows[i] / groups[i], -i),
        )
        groups[f] += 1
    return [
        [r // g + (1 if i < r % g else 0) for i in range(g)] for r, g in zip(file_rows, groups, strict=True)
    ]


def plan_files(
    rows: dict[int, dict[str, int]], cfg: ShardConfig
) -> tuple[list[FilePlan], dict[int, dict[str, int]]]:
    """All files of all splits (index = position) and, per partition, its file index per split.

    `rows`: {partition: {split: rows}}.
    """
    plans: list[FilePlan] = []
    files: dict[int, dict[str, int]] = {p: {} for p in rows}
    for split in SPLITS:
        parts = [p for p in sorted(rows) if rows[p].get(split, 0) > 0]
        sizes = row_groups([rows[p][split] for p in parts], cfg, split)
        for f, (p, rg) in enumerate(zip(parts, sizes, strict=True)):
            files[p][split] = len(plans)
            plans.append(FilePlan(split, f"{split}/part-{f:05d}.parquet", rows[p][split], rg))
    return plans, files


def write_splits(events: DataFrame, spec: WriteSpec) -> dict[str, dict]:
    """Write every planned file in one job; return the manifest's `splits` section."""
    stats = events.mapInArrow(shard_writer(spec), FILE_STATS_SCHEMA).collect()
    by_file = {s["file"]: s for s in stats}
    if sorted(by_file) != list(range(len(spec.plans))):
        raise RuntimeError(f"shard writer reported files {sorted(by_file)}, planned {len(spec.plans)}")
    out: dict[str, dict] = {}
    for name in SPLITS:
        files = [
            {k: by_file[i][k] for k in ("path", "rows", "tokens", "row_groups", "sha256")}
            for i, p in enumerate(spec.plans)
            if p.split == name
        ]
        out[name] = {
            "files": files,
            "rows": sum(f["rows"] for f in files),
            "tokens": sum(f["tokens"] for f in files),
        }
    return out
