"""The `user-sequences` and `recbole` input formats: hand-written hostile files (blank lines, CRLF,
stray blanks, repeated users, quoting, short and long rows, a byte order mark) whose counts,
quarantine rows, vocabulary and train/valid/test rows are spelled out and also checked against a
small pure-Python reference; bad headers (error naming the field or column and the file, and
`seqrec prepare` exit code 2); MovieLens-100K converted into both formats (when ../shared/data has
it). Also: a `sequence-lines` line without an item is quarantined, not a failed job.

USER_SEQUENCES (one line per user, items in time order), event positions `_row` on the right:

    a 1 2 3 4 <CRLF>     0 1 2 3
    b 5 1                4 5
    <CRLF>               6          empty_sequence (a blank line)
    c                    7          empty_sequence (a user alone)
     a 5 2 <CRLF>        8 9        a again: appended; blanks around the line
    d 3 3 1              10 11 12   a repeated item is not a duplicate (other position)
    <SP><SP><SP><TAB><SP>  13       empty_sequence (blanks only)
    <TAB>e  1   2 <TAB>  14 15      any run of blanks separates fields
    c 4 (no final EOL)   16         c again, now with an item

INTER (a RecBole .inter file; header with a byte order mark, CRLF on the first lines; columns
user_id item_id review rating timestamp), rows in input order, t = 881250900 (float unix seconds):

     0 u1 i1 "good film" 4.0 t+49.0          9 -  i2 3   t+0     missing_user
     1 u1 i2 -           3.5 t+50.0         10 u2 -  3   t+0     missing_item
     2 u2 i1 ok          5   t              11 u3 i2 abc t+1     bad_rating
     3 u1 i3 x           2.0 t+48.0         12 u2 i1 2   t+90
     4 u2 i3 y           1.0 not-a-time     13 " u4 " "i 5" (quoted, trimmed) review with a
                         bad_timestamp         quoted tab and quotes, 3, t+2.0
     5 u2 i2 z           4.0 t+1.5          14 u4 i1 late 4 t+3, one field too many (dropped)
       (a blank line, a line of blanks:     15 u4 i2, nothing else   missing_timestamp
        skipped, not events)                16 u4 i2 - (no rating: allowed) t+4, no final EOL
     6 u1 i1 = row 0 (duplicate)
     7 u2 i4 -           4.0 t+99
     8 u3 i1 -           3   t-900.0 (u3: 1 good event, too_short)
"""

from __future__ import annotations

import csv
import io
import math
from collections import Counter, defaultdict
from pathlib import Path
from typing import NamedTuple

import pandas as pd
import pyarrow.parquet as pq
import pytest

from seqrec import cli
from seqrec.config import ConfigError
from seqrec.data import schema
from spark_jobs import adapters, build_sequences
from spark_jobs.adapters import ROW, InputDataError, read_events
from spark_jobs.build_sequences import run_prepare
from spark_jobs.validate import REASON, parse_events
from tests.conftest import shared_data
from tests.spark.logs import columns, config

pytestmark = pytest.mark.spark

USER_SEQUENCES = "a 1 2 3 4\r\nb 5 1\n\r\nc\n a 5 2 \r\nd 3 3 1\n   \t \n\te  1   2 \t\nc 4"
T = 881250900
HEADER = "\ufeffuser_id:token\titem_id:token\treview:token_seq\trating:float\ttimestamp:float"
INTER = "".join(
    [
        HEADER + "\r\n",
        f"u1\ti1\tgood film\t4.0\t{T + 49}.0\r\n",
        f"u1\ti2\t\t3.5\t{T + 50}.0\r\n",
        f"u2\ti1\tok\t5\t{T}\r\n",
        f"u1\ti3\tx\t2.0\t{T + 48}.0\r\n",
        "u2\ti3\ty\t1.0\tnot-a-time\n",
        f"u2\ti2\tz\t4.0\t{T + 1}.5\n",
        "\n",
        " \t \n",
        f"u1\ti1\tgood film\t4.0\t{T + 49}.0\n",
        f"u2\ti4\t\t4.0\t{T + 99}\n",
        f"u3\ti1\t\t3\t{T - 900}.0\n",
        f"\ti2\t\t3\t{T}.0\n",
        f"u2\t\t\t3\t{T}.0\n",
        f"u3\ti2\t\tabc\t{T + 1}.0\n",
        f"u2\ti1\t\t2\t{T + 90}.0\n",
        f'" u4 "\t"i 5"\t"tab\tand ""quotes"""\t3\t{T + 2}.0\n',
        f"u4\ti1\tlate\t4\t{T + 3}\textra field\n",
        "u4\ti2\n",
        f"u4\ti2\t\t\t{T + 4}",
    ]
)
MAX_TIMESTAMP = 4_102_444_800  # InputConfig.max_timestamp's default


