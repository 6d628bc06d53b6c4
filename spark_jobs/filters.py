"""Event filters (`prepare.filters`) that run in Spark, in this order, after validation:

    min_rating        rating < filters.min_rating, or no rating          (row-wise)
    actions           action not in filters.actions                      (row-wise)
    time_window       ts outside [filters.start_time, filters.end_time)  (row-wise)
    (exact duplicates are removed here, after the row filters)
    min_item_events   items with fewer events than filters.min_item_events (one pass)
    k_core            iterative k-core: repeat until every user and item has >= k events

A row-wise filter takes the first failing reason in the order above. `min_user_events` and the
split's own requirements are per-user rules applied later (spark_jobs/rows.py). Every removed
event is counted under its reason; nothing is dropped silently.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from pyspark.sql import Column, DataFrame, Window
from pyspark.sql import functions as F

from seqrec.config import FilterConfig
from spark_jobs.validate import REASON

log = logging.getLogger(__name__)

BROADCAST_MAX_ROWS = 2_000_000
"""Lookup tables up to this many rows are broadcast (keeps the per-user partitioning, no shuffle)."""


def rowwise_reason(df: DataFrame, cfg: FilterConfig) -> DataFrame:
    """Add `reason` with the first failing row-wise filter (null: kept)."""
    checks: list[tuple[str, Column]] = []
    if cfg.min_rating is not None:
        rating = F.col("rating")
        checks.append(("min_rating", rating.isNull() | (rating < F.lit(float(cfg.min_rating)))))
    if cfg.actions:
        checks.append(("actions", ~F.col("action").isin(*cfg.actions)))
    outside = F.lit(False)
    if cfg.start_time is not None:
        outside = outside | (F.col("ts") < F.lit(cfg.start_time))
    if cfg.end_time is not None:
        outside = outside | (F.col("ts") >= F.lit(cfg.end_time))
    if cfg.start_time is not None or cfg.end_time is not None:
        checks.append(("time_window", outside))
    reason = F.lit(None).cast("string")
    for name, failed in reversed(checks):
        reason = F.when(failed, F.lit(name)).otherwise(reason)
    return df.withColumn(REASON, reason)


def maybe_broadcast(df: DataFrame, rows: int) -> DataFrame:
    return F.broadcast(df) if rows <= BROADCAST_MAX_ROWS else df


def _frequent_items(events: DataFrame, min_count: int) -> DataFrame:
    items = events.groupBy("item").count().filter(F.col("count") >= min_count).select("item")
    return maybe_broadcast(items, items.count())


def _frequent_users(events: DataFrame, min_count: int) -> DataFrame:
    # A window on user, not a join: the events are already partitioned by user.
    n = F.count(F.lit(1)).over(Window.partitionBy("user"))
    return events.withColumn("_n", n).filter(F.col("_n") >= min_count).drop("_n")


def min_item_events(events: DataFrame, min_count: int) -> DataFrame:
    """Events of items with at least `min_count` events."""
    return events.join(_frequent_items(events, min_count), "item", "left_semi")


def k_core(
    events: DataFrame, k: int, num_events: int, persist: Callable[[DataFrame], DataFrame]
) -> tuple[DataFrame, int, int]:
    """Iterative k-core: (events left, their count, rounds). Each round's result is persisted."""
    current, n, rounds = events, num_events, 0
    while True:
        rounds += 1
        nxt = persist(_frequent_users(min_item_events(current, k), k))
        m = nxt.count()
        log.info("k-core round %d: %d -> %d events", rounds, n, m)
        current, done, n = nxt, m == n, m
        if done or m == 0:
            return current, n, rounds
