"""Reading raw event logs and item tables into Spark, one adapter per input format.

`read_events` returns the configured columns in their own types (validation parses them; the
quarantine table shows them as strings) plus `_row`, the event's position in the input: files in
path-name order, rows in file order, dense from 0. `_row` is the stable tie-break for events with
equal timestamps and the time of the `sequence-lines` and `user-sequences` formats.

Formats (`prepare.input.format`):

    parquet, csv, json       generic tables; `input.columns` names the columns
    movielens-100k           `u.data`: tab separated, no header: user item rating unix_ts
    movielens-latest-small   `ratings.csv`: header userId,movieId,rating,timestamp
    movielens-1m             `ratings.dat`: UserID::MovieID::Rating::Timestamp
    sequence-lines           `user item` per line, each user's lines already in time order
                             (the line order is the time: `input.timestamp_format = "order"`)
    user-sequences           `user item1 item2 ...` per line, items in time order: the S3Rec /
                             CL4SRec / DuoRec / BSARec benchmark files. Fields are separated by any
                             run of blanks (spaces, tabs; CRLF line ends are fine; no quoting).
                             Each item is one event; `_row` runs over lines in file order, then
                             items in line order, so the position is the time (`timestamp_format =
                             "order"`). A user may have several lines (appended in line order). A
                             line with no items (a user alone, or a blank line) is one event,
                             quarantined as `empty_sequence`, so it is counted in events_in. A
                             folder path reads every file in it, in name order (no standard file).
    recbole                  RecBole atomic `.inter` file: tab separated, quoted like CSV (`""`
                             inside quotes is one quote), first line a typed header `name:type`
                             (type token, token_seq, float or float_seq). Columns are the names
                             without the type; the `timestamp` field is exposed as `ts` (unless the
                             file has a `ts` field), so a standard file (`user_id:token
                             item_id:token rating:float timestamp:float`, float unix seconds) needs
                             no column mapping beyond `columns.action = ""`. Values stay strings
                             (validation parses them; `*_seq` fields keep their space-separated
                             text). Blank lines are skipped (as in CSV), fields past the header's
                             are dropped, missing trailing fields are null. The path may be a folder
                             holding exactly one `*.inter` file, or a glob of files with the same
                             columns. A header field that is empty, untyped, of an unknown type or
                             repeated stops the job naming it and the file.

The adapters expose fixed column names, which the default `input.columns` already match:
`user_id`, `item_id`, `ts`, and `rating` for the MovieLens and RecBole files (set
`columns.rating = "rating"` to use it, `columns.action = ""`: these files have no action column). A
path may be the adapter's folder (`.../movielens-100k`): its standard file (`u.data`, ...) is used.

Item tables (`input.item_features_format`) give `item_id` plus feature columns; the MovieLens
adapters give `genres` (array of strings) from `u.item` (19 genre flags named by `u.genre`),
`movies.csv` (pipe-separated, quoted titles with commas) or `movies.dat` (`::` separated).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import reduce

from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.types import ArrayType, StringType, StructField, StructType

from seqrec.config import InputConfig

log = logging.getLogger(__name__)

ROW = "_row"
"""Input position of an event (files in name order, then rows in file order), dense from 0."""
CORRUPT = "_corrupt_record"
"""Spark's column for JSON lines it could not parse."""
EMPTY = "_empty_sequence"
"""True on the one event of a `user-sequences` line without items (validation quarantines it)."""

_EVENT_FILES = {
    "movielens-100k": "u.data",
    "movielens-latest-small": "ratings.csv",
    "movielens-1m": "ratings.dat",
    "sequence-lines": "sequences.txt",
    "recbole": "*.inter",  # a pattern: the folder must hold exactly one match
}
_NO_TIME_COLUMN = ("sequence-lines", "user-sequences")
RECBOLE_TYPES = ("token", "token_seq", "float", "float_seq")
"""Feature types of a RecBole atomic file header (`name:type`)."""
_ITEM_FILES = {
    "movielens-100k": "u.item",
    "movielens-latest-small": "movies.csv",
    "movielens-1m": "movies.dat",
}
_ML100K_GENRE_FLAGS = 19  # u.item: id|title|release|video release|url|19 genre flags
_ML_COLUMNS = ["user_id", "item_id", "rating", "ts"]
MAX_UNION_FILES = 256
"""Inputs with more files take the slower per-row file-name path to their input order."""