# --------------------------------------------------------------------------------------------------
# The pure-Python reference: parse, validate, deduplicate, leave-one-out with max_len 3
# --------------------------------------------------------------------------------------------------


class Event(NamedTuple):
    row: int
    user: str | None
    item: str | None
    ts: int | None
    rating: float | None
    reason: str | None
    raw: tuple  # the quarantine table's values: input_row, user, item[, rating, ts]


def reference_user_sequences(text: str) -> list[Event]:
    events: list[Event] = []
    for line in text.splitlines():
        user, *items = line.split() or [None]
        for item in items or [None]:
            row = len(events)
            reason = "empty_sequence" if item is None else None
            events.append(Event(row, user, item, row, None, reason, (row, user, item)))
    return events


def _number(text: str | None) -> float | None:
    try:
        value = float(text.strip(" ")) if text is not None else None
    except ValueError:
        return None
    return None if value is None or math.isnan(value) else value


def reference_inter(text: str) -> list[Event]:
    """Tab-separated, CSV quoting, typed header; blank lines skipped; empty fields are null; Spark's
    trim() strips spaces only."""
    lines = list(csv.reader(io.StringIO(text.removeprefix("\ufeff"), newline=""), delimiter="\t"))
    names = ["ts" if n == "timestamp" else n for n in (f.rsplit(":", 1)[0] for f in lines[0])]
    events: list[Event] = []
    for fields in (f for f in lines[1:] if "".join(f).strip()):
        v = dict(zip(names, [x or None for x in fields] + [None] * len(names), strict=False))
        user, item, ts = ((v[k] or "").strip(" ") for k in ("user_id", "item_id", "ts"))
        secs, rating = _number(v["ts"]), _number(v["rating"])
        checks = [
            ("missing_user", not user),
            ("missing_item", not item),
            ("missing_timestamp", not ts),
            ("bad_timestamp", secs is None),
            ("impossible_timestamp", secs is not None and not 0 <= secs < MAX_TIMESTAMP),
            ("bad_rating", v["rating"] is not None and (rating is None or not math.isfinite(rating))),
        ]
        reason = next((name for name, failed in checks if failed), None)
        row = len(events)
        raw = (row, v["user_id"], v["item_id"], v["rating"], v["ts"])
        events.append(
            Event(row, user, item, math.floor(secs) if reason is None else None, rating, reason, raw)
        )
    return events


def reference_output(events: list[Event], max_len: int = 3) -> dict:
    """What the job makes of parsed events: counts, quarantined rows, item vocabulary, the training
    part's item counts and the leave-one-out rows (the last `max_len + 1` events, left-padded)."""
    width = max_len + 1
    good = [e for e in events if e.reason is None]
    first: dict[tuple, Event] = {}
    for e in good:  # input order: an exact duplicate keeps its first occurrence
        first.setdefault((e.user, e.item, e.ts, e.rating), e)
    by_user: dict[str, list[Event]] = defaultdict(list)
    for e in sorted(first.values(), key=lambda e: (e.user, e.ts, e.row)):
        by_user[e.user].append(e)
    kept = {u: es for u, es in by_user.items() if len(es) >= 3}
    counts = Counter(e.item for es in kept.values() for e in es)
    values = sorted(counts, key=lambda v: (-counts[v], v))
    ids = {v: i + 2 for i, v in enumerate(values)}
    train_count = [0] * (len(values) + 2)
    splits: dict[str, dict] = {"train": {}, "valid": {}, "test": {}}
    for user, es in kept.items():
        for e in es[:-2]:
            train_count[ids[e.item]] += 1
        for split, end in (("test", len(es)), ("valid", len(es) - 1), ("train", len(es) - 2)):
            part = es[:end][-width:]
            if len(part) >= 2:
                pad = [0] * (width - len(part))
                r = {
                    "length": len(part),
                    "item": pad + [ids[e.item] for e in part],
                    "ts": pad + [e.ts for e in part],
                }
                splits[split][user] = [r if split == "train" else {**r, "target": r["item"][-1]}]
    num_kept = sum(len(es) for es in kept.values())
    return {
        "stats": {
            "events_in": len(events),
            "kept": num_kept,
            "quarantined": len(events) - len(good),
            "duplicates": len(good) - len(first),
            "filtered": len(first) - num_kept,
            "users": len(kept),
            "items": len(values),
        },
        "quarantine": dict(Counter(e.reason for e in events if e.reason)),
        "quarantine_rows": [e.raw for e in events if e.reason],
        "vocab": [(0, "<pad>", 0), (1, "<unk>", 0), *((ids[v], v, counts[v]) for v in values)],
        "train_count": train_count,
        "splits": splits,
    }


