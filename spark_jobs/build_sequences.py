"""The sequence builder: raw events -> validated, filtered, per-user sequences -> Parquet shards.

Two ways to run the same code:

    seqrec prepare --config configs/movielens-100k.toml            # embedded local Spark
    spark-submit spark_jobs/build_sequences.py --config X.toml [--set k=v ...]   # any master

Stages (one log line each):
    read           the input, in input order (spark_jobs/adapters.py)
    validate       reasons per row; the quarantine table (spark_jobs/validate.py)
    filter         row filters; with count filters on, exact duplicates + min_item_events / k-core
    order + split  events partitioned by user, sorted, cached; the per-user pass counts duplicates,
                   filtered users and events, rows per split and the kept values (spark_jobs/tasks.py)
    vocabularies   ids, the item feature table (spark_jobs/vocab.py)
    plan, shards   files and exact row groups; the writing pass (spark_jobs/write.py)
    manifest       written last
The output is built in a hidden temporary folder next to `prepare.output` and renamed into place
only when complete (storage.OutputDir). Counts add up exactly: events_in = kept + quarantined +
duplicates + filtered (checked before anything is written past the quarantine table).
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":  # run as a script (spark-submit): import the package, not sibling files
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse
import glob
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pyspark.sql import DataFrame, Observation, SparkSession
from pyspark.sql import functions as F

from seqrec.config import ConfigError, PrepareConfig, load_config
from seqrec.data import schema
from spark_jobs import report, storage
from spark_jobs.adapters import InputDataError, RawEvents, read_events, read_item_table
from spark_jobs.filters import k_core, maybe_broadcast, min_item_events, rowwise_reason
from spark_jobs.report import ROW_FILTERS, Counts, features_section, nonzero
from spark_jobs.rows import SPLITS as SPLIT_NAMES
from spark_jobs.rows import USER_REASONS, RowParams
from spark_jobs.session import configure, get_spark
from spark_jobs.shard_writer import WriteSpec
from spark_jobs.tasks import Columns
from spark_jobs.validate import (
    REASON,
    clean_events,
    deduplicate,
    event_columns,
    parse_events,
    quarantine_table,
)
from spark_jobs.vocab import Vocab, item_features, make_vocab, write_item_features, write_vocab
from spark_jobs.write import assign_buckets, bucket, collect_stats, plan_files, sort_by_user, write_splits

log = logging.getLogger("spark_jobs.prepare")

__all__ = ["InputDataError", "run_prepare", "main"]


class _Cache:
    """DataFrames this run persisted, released at the end (a caller's own cached data is left alone)."""

    def __init__(self) -> None:
        self.frames: list[DataFrame] = []

    def __call__(self, df: DataFrame) -> DataFrame:
        self.frames.append(df.persist())
        return df

    def release(self) -> None:
        for df in self.frames:
            df.unpersist()
        self.frames.clear()


class _Stages:
    """Logs one line per stage with its duration."""

    def __init__(self, total: int) -> None:
        self.total, self.index, self.t = total, 0, time.perf_counter()

    def done(self, name: str, detail: str) -> None:
        self.index += 1
        now = time.perf_counter()
        log.info("prepare [%d/%d] %-18s %s (%.1f s)", self.index, self.total, name, detail, now - self.t)
        self.t = now


def before_commit(tmp: str) -> None:
    """Called after the manifest is written, before the rename (tests inject failures here)."""


@dataclass(slots=True)
class _Run:
    """State of one run, passed to each stage."""

    spark: SparkSession
    cfg: PrepareConfig
    tmp: str
    counts: Counts = field(default_factory=Counts)
    stages: _Stages = field(default_factory=lambda: _Stages(total=8))
    cache: _Cache = field(default_factory=_Cache)


# --------------------------------------------------------------------------------------------------
# Stages
# --------------------------------------------------------------------------------------------------


def _validate(run: _Run) -> tuple[DataFrame, RawEvents, dict[int, int]]:
    """Validate: one job counts rows per (reason, user bucket); the quarantine table is written by a
    second job only when there is something to quarantine. Returns good events per user bucket."""
    cfg, counts, st = run.cfg, run.counts, run.stages
    raw = read_events(run.spark, cfg.input)
    st.done("read", f"{raw.path} ({cfg.input.format})")
    parsed = parse_events(raw, cfg.input)
    rows = parsed.groupBy(REASON, bucket(F.col("user")).alias("b")).count().collect()
    counts.events_in = sum(r["count"] for r in rows)
    for r in rows:
        if r[REASON] is not None:
            counts.quarantine[r[REASON]] += r["count"]
    if not any(r[REASON] is None for r in rows):
        # Nothing to build shards from; stopping here also keeps Spark from waiting forever on the
        # row-filter observation of an empty plan.
        raise InputDataError(
            f"{raw.path}: no valid events ({counts.events_in:,} rows read; quarantined: "
            f"{nonzero(counts.quarantine) or 'none'}); nothing to prepare"
        )
    table = quarantine_table(parsed, raw)
    if not sum(counts.quarantine.values()):
        table = run.spark.createDataFrame([], table.schema)  # an empty table with the same columns
    table.write.mode("overwrite").parquet(schema.join(run.tmp, schema.QUARANTINE_DIR))
    st.done("validate", f"{counts.events_in:,} events; quarantined: {nonzero(counts.quarantine)}")
    return parsed, raw, {r["b"]: r["count"] for r in rows if r[REASON] is None}


def _filter(run: _Run, parsed: DataFrame, raw: RawEvents) -> tuple[DataFrame, Observation]:
    """Row filters (their counts are observed by the first job that reads the result), then, only
    when count filters are on, exact duplicates and min_item_events / k-core in Spark (cached)."""
    f, c = run.cfg.filters, run.counts
    flagged = rowwise_reason(clean_events(parsed, raw), f)
    seen = Observation("row filters")
    metrics = [F.sum(F.when(F.col(REASON) == r, 1).otherwise(0)).alias(r) for r in ROW_FILTERS]
    events = flagged.observe(seen, *metrics).filter(F.col(REASON).isNull()).drop(REASON)
    if f.min_item_events > 1 or f.k_core > 0:
        # Item counts must not count duplicates: deduplicate here (the per-user pass then finds none).
        events = run.cache(deduplicate(events, run.cfg.shuffle_partitions))
        n = events.count()
        c.filtered.update({r: seen.get[r] for r in ROW_FILTERS})
        c.duplicates = c.events_in - sum(c.quarantine.values()) - sum(c.filtered.values()) - n
        if f.min_item_events > 1:
            events = run.cache(min_item_events(events, f.min_item_events))
            m = events.count()
            c.filtered["min_item_events"], n = n - m, m
        if f.k_core > 0:
            events, m, _ = k_core(events, f.k_core, n, run.cache)
            c.filtered["k_core"], n = n - m, m
    run.stages.done(
        "filter", f"min_item_events {c.filtered['min_item_events']:,}, k_core {c.filtered['k_core']:,}"
    )
    return events, seen


def _per_user(
    run: _Run, events: DataFrame, seen: Observation, columns: Columns, bucket_events: dict[int, int]
) -> tuple[DataFrame, dict, dict, int]:
    """Sort by user into `files_per_split` balanced partitions (cached); run the stats pass over them."""
    cfg, c = run.cfg, run.counts
    by_user = run.cache(sort_by_user(events, assign_buckets(bucket_events, cfg.shards.files_per_split)))
    per_partition, values = collect_stats(by_user, columns, row_params(cfg))  # builds the cache
    if not (cfg.filters.min_item_events > 1 or cfg.filters.k_core > 0):
        c.filtered.update({r: seen.get[r] for r in ROW_FILTERS})
    total = {
        k: sum(p.get(k, 0) for p in per_partition.values())
        for k in ("events", "duplicates", "kept", "users", *USER_REASONS)
    }
    c.duplicates += total["duplicates"]
    c.kept = total["kept"]
    c.filtered.update({r: total[r] for r in USER_REASONS})
    run.stages.done(
        "order + split",
        f"{c.kept:,} events kept; {c.duplicates:,} duplicates; filtered: {nonzero(c.filtered)}",
    )
    return by_user, per_partition, values, total["users"]


def _lookup(spark: SparkSession, vocab: Vocab) -> DataFrame:
    frame = spark.createDataFrame(vocab.lookup_frame(), "value string, id int")
    return maybe_broadcast(frame, len(vocab.values))


def _vocabularies(run: _Run, values: dict[str, dict]) -> tuple[dict[str, Vocab], dict[str, dict]]:
    """Vocabularies from the kept values' counts, the item feature table; all written to the output."""
    cfg, inp = run.cfg, run.cfg.input
    vocabs = {
        f: make_vocab(f, {v: c for v, (c, _) in counts.items()}, cfg.vocab_min_count, cfg.reuse_vocab)
        for f, counts in values.items()
    }
    train = {v: t for v, (_, t) in values["item"].items()}
    items_df = read_item_table(run.spark, inp)
    rows = None
    if items_df is not None:
        known = _lookup(run.spark, vocabs["item"]).select(F.col("value").alias("item"))
        rows = items_df.join(known, "item", "left_semi").toPandas()
    side = item_features(
        vocabs["item"],
        train,
        rows,
        inp.item_single_features,
        inp.item_multi_features,
        inp.max_values_per_item,
        cfg.vocab_min_count,
        cfg.reuse_vocab,
    )
    write_item_features(side.table, run.tmp)
    for vocab in [*vocabs.values(), *side.vocabs.values()]:
        write_vocab(vocab, run.tmp)
    section = features_section(vocabs, side)
    run.stages.done("vocabularies", ", ".join(f"{n} {f['num_embeddings']:,}" for n, f in section.items()))
    return vocabs, section


# --------------------------------------------------------------------------------------------------
# The job
# --------------------------------------------------------------------------------------------------


def _event_features(raw: RawEvents) -> dict[str, str]:
    """Feature name -> clean column: item, action, each context column (`ctx_<name>`)."""
    return {"item": "item", **{c.removeprefix("ctx_"): c for c in event_columns(raw)}}


def _build(run: _Run, t0: float) -> dict[str, Any]:
    cfg = run.cfg
    parsed, raw, bucket_events = _validate(run)
    features = _event_features(raw)
    columns = Columns(features=features, numeric_keys=["rating"] if "rating" in raw.names else [])
    by_user, per_partition, values, num_users = _per_user(
        run, *_filter(run, parsed, raw), columns, bucket_events
    )
    run.counts.check()
    vocabs, section = _vocabularies(run, values)
    rows = {p: {s: stats[f"rows_{s}"] for s in SPLIT_NAMES} for p, stats in per_partition.items()}
    plans, files = plan_files(rows, cfg.shards)
    num_items = len(values["item"])
    run.stages.done(
        "plan",
        f"{num_users:,} users; rows "
        + ", ".join(f"{s} {sum(r[s] for r in rows.values()):,}" for s in SPLIT_NAMES),
    )
    spec = WriteSpec(root=run.tmp, params=row_params(cfg), columns=columns, plans=plans, files=files)
    splits = write_splits(by_user, spec)
    run.cache.release()
    run.stages.done(
        "shards",
        "; ".join(
            f"{n} {len(s['files'])} files, {sum(f['row_groups'] for f in s['files'])} row groups"
            for n, s in splits.items()
        ),
    )
    manifest = report.manifest(
        cfg, run.counts, raw.path, section, splits, num_users, num_items, run.spark.version, t0
    )
    storage.write_bytes(
        schema.join(run.tmp, schema.MANIFEST_FILE), (json.dumps(manifest, indent=2) + "\n").encode()
    )
    run.stages.done("manifest", "written")
    return manifest


def row_params(cfg: PrepareConfig) -> RowParams:
    sp = cfg.split
    return RowParams(
        kind=sp.kind,
        max_len=sp.max_len,
        sliding_window=sp.sliding_window,
        stride=sp.window_stride or sp.max_len,
        min_user_events=cfg.filters.min_user_events,
        valid_time=sp.valid_time or 0,
        test_time=sp.test_time or 0,
    )


def preflight(cfg: PrepareConfig) -> None:
    """Fail fast, before starting Spark, when a local input path does not exist."""
    for key, path in (
        ("prepare.input.path", cfg.input.path),
        ("prepare.input.item_features_path", cfg.input.item_features_path),
    ):
        if path and "://" not in path and not glob.glob(path):
            raise InputDataError(f"{key} path {path} does not exist")


def run_prepare(cfg: PrepareConfig, spark: SparkSession | None = None) -> dict[str, Any]:
    """Build the shard folder `cfg.output` and return the manifest (also printed as a table).

    With `spark=None` an embedded session is started from `cfg.spark_master` and stopped at the end.
    Raises InputDataError (a ValueError) for unusable input: missing path or column.
    """
    t0 = time.time()
    preflight(cfg)
    own = spark is None
    if spark is None:
        spark = get_spark(cfg.spark_master, cfg.spark_driver_memory, cfg.shuffle_partitions, "seqrec-prepare")
    configure(spark, cfg.shuffle_partitions)
    out = storage.OutputDir(spark, cfg.output)
    run = _Run(spark, cfg, out.tmp)
    try:
        manifest = _build(run, t0)
        before_commit(out.tmp)
        out.commit()
    except BaseException:
        out.discard()
        raise
    finally:
        run.cache.release()
        if own:
            spark.stop()
    print(report.format_summary(manifest, out.output))
    return {**manifest, "output": out.output}


# --------------------------------------------------------------------------------------------------
# spark-submit entry point
# --------------------------------------------------------------------------------------------------


def ship_code(spark: SparkSession) -> None:
    """On a cluster master, send the seqrec and spark_jobs packages to the executors (mapInArrow)."""
    import shutil
    import tempfile

    import seqrec
    import spark_jobs

    master = spark.sparkContext.master
    if master.startswith("local"):
        return
    folder = Path(tempfile.mkdtemp(prefix="seqrec-code-"))
    for pkg in (seqrec, spark_jobs):
        src = Path(pkg.__file__).parent
        shutil.copytree(src, folder / "code" / src.name, ignore=shutil.ignore_patterns("__pycache__"))
    archive = shutil.make_archive(str(folder / "seqrec-code"), "zip", folder / "code")
    spark.sparkContext.addPyFile(archive)
    log.info("shipped %s to the executors of %s", archive, master)


def main(argv: list[str] | None = None, session_factory: Callable[[], SparkSession] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="build_sequences.py", description="Build sequence shards (spark-submit entry point)."
    )
    parser.add_argument("--config", "-c", help="TOML run config (its [prepare] section is used)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
        force=True,
    )
    try:
        cfg = load_config(args.config, args.overrides)
        preflight(cfg.prepare)
        builder = SparkSession.builder.appName("seqrec-prepare").config("spark.log.level", "WARN")
        spark = (session_factory or builder.getOrCreate)()
        spark.sparkContext.setLogLevel("ERROR")
        ship_code(spark)
        try:
            run_prepare(cfg.prepare, spark)
        finally:
            if session_factory is None:
                spark.stop()
    except (ConfigError, InputDataError) as e:
        print(f"build_sequences: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