class InputDataError(ValueError):
    """Unusable input (missing path, missing column): the job stops; the message names the culprit."""


@dataclass(frozen=True, slots=True)
class RawEvents:
    """Raw events: `df` has `_row` and one string column per role (user, item, timestamp, ...).

    `names` maps each role present to the input column name it came from (for the quarantine table).
    """

    df: DataFrame
    names: dict[str, str]
    path: str


# --------------------------------------------------------------------------------------------------
# Paths (through Hadoop's FileSystem, so s3a://, gs://, hdfs:// work wherever Spark has the connector)
# --------------------------------------------------------------------------------------------------


def _hadoop_path(spark: SparkSession, path: str):  # noqa: ANN202 - py4j objects are untyped
    jvm = spark.sparkContext._jvm
    p = jvm.org.apache.hadoop.fs.Path(path)
    return p, p.getFileSystem(spark.sparkContext._jsc.hadoopConfiguration())


def path_exists(spark: SparkSession, path: str) -> bool:
    """True when `path` (a file, folder or glob) matches anything."""
    p, fs = _hadoop_path(spark, path)
    statuses = fs.globStatus(p)
    return statuses is not None and len(statuses) > 0


def is_dir(spark: SparkSession, path: str) -> bool:
    p, fs = _hadoop_path(spark, path)
    return bool(fs.exists(p) and fs.getFileStatus(p).isDirectory())


def resolve_input(spark: SparkSession, path: str, standard_file: str | None, what: str) -> str:
    """The path to read: `path` itself, or its adapter's standard file when `path` is a folder."""
    if not path:
        raise InputDataError(f"{what} path is empty")
    if not path_exists(spark, path):
        raise InputDataError(f"{what} path {path} does not exist")
    if standard_file and is_dir(spark, path):
        inner = path.rstrip("/") + "/" + standard_file
        p, fs = _hadoop_path(spark, inner)
        names = sorted(s.getPath().getName() for s in (fs.globStatus(p) or []))
        if not names:
            raise InputDataError(f"{what} folder {path} has no {standard_file}")
        if len(names) > 1:
            raise InputDataError(
                f"{what} folder {path} has {len(names)} {standard_file} files ({', '.join(names)}); "
                "set the path to one of them"
            )
        return path.rstrip("/") + "/" + names[0]
    return path


# --------------------------------------------------------------------------------------------------
# Event readers: format -> DataFrame of named columns
# --------------------------------------------------------------------------------------------------


def _split_text(spark: SparkSession, path: str, pattern: str, names: list[str]) -> DataFrame:
    parts = F.split(F.trim(F.col("value")), pattern)  # trim: no empty field before leading blanks
    # F.get: null past the end of a short line (validation quarantines it); `[i]` fails the job (ANSI)
    return spark.read.text(path).select(*[F.get(parts, i).alias(n) for i, n in enumerate(names)])


def _user_sequences(spark: SparkSession, path: str) -> DataFrame:
    """`user item1 item2 ...` lines -> one row per item, in line order; a line without items gives
    one row with a null item and `EMPTY` set. `_metadata` (the scan's file columns) is kept as a
    plain column so that `with_row_index` still finds the file of each exploded row."""
    tokens = F.filter(F.split(F.col("value"), r"\s+"), lambda t: t != "")  # any blanks, either end
    lines = spark.read.text(path).select(tokens.alias("t"), F.col("_metadata"))
    items = F.slice("t", 2, F.greatest(F.size("t") - 1, F.lit(0)))
    return lines.select(
        F.get("t", 0).alias("user_id"),  # null on a blank line (`[0]` would fail the job: ANSI)
        F.explode_outer(items).alias("item_id"),  # explode keeps the line's order, in its partition
        (F.size("t") <= 1).alias(EMPTY),
        "_metadata",
    )


def _first_line(spark: SparkSession, path: str) -> str:
    """The first line of a file, through Hadoop's FileSystem (any scheme Spark reads)."""
    p, fs = _hadoop_path(spark, path)
    jvm = spark.sparkContext._jvm
    stream = fs.open(p)
    try:
        line = jvm.java.io.BufferedReader(jvm.java.io.InputStreamReader(stream, "UTF-8")).readLine()
    finally:
        stream.close()
    return (line or "").rstrip("\r").removeprefix("\ufeff")  # a UTF-8 byte order mark is no name