# --------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------


def read_split(out: Path, split: str) -> dict[str, list[dict]]:
    """{user: [row, ...]} in stored order."""
    rows: dict[str, list[dict]] = {}
    for f in sorted((out / split).glob("*.parquet")):
        for r in pq.read_table(f).to_pylist():
            rows.setdefault(r.pop("user"), []).append(r)
    return rows


def job_output(m: dict, out: Path, quarantine_columns: list[str]) -> dict:
    """The job's output in `reference_output`'s form."""
    q = pd.read_parquet(out / "quarantine").sort_values("input_row")
    q = q.astype(object).where(q.notna(), None)
    vocab = pq.read_table(out / "vocab" / "item.parquet").to_pylist()
    return {
        "stats": m["stats"],
        "quarantine": {k: v for k, v in m["quarantine"].items() if v},
        "quarantine_rows": [tuple(r) for r in q[["input_row", *quarantine_columns]].values.tolist()],
        "vocab": [(r["id"], r["value"], r["count"]) for r in vocab],
        "train_count": pq.read_table(out / schema.ITEM_FEATURES_FILE).column("train_count").to_pylist(),
        "splits": {s: read_split(out, s) for s in schema.SPLITS},
    }


def row(length: int, item: list[int], ts: list[int], target: int | None = None) -> dict:
    r = {"length": length, "item": item, "ts": ts}
    return r if target is None else {**r, "target": target}


def write_inter(folder: Path, text: str, name: str = "known") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.inter"
    path.write_bytes(text.encode())
    return path


def seq_config(path: Path | str, output: Path | str, **sections: object):
    defaults = {
        "input__format": "user-sequences",
        "input__timestamp_format": "order",
        "input__columns": columns(action=""),
    }
    return config(path, output, **{**defaults, **sections})


def inter_config(path: Path | str, output: Path | str, **sections: object):
    defaults = {"input__format": "recbole", "input__columns": columns(action="", rating="rating")}
    return config(path, output, **{**defaults, **sections})


# --------------------------------------------------------------------------------------------------
# user-sequences
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def seq_run(spark, tmp_path_factory):
    root = tmp_path_factory.mktemp("user_sequences")
    (root / "seq.txt").write_bytes(USER_SEQUENCES.encode())
    return run_prepare(seq_config(root / "seq.txt", root / "out"), spark), root / "out"


def _events(spark, path: Path) -> list[tuple]:
    """(user, item, _row, empty) of every raw event, by `_row`."""
    raw = read_events(spark, seq_config(path, path.parent / "unused").input)
    return [(r["raw_user"], r["raw_item"], r[ROW], r[adapters.EMPTY]) for r in raw.df.orderBy(ROW).collect()]


EXPECTED_EVENTS = [
    ("a", "1", 0, False), ("a", "2", 1, False), ("a", "3", 2, False), ("a", "4", 3, False),
    ("b", "5", 4, False), ("b", "1", 5, False),
    (None, None, 6, True),
    ("c", None, 7, True),
    ("a", "5", 8, False), ("a", "2", 9, False),
    ("d", "3", 10, False), ("d", "3", 11, False), ("d", "1", 12, False),
    (None, None, 13, True),
    ("e", "1", 14, False), ("e", "2", 15, False),
    ("c", "4", 16, False),
]  # fmt: skip


