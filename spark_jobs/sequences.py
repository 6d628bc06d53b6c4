"""Per-user ordering, the train/valid/test split, truncation and sliding windows.

Each user's events are ordered by (timestamp, input position `_row`), so equal timestamps keep input
order. Positions `pos` are 1-based in that order; `n` is the user's event count.

leave_one_out: the last event is the test target, the second-to-last the validation target.
    test row  = events[1..n]        valid row = events[1..n-1]        train row = events[1..n-2]
    A user needs n >= 3 (else `too_short`); the train row is emitted when it has >= 2 events.

time (`valid_time` V <= `test_time` T, the global cut rule):
    train row = every event with ts < V (emitted when >= 2 events)
    valid row = the user's first event with V <= ts < T is the target; the history is every event
                before it (so ts < V); emitted when that history is non-empty
    test row  = the user's first event with ts >= T is the target; the history is every event before
                it (ts < T, validation-period events included); emitted when non-empty
    Events after the last one any row uses are `time_split_unused`; a user with no row is `too_short`.

The training part of the data (what `train_count` counts) is pos <= n-2 (leave_one_out) or ts < V
(time): validation and test targets never leak into it.

Rows hold the most recent `max_len + 1` events of their prefix, LEFT-padded with 0. With
`split.sliding_window`, a training prefix of m > max_len + 1 events gives windows ending at
m, m - s, m - 2s, ... (s = window_stride, default max_len) until one starts at the first event, so
every event of the prefix is a label exactly once when s = max_len.
"""

from __future__ import annotations

from pyspark.sql import Column, DataFrame, Window
from pyspark.sql import functions as F

from seqrec.config import FilterConfig, SplitConfig
from spark_jobs.adapters import ROW
from spark_jobs.validate import REASON

MIN_LOO_EVENTS = 3
"""A leave-one-out user needs a test target, a validation target and one history event."""
TRAIN = "_train"
"""Boolean event column: the event is in the training part (counted in `train_count`)."""


def assign_split(events: DataFrame, split: SplitConfig, filters: FilterConfig) -> DataFrame:
    """Add `pos`, `n`, `_cv`, `_ct` (events before the cuts), `_train` and the filter `reason`."""
    ordered = Window.partitionBy("user").orderBy("ts", ROW)
    per_user = Window.partitionBy("user")
    df = events.withColumn("pos", F.row_number().over(ordered)).withColumn("n", F.count(F.lit(1)).over(per_user))
    n, pos = F.col("n"), F.col("pos")
    if split.kind == "time":
        before = lambda t: F.sum(F.when(F.col("ts") < F.lit(t), 1).otherwise(0)).over(per_user)  # noqa: E731
        df = df.withColumn("_cv", before(split.valid_time)).withColumn("_ct", before(split.test_time))
        last_used = _time_last_used(F.col("_cv"), F.col("_ct"), n)
        in_train = F.col("ts") < F.lit(split.valid_time)
    else:
        df = df.withColumn("_cv", n - 2).withColumn("_ct", n - 1)
        last_used = F.when(n >= MIN_LOO_EVENTS, n).otherwise(0)
        in_train = pos <= n - 2
    reason = (
        F.when(n < filters.min_user_events, F.lit("min_user_events"))
        .when(last_used == 0, F.lit("too_short"))
        .when(pos > last_used, F.lit("time_split_unused"))
    )
    return df.withColumn(REASON, reason).withColumn(TRAIN, in_train & reason.isNull())


def _time_ends(cv: Column, ct: Column, n: Column) -> tuple[Column, Column, Column]:
    """Prefix lengths of the train, valid and test rows under the time split (0: no row)."""
    train_end = F.when(cv >= 2, cv).otherwise(0)
    valid_end = F.when((ct > cv) & (cv >= 1), cv + 1).otherwise(0)
    test_end = F.when((n > ct) & (ct >= 1), ct + 1).otherwise(0)
    return train_end, valid_end, test_end


def _time_last_used(cv: Column, ct: Column, n: Column) -> Column:
    return F.greatest(*_time_ends(cv, ct, n))


def _loo_ends(n: Column) -> tuple[Column, Column, Column]:
    return F.when(n >= 4, n - 2).otherwise(0), n - 1, n


def group_sequences(events: DataFrame, feature_cols: list[str]) -> DataFrame:
    """One row per user: `user`, `n`, `_cv`, `_ct`, `ev` = array of (pos, ts, item, features...) by pos."""
    fields = [F.col("pos"), F.col("ts"), F.col("item_id").alias("item"), *[F.col(c) for c in feature_cols]]
    return events.groupBy("user", "n", "_cv", "_ct").agg(F.array_sort(F.collect_list(F.struct(*fields))).alias("ev"))


def _pad(values: Column, width: int, zero: Column) -> Column:
    return F.concat(F.array_repeat(zero, F.lit(width) - F.size(values)), values)


def _windows(end: Column, width: int, stride: int) -> Column:
    """Array of (start, length) windows over a prefix of `end` events, oldest first."""
    rest = F.greatest(end - width, F.lit(0))
    count = F.lit(1) + F.floor((rest + (stride - 1)) / stride).cast("int")
    ks = F.sequence(count - 1, F.lit(0), F.lit(-1))
    return F.transform(
        ks,
        lambda k: F.struct(
            (F.greatest(end - k * stride - width, F.lit(0)) + 1).alias("start"),
            F.least(F.lit(width), end - k * stride).alias("len"),
        ),
    )


def split_rows(seqs: DataFrame, split: SplitConfig, feature_cols: list[str]) -> dict[str, DataFrame]:
    """{split: rows} with `user`, `_k` (window index), `length`, `item`, `ts`, features, [`target`]."""
    width = split.max_len + 1
    n, cv, ct = F.col("n"), F.col("_cv"), F.col("_ct")
    ends = _time_ends(cv, ct, n) if split.kind == "time" else _loo_ends(n)
    stride = split.window_stride or split.max_len
    out = {}
    for name, end in zip(("train", "valid", "test"), ends, strict=True):
        rows = seqs.withColumn("_end", end).filter(F.col("_end") >= 2)
        if name == "train" and split.sliding_window:
            rows = rows.select("*", F.posexplode(_windows(F.col("_end"), width, stride)).alias("_k", "_w"))
        else:
            last = F.struct((F.greatest(F.col("_end") - width, F.lit(0)) + 1).alias("start"), F.least(F.lit(width), F.col("_end")).alias("len"))
            rows = rows.select("*", F.lit(0).alias("_k"), last.alias("_w"))
        out[name] = _layout(rows, width, feature_cols, with_target=name != "train")
    return out


def _field(name: str):  # noqa: ANN202 - a one-argument lambda (Spark inspects its arity)
    return lambda e: e[name]


def _layout(rows: DataFrame, width: int, feature_cols: list[str], with_target: bool) -> DataFrame:
    window = F.slice(F.col("ev"), F.col("_w.start"), F.col("_w.len"))
    zero_int, zero_long = F.lit(0), F.lit(0).cast("long")
    cols = [
        F.col("user"),
        F.col("_k"),
        F.size(window).cast("int").alias("length"),
        _pad(F.transform(window, lambda e: e["item"]), width, zero_int).alias("item"),
        _pad(F.transform(window, lambda e: e["ts"]), width, zero_long).alias("ts"),
    ]
    cols += [_pad(F.transform(window, _field(c)), width, zero_int).alias(c) for c in feature_cols]
    if with_target:
        cols.append(F.element_at(window, -1)["item"].alias("target"))
    return rows.select(*cols)