def recbole_columns(header: str, path: str) -> list[str]:
    """Column names of a RecBole header (`user_id:token\titem_id:token ...`), types stripped; the
    `timestamp` field becomes `ts`. Raises InputDataError naming the field and the file."""
    if not header.strip():
        raise InputDataError(
            f"{path}: no RecBole header line (expected e.g. 'user_id:token<TAB>item_id:token')"
        )
    names: list[str] = []
    for i, field_text in enumerate(header.split("\t"), start=1):
        entry = field_text.strip()
        if not entry:
            raise InputDataError(f"{path}: RecBole header field {i} is empty (a stray tab?)")
        name, sep, kind = entry.rpartition(":")
        if not sep or not name:
            raise InputDataError(f"{path}: RecBole header field '{entry}' has no ':type' suffix")
        if kind not in RECBOLE_TYPES:
            raise InputDataError(
                f"{path}: RecBole header field '{name}' has unknown type '{kind}' "
                f"(known: {', '.join(RECBOLE_TYPES)})"
            )
        if name in names:
            raise InputDataError(f"{path}: RecBole header field '{name}' appears twice")
        names.append(name)
    return ["ts" if n == "timestamp" and "ts" not in names else n for n in names]


def _recbole_inter(spark: SparkSession, path: str) -> DataFrame:
    """A `.inter` file, or a glob of them whose headers give the same columns."""
    p, fs = _hadoop_path(spark, path)
    files = sorted(str(s.getPath()) for s in (fs.globStatus(p) or []) if s.isFile())
    if not files:
        raise InputDataError(f"prepare.input.path {path} matches no file")
    shown = files if len(files) > 1 else [path]  # one file: named as the config does
    headers = [recbole_columns(_first_line(spark, f), s) for f, s in zip(files, shown, strict=True)]
    for name, columns in zip(shown[1:], headers[1:], strict=True):
        if columns != headers[0]:
            raise InputDataError(f"{name}: RecBole columns {columns} differ from {headers[0]} in {shown[0]}")
    schema = StructType([StructField(n, StringType()) for n in headers[0]])  # header skipped, not used
    return _read_csv(spark, path, "\t", True, schema)


def _read_csv(
    spark: SparkSession, path: str, sep: str, header: bool, schema: StructType | None = None
) -> DataFrame:
    # escape='"' reads RFC 4180 quoting ("a ""b"", c"); every column stays a string.
    reader = spark.read.options(sep=sep, header=str(header).lower(), quote='"', escape='"')
    return (reader.schema(schema) if schema else reader).csv(path)


def _reader(spark: SparkSession, inp: InputConfig, path: str, schema: StructType | None = None) -> DataFrame:
    """Read `path` in the input format; `schema` pins the generic formats' schema (per-file reads)."""
    pinned = spark.read.schema(schema) if schema else spark.read
    readers = {
        "parquet": lambda: pinned.parquet(path),
        "csv": lambda: _read_csv(spark, path, inp.csv_delimiter, inp.csv_header, schema),
        "json": lambda: pinned.option("primitivesAsString", "true").json(path),
        "movielens-100k": lambda: _split_text(spark, path, "\t", _ML_COLUMNS),
        "movielens-latest-small": lambda: _read_csv(spark, path, ",", True).toDF(*_ML_COLUMNS),
        "movielens-1m": lambda: _split_text(spark, path, "::", _ML_COLUMNS),
        "sequence-lines": lambda: _split_text(spark, path, r"\s+", ["user_id", "item_id"]),
        "user-sequences": lambda: _user_sequences(spark, path),
        "recbole": lambda: _recbole_inter(spark, path),
    }
    return readers[inp.format]()


def event_roles(inp: InputConfig) -> dict[str, str]:
    """Role -> input column name for every role this config uses."""
    c = inp.columns
    roles = {"user": c.user, "item": c.item}
    if inp.timestamp_format != "order":
        roles["timestamp"] = c.timestamp
    if c.action:
        roles["action"] = c.action
    if c.rating:
        roles["rating"] = c.rating
    for name in c.context:
        roles[f"ctx:{name}"] = name
    return roles