def test_user_sequences_events_in_input_order(spark, tmp_path, monkeypatch):
    """`_row` = lines in file order, items in line order; the same when the lines span two files,
    also on the per-row file-name path that inputs with very many files take."""
    ref = reference_user_sequences(USER_SEQUENCES)
    assert [(e.user, e.item, e.row, e.reason is not None) for e in ref] == EXPECTED_EVENTS
    (tmp_path / "seq.txt").write_bytes(USER_SEQUENCES.encode())
    assert _events(spark, tmp_path / "seq.txt") == EXPECTED_EVENTS
    two = tmp_path / "two"
    two.mkdir()
    cut = USER_SEQUENCES.index("c\n") + 2
    (two / "part-0.txt").write_bytes(USER_SEQUENCES[:cut].encode())
    (two / "part-1.txt").write_bytes(USER_SEQUENCES[cut:].encode())
    assert _events(spark, two) == EXPECTED_EVENTS  # a union of per-file reads
    monkeypatch.setattr(adapters, "MAX_UNION_FILES", 1)
    assert _events(spark, two) == EXPECTED_EVENTS  # with_row_index


def test_user_sequences_counts_and_quarantine(seq_run):
    m, out = seq_run
    assert m["stats"] == {
        "events_in": 17,
        "kept": 9,
        "quarantined": 3,
        "duplicates": 0,
        "filtered": 5,
        "users": 2,
        "items": 5,
    }
    assert {k: v for k, v in m["quarantine"].items() if v} == {"empty_sequence": 3}
    assert {k: v for k, v in m["filtered"].items() if v} == {"too_short": 5}  # b 2, e 2, c 1
    q = pd.read_parquet(out / "quarantine").sort_values("input_row")
    assert q.columns.tolist() == ["input_row", "user_id", "item_id", "reason"]
    assert q["input_row"].tolist() == [6, 7, 13]
    assert q["user_id"].tolist() == [None, "c", None] and q["item_id"].isna().all()
    assert set(q["reason"]) == {"empty_sequence"}
    assert m["source"]["format"] == "user-sequences"


def test_user_sequences_vocabulary_and_rows(seq_run):
    m, out = seq_run
    got = job_output(m, out, ["user_id", "item_id"])
    assert got == reference_output(reference_user_sequences(USER_SEQUENCES))
    # kept items: a 1 2 3 4 5 2, d 3 3 1 -> counts 3:3, 1:2, 2:2, 4:1, 5:1 (ties by value)
    assert got["vocab"] == [
        (0, "<pad>", 0), (1, "<unk>", 0), (2, "3", 3), (3, "1", 2), (4, "2", 2), (5, "4", 1), (6, "5", 1),
    ]  # fmt: skip
    # a = 1 2 3 4 5 2 (ids 3 4 2 5 6 4) at positions 0 1 2 3 8 9: the last line item is the test
    # target, the one before it the validation target; d = 3 3 1 (ids 2 2 3) at 10 11 12
    assert got["splits"] == {
        "test": {
            "a": [row(4, [2, 5, 6, 4], [2, 3, 8, 9], target=4)],
            "d": [row(3, [0, 2, 2, 3], [0, 10, 11, 12], target=3)],
        },
        "valid": {
            "a": [row(4, [4, 2, 5, 6], [1, 2, 3, 8], target=6)],
            "d": [row(2, [0, 0, 2, 2], [0, 0, 10, 11], target=2)],
        },
        "train": {"a": [row(4, [3, 4, 2, 5], [0, 1, 2, 3])]},  # d: 1 training event, no row
    }
    assert got["train_count"] == [0, 0, 2, 1, 1, 1, 0]  # training part: a 1 2 3 4, d 3
    manifest = schema.read_manifest(out)
    for split in schema.SPLITS:
        schema.verify_split(manifest, split, check_sha256=True)


def test_user_sequences_need_order_time(spark, tmp_path):
    (tmp_path / "seq.txt").write_text("a 1 2 3\n")
    with pytest.raises(  # refused when the config loads, before Spark reads anything
        ConfigError,
        match="'user-sequences' has no time column: set prepare.input.timestamp_format = 'order'",
    ):
        seq_config(tmp_path / "seq.txt", tmp_path / "out", input__timestamp_format="unix_s")
    assert not (tmp_path / "out").exists()


def test_sequence_lines_line_without_item_is_quarantined(spark, tmp_path):
    """The split-text adapters read a short line as nulls (quarantined), not as a failed job."""
    (tmp_path / "s.txt").write_text("u1 i1\nu2\nu1 i2\n")
    cfg = seq_config(tmp_path / "s.txt", tmp_path / "out", input__format="sequence-lines")
    parsed = parse_events(read_events(spark, cfg.input), cfg.input)
    assert [r[REASON] for r in parsed.orderBy(ROW).collect()] == [None, "missing_item", None]


