"""Row validation, quarantine and deduplication of raw events.

Each raw row gets the first failing reason of `QUARANTINE_REASONS` (in that order) or none:

    malformed_row         JSON line Spark could not parse
    empty_sequence        `user-sequences` line without items (a user alone, or a blank line)
    missing_user          user id null or empty (ids are trimmed)
    missing_item          item id null or empty
    missing_timestamp     timestamp null or empty
    bad_timestamp         not a number (unix_s, unix_ms) or not an ISO-8601 time (iso)
    impossible_timestamp  outside [input.min_timestamp, input.max_timestamp)
    bad_rating            rating column configured, value present but not a finite number
    missing_action        action column configured, value null or empty
    unknown_action        action not in input.valid_actions (when that list is non-empty)

A null rating is allowed (it only fails `filters.min_rating`); a null context value maps to the
unknown id. Rows with a reason go to `<output>/quarantine/` with their original values as strings
and their input position `input_row`.

Exact duplicates (same user, item, parsed time, action, rating and context values) keep the first
occurrence in input order and are counted; they are found per user (spark_jobs/rows.py), or here
(`deduplicate`) when item-count filters need duplicate-free counts first.
"""

from __future__ import annotations

from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F
from pyspark.sql.types import DataType, DateType, IntegralType, NumericType, StringType, TimestampType

from seqrec.config import InputConfig
from spark_jobs.adapters import CORRUPT, EMPTY, ROW, RawEvents, role_column