def role_column(role: str) -> str:
    """Internal column name of a raw role (context roles `ctx:device` -> `raw_ctx_device`)."""
    return "raw_" + role.replace(":", "_")


def read_events(spark: SparkSession, inp: InputConfig) -> RawEvents:
    """Raw events with `_row` and one column `raw_<role>` per role, in the input's own types.

    Raises InputDataError when the path or a configured column is missing.
    """
    if inp.format in _NO_TIME_COLUMN and inp.timestamp_format != "order":
        raise InputDataError(
            f"prepare.input.format = '{inp.format}' has no time column: "
            "set prepare.input.timestamp_format = 'order'"
        )
    path = resolve_input(spark, inp.path, _EVENT_FILES.get(inp.format), "prepare.input.path")
    df = _reader(spark, inp, path)
    roles = event_roles(inp)
    missing = [f"{role} column '{name}'" for role, name in roles.items() if name not in df.columns]
    if missing:
        has = [c for c in df.columns if c not in (EMPTY, "_metadata")]
        raise InputDataError(f"{path}: missing {', '.join(missing)} (has {has}); see prepare.input.columns")
    cols = [F.col(f"`{name}`").alias(role_column(role)) for role, name in roles.items()]
    cols += [F.col(marker) for marker in (CORRUPT, EMPTY) if marker in df.columns]
    ordered = _in_input_order(spark, inp, path, df)
    indexed = with_dense_row_index(ordered) if ordered is not None else with_row_index(df)
    return RawEvents(df=indexed.select(*cols, ROW), names=roles, path=path)


def _in_input_order(spark: SparkSession, inp: InputConfig, path: str, df: DataFrame) -> DataFrame | None:
    """The input as a DataFrame whose partitions follow input order, or None when that is too costly.

    One file is read in byte order already. Several files become a union of per-file reads (a union's
    partitions follow its children), unless there are very many or Hive-style partition folders
    (`key=value`, whose columns a per-file read would lose).
    """
    files = sorted(df.inputFiles())
    if len(files) <= 1:
        return df
    root = path.rstrip("/")
    if len(files) > MAX_UNION_FILES or any("=" in f.split(root, 1)[-1].rsplit("/", 1)[0] for f in files):
        return None
    parts = [
        _reader(spark, inp, f, df.schema if inp.format in ("parquet", "csv", "json") else None) for f in files
    ]
    return reduce(DataFrame.unionByName, parts)


def with_dense_row_index(df: DataFrame) -> DataFrame:
    """Add `_row` = input position, for a DataFrame whose partitions are in input order.

    monotonically_increasing_id is (partition << 33) + row within the partition; one cheap pass (no
    columns read) counts rows per partition to turn it into a dense 0..N-1.
    """
    pid = F.spark_partition_id()
    counts = dict(df.select(pid.alias("p")).groupBy("p").count().collect())
    offsets, total = [], 0
    for p in range(df.rdd.getNumPartitions()):
        offsets.append(total)
        total += counts.get(p, 0)
    base = F.expr(f"element_at(array({', '.join(f'{o}L' for o in offsets)}), spark_partition_id() + 1)")
    return df.select(
        "*", (base + F.monotonically_increasing_id().bitwiseAND(F.lit((1 << 33) - 1))).alias(ROW)
    )


def with_row_index(df: DataFrame) -> DataFrame:
    """Add `_row` for any input (many files): files in path order, then rows in file order.

    Spark orders a scan's splits by size, so monotonically_increasing_id alone is not input order.
    It is increasing within each split, though, and a split is identified by (file, block start): one
    pass counts rows per split; a broadcast join gives each split its offset in path order. Slower
    than `with_dense_row_index` (per-row file names), used only where a union of files is not.
    """
    keyed = df.select(
        "*",
        F.col("_metadata.file_path").alias("_fp"),
        F.col("_metadata.file_block_start").alias("_bs"),
        F.spark_partition_id().alias("_pid"),
        F.monotonically_increasing_id().alias("_mono"),
    )
    splits = (
        keyed.groupBy("_fp", "_bs", "_pid")
        .agg(F.min("_mono").alias("_first"), F.count("*").alias("_n"))
        .collect()
    )
    offset, bases = 0, []
    for s in sorted(splits, key=lambda r: (r["_fp"], r["_bs"])):
        bases.append((s["_fp"], s["_bs"], s["_pid"], offset - s["_first"]))
        offset += s["_n"]
    base_df = df.sparkSession.createDataFrame(bases, "_fp string, _bs long, _pid int, _base long")
    joined = keyed.join(F.broadcast(base_df), ["_fp", "_bs", "_pid"])
    return joined.select(*df.columns, (F.col("_base") + F.col("_mono")).alias(ROW))