# --------------------------------------------------------------------------------------------------
# recbole
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def inter_run(spark, tmp_path_factory):
    """INTER as `known.inter` in a folder that also holds a `.item` file (not read)."""
    root = tmp_path_factory.mktemp("recbole")
    write_inter(root / "known", INTER)
    (root / "known" / "known.item").write_text("item_id:token\tgenre:token_seq\ni1\tDrama\n")
    return run_prepare(inter_config(root / "known", root / "out"), spark), root / "out"


def test_recbole_counts_and_quarantine(inter_run):
    m, out = inter_run
    assert m["stats"] == {
        "events_in": 17,
        "kept": 10,
        "quarantined": 5,
        "duplicates": 1,
        "filtered": 1,
        "users": 3,
        "items": 5,
    }
    assert {k: v for k, v in m["quarantine"].items() if v} == {
        "bad_timestamp": 1,
        "missing_user": 1,
        "missing_item": 1,
        "missing_timestamp": 1,
        "bad_rating": 1,
    }
    assert {k: v for k, v in m["filtered"].items() if v} == {"too_short": 1}
    assert m["source"]["path"].endswith("/known/known.inter")
    q = pd.read_parquet(out / "quarantine").sort_values("input_row")
    # the original values under the RecBole names (types stripped; timestamp read as ts)
    assert q.columns.tolist() == ["input_row", "user_id", "item_id", "ts", "rating", "reason"]
    assert q.astype(object).where(q.notna(), None).values.tolist() == [
        [4, "u2", "i3", "not-a-time", "1.0", "bad_timestamp"],
        [9, None, "i2", f"{T}.0", "3", "missing_user"],
        [10, "u2", None, f"{T}.0", "3", "missing_item"],
        [11, "u3", "i2", f"{T + 1}.0", "abc", "bad_rating"],
        [15, "u4", "i2", None, None, "missing_timestamp"],
    ]


def test_recbole_vocabulary_and_rows(inter_run):
    m, out = inter_run
    got = job_output(m, out, ["user_id", "item_id", "rating", "ts"])
    assert got == reference_output(reference_inter(INTER))
    # i1: u1, u2 twice, u4; i2: u1, u2, u4; then "i 5" < "i3" < "i4" (one each, by value)
    assert got["vocab"] == [
        (0, "<pad>", 0), (1, "<unk>", 0), (2, "i1", 4), (3, "i2", 3), (4, "i 5", 1), (5, "i3", 1), (6, "i4", 1),
    ]  # fmt: skip
    # u1 by time: i3 (t+48) i1 (t+49) i2 (t+50); the repeated i1 row was a duplicate
    # u2 by time: i1 (t) i2 (t+1.5 -> t+1) i1 (t+90) i4 (t+99); u4: "i 5" (t+2) i1 (t+3) i2 (t+4)
    assert got["splits"] == {
        "test": {
            "u1": [row(3, [0, 5, 2, 3], [0, T + 48, T + 49, T + 50], target=3)],
            "u2": [row(4, [2, 3, 2, 6], [T, T + 1, T + 90, T + 99], target=6)],
            "u4": [row(3, [0, 4, 2, 3], [0, T + 2, T + 3, T + 4], target=3)],
        },
        "valid": {
            "u1": [row(2, [0, 0, 5, 2], [0, 0, T + 48, T + 49], target=2)],
            "u2": [row(3, [0, 2, 3, 2], [0, T, T + 1, T + 90], target=2)],
            "u4": [row(2, [0, 0, 4, 2], [0, 0, T + 2, T + 3], target=2)],
        },
        "train": {"u2": [row(2, [0, 0, 2, 3], [0, 0, T, T + 1])]},
    }


def test_recbole_header_without_timestamp_works_with_order_time(spark, tmp_path):
    path = write_inter(tmp_path, "user_id:token\titem_id:token\nu1\ti1\nu1\ti2\n")
    raw = read_events(spark, config(path, tmp_path / "o", input__format="recbole", input__timestamp_format="order",
                                    input__columns=columns(action="")).input)  # fmt: skip
    assert [(r["raw_user"], r["raw_item"], r[ROW]) for r in raw.df.orderBy(ROW).collect()] == [
        ("u1", "i1", 0),
        ("u1", "i2", 1),
    ]


