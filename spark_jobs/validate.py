"""Row validation, quarantine and deduplication of raw events.

Each raw row gets the first failing reason of `QUARANTINE_REASONS` (in that order) or none:

    malformed_row         JSON line Spark could not parse
    missing_user          user id null or empty (ids are trimmed)
    missing_item          item id null or empty
    missing_timestamp     timestamp null or empty
    bad_timestamp         not a number (unix_s, unix_ms) or not an ISO-8601 time (iso)
    impossible_timestamp  outside [input.min_timestamp, input.max_timestamp)
    bad_rating            rating column configured, value present but not a finite number
    missing_action        action column configured, value null or empty
    unknown_action        action not in input.valid_actions (when that list is non-empty)

A null rating is allowed (it only fails `filters.min_rating`); a null context value maps to the
unknown id. Rows with a reason go to `<output>/quarantine/` with their original values as strings.
Exact duplicates (same user, item, parsed time, action, rating and context values) keep the first
occurrence in input order and are counted.
"""

from __future__ import annotations

from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F

from seqrec.config import InputConfig
from spark_jobs.adapters import CORRUPT, ROW, RawEvents, role_column

QUARANTINE_REASONS = (
    "malformed_row",
    "missing_user",
    "missing_item",
    "missing_timestamp",
    "bad_timestamp",
    "impossible_timestamp",
    "bad_rating",
    "missing_action",
    "unknown_action",
)
REASON = "reason"
"""Column with the quarantine or filter reason (null: the row is fine)."""


def _blank(col: Column) -> Column:
    return col.isNull() | (F.trim(col) == "")


def parse_events(raw: RawEvents, inp: InputConfig) -> DataFrame:
    """Raw columns plus parsed `ts` (long), `rating` (double) and `reason` (null for good rows)."""
    df = raw.df
    roles = raw.names
    r = {role: F.col(role_column(role)) for role in roles}
    if inp.timestamp_format == "order":
        seconds = F.col(ROW).cast("double")
    else:
        seconds = _parse_seconds(r["timestamp"], inp.timestamp_format)
    df = df.withColumn("_s", seconds)
    if "rating" in roles:
        df = df.withColumn("rating", F.expr(f"try_cast(trim({role_column('rating')}) as double)"))
    s = F.col("_s")
    in_range = (s >= F.lit(float(inp.min_timestamp))) & (s < F.lit(float(inp.max_timestamp)))
    checks: list[tuple[str, Column]] = []
    if CORRUPT in df.columns:
        checks.append(("malformed_row", F.col(CORRUPT).isNotNull()))
    checks += [("missing_user", _blank(r["user"])), ("missing_item", _blank(r["item"]))]
    if "timestamp" in roles:
        checks += [("missing_timestamp", _blank(r["timestamp"])), ("bad_timestamp", s.isNull() | F.isnan(s))]
    checks.append(("impossible_timestamp", ~in_range))
    if "rating" in roles:
        rating = F.col("rating")
        checks.append(("bad_rating", r["rating"].isNotNull() & (rating.isNull() | F.isnan(rating) | ~_finite(rating))))
    if "action" in roles:
        checks.append(("missing_action", _blank(r["action"])))
        if inp.valid_actions:
            checks.append(("unknown_action", ~F.trim(r["action"]).isin(*inp.valid_actions)))
    reason = F.lit(None).cast("string")
    for name, failed in reversed(checks):
        reason = F.when(failed, F.lit(name)).otherwise(reason)
    ts = F.when(in_range, F.floor(s).cast("long"))
    return df.withColumn(REASON, reason).withColumn("ts", ts).drop("_s")


def _finite(col: Column) -> Column:
    return (col < F.lit(float("inf"))) & (col > F.lit(float("-inf")))


def _parse_seconds(raw: Column, fmt: str) -> Column:
    text = F.trim(raw)
    parsers = {
        "unix_s": lambda: text.try_cast("double"),
        "unix_ms": lambda: text.try_cast("double") / 1000.0,
        "iso": lambda: F.unix_micros(F.try_to_timestamp(text)) / 1e6,
    }
    return parsers[fmt]()


def quarantine_table(parsed: DataFrame, raw: RawEvents) -> DataFrame:
    """Rejected rows: `input_row`, the original columns under their input names (strings), `reason`."""
    cols = [F.col(ROW).alias("input_row")]
    seen: set[str] = set()
    for role, name in raw.names.items():
        if name not in seen:
            seen.add(name)
            cols.append(F.col(role_column(role)).alias(name))
    if CORRUPT in parsed.columns:
        cols.append(F.col(CORRUPT).alias("raw_record"))
    return parsed.filter(F.col(REASON).isNotNull()).select(*cols, F.col(REASON))


def event_columns(raw: RawEvents) -> list[str]:
    """Names of the clean per-event categorical columns: action and `ctx_<name>` for each context."""
    cols = ["action"] if "action" in raw.names else []
    return cols + [f"ctx_{role.split(':', 1)[1]}" for role in raw.names if role.startswith("ctx:")]


def clean_events(parsed: DataFrame, raw: RawEvents) -> DataFrame:
    """Good rows with clean columns: _row, user, item, ts, [rating], [action], [ctx_*] (trimmed strings)."""
    cols = [F.col(ROW), F.trim(F.col(role_column("user"))).alias("user"), F.trim(F.col(role_column("item"))).alias("item"), F.col("ts")]
    if "rating" in raw.names:
        cols.append(F.col("rating"))
    for role in raw.names:
        if role == "action" or role.startswith("ctx:"):
            name = "action" if role == "action" else f"ctx_{role.split(':', 1)[1]}"
            cols.append(F.trim(F.col(role_column(role))).alias(name))
    return parsed.filter(F.col(REASON).isNull()).select(*cols)


def deduplicate(events: DataFrame, num_partitions: int) -> DataFrame:
    """Keep the first (lowest `_row`) of each group of exact duplicates.

    Repartitioning by user first lets the dedup aggregation and every later per-user step reuse one
    shuffle (a hash partitioning on `user` satisfies any grouping that contains `user`).
    """
    keys = [c for c in events.columns if c != ROW]
    by_user = events.repartition(num_partitions, "user")
    return by_user.groupBy(*keys).agg(F.min(ROW).alias(ROW))