# --------------------------------------------------------------------------------------------------
# Item tables: item_id + feature columns (single: string, multi: array<string>)
# --------------------------------------------------------------------------------------------------


def _ml100k_items(spark: SparkSession, path: str) -> DataFrame:
    genre_path = path.rsplit("/", 1)[0] + "/u.genre" if "/" in path else "u.genre"
    if not path_exists(spark, genre_path):
        raise InputDataError(f"{genre_path}: u.genre (genre names of the u.item flags) is missing")
    pairs = [r.value.split("|") for r in spark.read.text(genre_path).collect() if r.value.strip()]
    names = [name for name, _ in sorted(pairs, key=lambda p: int(p[1]))]
    if len(names) != _ML100K_GENRE_FLAGS:
        raise InputDataError(f"{genre_path}: expected {_ML100K_GENRE_FLAGS} genres, found {len(names)}")
    fields = F.split(F.col("value"), r"\|")
    flags = [F.when(fields.getItem(5 + i) == "1", F.lit(n)) for i, n in enumerate(names)]
    genres = F.filter(F.array(*flags), lambda g: g.isNotNull())
    return spark.read.text(path).select(fields.getItem(0).alias("item_id"), genres.alias("genres"))


def _ml_latest_items(spark: SparkSession, path: str) -> DataFrame:
    df = _read_csv(spark, path, ",", True)
    return df.select(F.col("movieId").alias("item_id"), F.split("genres", r"\|").alias("genres"))


def _ml1m_items(spark: SparkSession, path: str) -> DataFrame:
    fields = F.split(F.col("value"), "::")
    last = F.element_at(fields, -1)
    return spark.read.text(path).select(
        fields.getItem(0).alias("item_id"), F.split(last, r"\|").alias("genres")
    )


def _multi_values(col: Column, dtype: object, separator: str) -> Column:
    """A multi-valued feature as array<string>: arrays pass through, strings are split."""
    if isinstance(dtype, ArrayType):
        return F.transform(col, lambda v: v.cast("string"))
    pattern = "".join("\\" + ch if not ch.isalnum() else ch for ch in separator)
    return F.filter(F.split(col.cast("string"), pattern), lambda v: v != "")


def read_item_table(spark: SparkSession, inp: InputConfig) -> DataFrame | None:
    """`item` (string) plus one column per configured side feature, or None without an item table."""
    if not inp.item_features_path:
        return None
    fmt = inp.item_features_format
    path = resolve_input(
        spark, inp.item_features_path, _ITEM_FILES.get(fmt), "prepare.input.item_features_path"
    )
    readers = {
        "parquet": lambda: spark.read.parquet(path),
        "csv": lambda: _read_csv(spark, path, inp.csv_delimiter, inp.csv_header),
        "json": lambda: spark.read.option("primitivesAsString", "true").json(path),
        "movielens-100k": lambda: _ml100k_items(spark, path),
        "movielens-latest-small": lambda: _ml_latest_items(spark, path),
        "movielens-1m": lambda: _ml1m_items(spark, path),
    }
    df = readers[fmt]()
    wanted = [inp.item_key, *inp.item_single_features, *inp.item_multi_features]
    missing = [c for c in wanted if c not in df.columns]
    if missing:
        raise InputDataError(f"{path}: item table has no column(s) {missing} (has {df.columns})")
    dtypes = {f.name: f.dataType for f in df.schema.fields}
    cols = [F.trim(F.col(inp.item_key).cast("string")).alias("item")]
    cols += [F.trim(F.col(f).cast(StringType())).alias(f) for f in inp.item_single_features]
    cols += [
        _multi_values(F.col(f), dtypes[f], inp.multi_value_separator).alias(f)
        for f in inp.item_multi_features
    ]
    return df.select(*cols)