def test_recbole_header_only_file_has_no_events(spark, tmp_path):
    path = write_inter(tmp_path, "user_id:token\titem_id:token\trating:float\ttimestamp:float\r\n")
    raw = read_events(spark, inter_config(path, tmp_path / "o").input)
    assert raw.df.columns == ["raw_user", "raw_item", "raw_timestamp", "raw_rating", ROW]
    assert raw.df.count() == 0
    # The whole job stops with one line (it used to wait forever on an empty plan), writing nothing.
    with pytest.raises(InputDataError, match=r"\.inter: no valid events \(0 rows read; quarantined: none\)"):
        run_prepare(inter_config(path, tmp_path / "o"), spark)
    assert not (tmp_path / "o").exists()


def test_user_sequences_with_only_blank_lines_stop_with_one_line(spark, tmp_path):
    (tmp_path / "seq.txt").write_text("\n   \n\n")
    with pytest.raises(InputDataError, match=r"no valid events \(3 rows read; quarantined: .*empty_sequence.*3"):
        run_prepare(seq_config(tmp_path / "seq.txt", tmp_path / "out"), spark)
    assert not (tmp_path / "out").exists()


def test_recbole_glob_reads_files_in_name_order(spark, tmp_path):
    """A glob of `.inter` files (RecBole's benchmark splits): each header is skipped, rows follow
    file names; files whose headers differ stop the job naming both."""
    header = "user_id:token\titem_id:token\ttimestamp:float\n"
    write_inter(tmp_path / "d", header + "u1\ti2\t200\n", name="ml.valid")
    write_inter(tmp_path / "d", header + "u1\ti1\t100\nu2\ti1\t100\n", name="ml.train")
    cfg = inter_config(tmp_path / "d" / "*.inter", tmp_path / "o", input__columns=columns(action=""))
    raw = read_events(spark, cfg.input)
    assert [
        (r["raw_user"], r["raw_item"], r["raw_timestamp"], r[ROW]) for r in raw.df.orderBy(ROW).collect()
    ] == [
        ("u1", "i1", "100", 0),
        ("u2", "i1", "100", 1),
        ("u1", "i2", "200", 2),
    ]
    other = write_inter(tmp_path / "d", "item_id:token\tuser_id:token\ttimestamp:float\n", name="other")
    with pytest.raises(InputDataError) as e:
        read_events(spark, cfg.input)
    assert str(e.value) == (
        f"file:{other}: RecBole columns ['item_id', 'user_id', 'ts'] differ from "
        f"['user_id', 'item_id', 'ts'] in file:{tmp_path / 'd' / 'ml.train.inter'}"
    )


BAD_HEADERS = [
    ("user_id:tokn\titem_id:token\ttimestamp:float", "RecBole header field 'user_id' has unknown type 'tokn' "
                                                     "(known: token, token_seq, float, float_seq)"),
    ("user_id\titem_id:token\ttimestamp:float", "RecBole header field 'user_id' has no ':type' suffix"),
    ("user_id:token\titem_id:token\ttimestamp:float\t", "RecBole header field 4 is empty (a stray tab?)"),
    ("user_id:token\titem_id:token\tuser_id:float", "RecBole header field 'user_id' appears twice"),
    ("", "no RecBole header line (expected e.g. 'user_id:token<TAB>item_id:token')"),
    ("user_id:token\trating:float\ttimestamp:float", "missing item column 'item_id' "
                                                     "(has ['user_id', 'rating', 'ts']); see prepare.input.columns"),
    ("user_id:token\titem_id:token\trating:float", "missing timestamp column 'ts' "
                                                   "(has ['user_id', 'item_id', 'rating']); see prepare.input.columns"),
]  # fmt: skip


@pytest.mark.parametrize(("header", "message"), BAD_HEADERS)
def test_recbole_bad_header_names_field_and_file(spark, tmp_path, header, message):
    path = write_inter(tmp_path / "data", f"{header}\nu1\ti1\t1.0\n" if header else "")
    with pytest.raises(InputDataError) as e:
        run_prepare(inter_config(tmp_path / "data", tmp_path / "out"), spark)
    assert str(e.value) == f"{path}: {message}"
    assert not (tmp_path / "out").exists()


def test_recbole_folder_needs_exactly_one_inter_file(spark, tmp_path):
    write_inter(tmp_path / "data", INTER, name="a")
    write_inter(tmp_path / "data", INTER, name="b")
    with pytest.raises(InputDataError, match=r"has 2 \*\.inter files \(a\.inter, b\.inter\)"):
        run_prepare(inter_config(tmp_path / "data", tmp_path / "out"), spark)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputDataError, match=r"folder .*empty has no \*\.inter"):
        run_prepare(inter_config(tmp_path / "empty", tmp_path / "out"), spark)