QUARANTINE_REASONS = (
    "malformed_row",
    "empty_sequence",
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


def _clean_name(role: str) -> str:
    """Clean column of a role: user, item, action, rating, ctx_<name>."""
    return "ctx_" + role.split(":", 1)[1] if role.startswith("ctx:") else role


def _as_text(col: Column, dtype: DataType, keep_ints: bool) -> Column:
    """A categorical value: strings are trimmed, other types cast to strings, except integer user
    and item ids, which stay integers (cheaper to shuffle and sort; they become strings where values
    are stored: vocabularies and the `user` column)."""
    if isinstance(dtype, StringType):
        return F.trim(col)
    return col.cast("long") if keep_ints and isinstance(dtype, IntegralType) else col.cast("string")


def _as_number(col: Column, dtype: DataType) -> Column:
    """A numeric value as a double, null when unparsable (typed columns skip the string round trip)."""
    if isinstance(dtype, NumericType):
        return col.cast("double")
    return F.trim(col.cast("string")).try_cast("double")


def _seconds(col: Column, dtype: DataType, fmt: str) -> Column:
    if isinstance(dtype, TimestampType | DateType):
        return F.unix_micros(col.cast("timestamp")) / 1e6
    parsers = {
        "unix_s": lambda: _as_number(col, dtype),
        "unix_ms": lambda: _as_number(col, dtype) / 1000.0,
        "iso": lambda: F.unix_micros(F.try_to_timestamp(F.trim(col.cast("string")))) / 1e6,
    }
    return parsers[fmt]()


def _blank(value: Column, dtype: DataType) -> Column:
    """Missing: null, or (strings, after trimming) empty."""
    return value.isNull() | (value == "") if isinstance(dtype, StringType) else value.isNull()


def _finite(col: Column) -> Column:
    return (col < F.lit(float("inf"))) & (col > F.lit(float("-inf")))


def parse_events(raw: RawEvents, inp: InputConfig) -> DataFrame:
    """Raw columns plus the clean ones (`user`, `item`, `ts` long, [`rating` double], [`action`],
    [`ctx_*`]) and `reason` (null for good rows). Not cached: each query reads what it needs."""
    types = {f.name: f.dataType for f in raw.df.schema.fields}
    roles = raw.names
    clean = [F.col("*")]
    for role in roles:
        if role in ("timestamp", "rating"):
            continue
        text = _as_text(
            F.col(role_column(role)), types[role_column(role)], keep_ints=role in ("user", "item")
        )
        clean.append(text.alias(_clean_name(role)))
    if inp.timestamp_format == "order":
        clean.append(F.col(ROW).cast("double").alias("_s"))
    else:
        clean.append(
            _seconds(
                F.col(role_column("timestamp")), types[role_column("timestamp")], inp.timestamp_format
            ).alias("_s")
        )
    if "rating" in roles:
        clean.append(_as_number(F.col(role_column("rating")), types[role_column("rating")]).alias("rating"))
    # A second projection: the checks below reuse these values instead of recomputing them.
    df = raw.df.select(*clean)
    s = F.col("_s")
    in_range = (s >= F.lit(float(inp.min_timestamp))) & (s < F.lit(float(inp.max_timestamp)))
    checks: list[tuple[str, Column]] = []
    if CORRUPT in df.columns:
        checks.append(("malformed_row", F.col(CORRUPT).isNotNull()))
    if EMPTY in df.columns:
        checks.append(("empty_sequence", F.col(EMPTY)))
    checks += [
        ("missing_user", _blank(F.col("user"), types[role_column("user")])),
        ("missing_item", _blank(F.col("item"), types[role_column("item")])),
    ]
    if "timestamp" in roles:
        raw_ts = F.col(role_column("timestamp"))
        ts_type = types[role_column("timestamp")]
        missing = _blank(F.trim(raw_ts) if isinstance(ts_type, StringType) else raw_ts, ts_type)
        checks += [("missing_timestamp", missing), ("bad_timestamp", s.isNull() | F.isnan(s))]
    checks.append(("impossible_timestamp", ~in_range))
    if "rating" in roles:
        rating = F.col("rating")
        bad = F.col(role_column("rating")).isNotNull() & (
            rating.isNull() | F.isnan(rating) | ~_finite(rating)
        )
        checks.append(("bad_rating", bad))
    if "action" in roles:
        checks.append(("missing_action", _blank(F.col("action"), types[role_column("action")])))
        if inp.valid_actions:
            checks.append(("unknown_action", ~F.col("action").isin(*inp.valid_actions)))
    reason = F.lit(None).cast("string")
    for name, failed in reversed(checks):
        reason = F.when(failed, F.lit(name)).otherwise(reason)
    ts = F.when(in_range, F.floor(s).cast("long"))
    return df.withColumn(REASON, reason).withColumn("ts", ts).drop("_s")


def reason_metrics() -> list[Column]:
    """Observation metrics over parsed rows: total and one count per quarantine reason."""
    metrics = [F.count(F.lit(1)).alias("events_in")]
    return metrics + [F.sum(F.when(F.col(REASON) == r, 1).otherwise(0)).alias(r) for r in QUARANTINE_REASONS]


def quarantine_table(parsed: DataFrame, raw: RawEvents) -> DataFrame:
    """Rejected rows: `input_row`, the original columns under their input names (strings), `reason`."""
    cols = [F.col(ROW).alias("input_row")]
    seen: set[str] = set()
    for role, name in raw.names.items():
        if name not in seen:
            seen.add(name)
            cols.append(F.col(role_column(role)).cast("string").alias(name))
    if CORRUPT in parsed.columns:
        cols.append(F.col(CORRUPT).alias("raw_record"))
    return parsed.filter(F.col(REASON).isNotNull()).select(*cols, F.col(REASON))


def event_columns(raw: RawEvents) -> list[str]:
    """Names of the clean per-event categorical columns: action and `ctx_<name>` for each context."""
    return [_clean_name(role) for role in raw.names if role == "action" or role.startswith("ctx:")]


def clean_events(parsed: DataFrame, raw: RawEvents) -> DataFrame:
    """Good rows with clean columns: _row, user, item, ts, [rating], [action], [ctx_*]."""
    cols = [ROW, "user", "item", "ts", *(["rating"] if "rating" in raw.names else []), *event_columns(raw)]
    return parsed.filter(F.col(REASON).isNull()).select(*cols)


def deduplicate(events: DataFrame, num_partitions: int) -> DataFrame:
    """Keep the first (lowest `_row`) of each group of exact duplicates.

    Repartitioning by user first lets the dedup aggregation and every later per-user step reuse one
    shuffle (a hash partitioning on `user` satisfies any grouping that contains `user`).
    """
    keys = [c for c in events.columns if c != ROW]
    by_user = events.repartition(num_partitions, "user")
    return by_user.groupBy(*keys).agg(F.min(ROW).alias(ROW))