@pytest.mark.parametrize(
    ("fmt", "text", "settings", "message"),
    [
        ("recbole", "user_id:tokn\titem_id:token\ttimestamp:float\n", "",
         "{path}: RecBole header field 'user_id' has unknown type 'tokn' (known: token, token_seq, float, float_seq)"),
        ("recbole", "user_id:token\ttimestamp:float\n", "",
         "{path}: missing item column 'item_id' (has ['user_id', 'ts']); see prepare.input.columns"),
        ("user-sequences", "a 1 2 3\n", 'timestamp_format = "unix_s"',
         "{config}: prepare.input.format = 'user-sequences' has no time column: set prepare.input.timestamp_format = 'order'"),
    ],
)  # fmt: skip
def test_seqrec_prepare_bad_input_is_one_line_exit_2(
    spark, tmp_path, monkeypatch, capsys, fmt, text, settings, message
):
    """`seqrec prepare` (its main function, on the session's Spark) reports bad input as one line."""
    path = tmp_path / "data" / ("x.inter" if fmt == "recbole" else "seq.txt")
    path.parent.mkdir()
    path.write_text(text)
    (tmp_path / "run.toml").write_text(
        f"""
[prepare]
output = "{tmp_path / "out"}"
[prepare.input]
path = "{tmp_path / "data"}"
format = "{fmt}"
{settings}
item_features_path = ""
item_single_features = []
valid_actions = []
[prepare.input.columns]
action = ""
"""
    )
    run = build_sequences.run_prepare
    monkeypatch.setattr(build_sequences, "run_prepare", lambda cfg: run(cfg, spark))
    assert cli.main(["prepare", "--config", str(tmp_path / "run.toml")]) == 2
    captured = capsys.readouterr()
    expected = message.format(path=path, config=tmp_path / "run.toml")
    assert captured.err.splitlines() == ["seqrec prepare: error: " + expected]
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------------------
# MovieLens-100K converted into both formats
# --------------------------------------------------------------------------------------------------


def test_movielens_100k_as_recbole_and_user_sequences(spark, tmp_path):
    """u.data -> ml-100k.inter and user lines (each user's items sorted by time, ties in file
    order): the same users, events and leave-one-out rows (items, targets; for RecBole also the
    times) as the native adapter."""
    folder = shared_data("movielens-100k")
    ml = pd.read_csv(folder / "u.data", sep="\t", names=["user", "item", "rating", "ts"], dtype=str)
    inter = tmp_path / "ml-100k"
    inter.mkdir()
    body = ml.assign(ts=ml["ts"] + ".0").to_csv(sep="\t", header=False, index=False)
    (inter / "ml-100k.inter").write_text(
        "user_id:token\titem_id:token\trating:float\ttimestamp:float\n" + body
    )
    ordered = ml.assign(t=ml["ts"].astype(int)).sort_values(["user", "t"], kind="stable")
    lines = ordered.groupby("user", sort=False)["item"].agg(" ".join)
    (tmp_path / "seq.txt").write_text("".join(f"{u} {items}\n" for u, items in lines.items()))
    runs = {
        "native": config(folder, tmp_path / "native", input__format="movielens-100k",
                         input__columns=columns(action="", rating="rating")),
        "recbole": inter_config(inter, tmp_path / "recbole"),
        "user-sequences": seq_config(tmp_path / "seq.txt", tmp_path / "seq"),
    }  # fmt: skip
    results = {name: run_prepare(cfg, spark) for name, cfg in runs.items()}
    for m in results.values():
        assert (m["stats"]["events_in"], m["stats"]["kept"], m["stats"]["users"]) == (100_000, 100_000, 943)
        assert m["stats"]["items"] == 1_682

    def items(rows: dict[str, list[dict]]) -> dict[str, list[tuple]]:
        return {u: [(r["item"], r.get("target")) for r in rs] for u, rs in rows.items()}

    for split in schema.SPLITS:
        got = {name: read_split(Path(cfg.output), split) for name, cfg in runs.items()}
        assert got["recbole"] == got["native"], split  # the same times: identical rows
        assert items(got["user-sequences"]) == items(got["native"]), split  # times are positions
