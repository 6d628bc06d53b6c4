"""Bad rows: every quarantine reason on a CSV log, every good row kept, counts adding up exactly,
the same answer from the pandas reference; malformed JSON lines; unusable input stops the job."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

from benchmarks import pandas_prepare
from spark_jobs.adapters import InputDataError
from spark_jobs.build_sequences import main, run_prepare
from tests.spark.logs import columns, config

pytestmark = pytest.mark.spark

HEADER = "uid,iid,time,act,stars,device"
GOOD = [
    "u1,i1,1000,view,4.5,mobile",
    "u1,i2,1001,click,3,web",
    "u1,i3,1002,view,,mobile",  # a missing rating is allowed
    "u2,i1,1000,view,5,",  # a missing context value maps to <unk>
    "u2,i2,1003,view,1,web",
    " u2 ,i3,1004,click,2,web",  # ids are trimmed
    "u1,i2,1006,view,2,web",
    "u2,i1,1007,view,4,mobile",
]
DUPLICATES = ["u2,i3,1004,click,2,web", "u1,i1,1000.0,view,4.5,mobile"]  # same parsed values
BAD = {
    ",i1,1000,view,1,web": "missing_user",
    "  ,i1,1000,view,1,web": "missing_user",
    'u1,"",1000,view,1,web': "missing_item",
    "u1,i1,,view,1,web": "missing_timestamp",
    "u1,i1,yesterday,view,1,web": "bad_timestamp",
    "u1,i1,-5,view,1,web": "impossible_timestamp",
    "u1,i1,99999999999,view,1,web": "impossible_timestamp",
    "u1,i1,1000,view,five,web": "bad_rating",
    "u1,i1,1000,,3,web": "missing_action",
    "u1,i1,1000,purchase,3,web": "unknown_action",
}


def _cfg(path: Path, output: Path):
    return config(
        path,
        output,
        input__format="csv",
        input__columns=columns(
            user="uid", item="iid", timestamp="time", action="act", rating="stars", context=["device"]
        ),
        input__valid_actions=["view", "click"],
    )


@pytest.fixture(scope="module")
def csv_run(spark, tmp_path_factory):
    root = tmp_path_factory.mktemp("quarantine")
    lines = [*GOOD[:3], *list(BAD)[:5], *GOOD[3:], *DUPLICATES, *list(BAD)[5:]]
    (root / "events.csv").write_text("\n".join([HEADER, *lines]) + "\n")
    cfg = _cfg(root / "events.csv", root / "out")
    return run_prepare(cfg, spark), cfg, lines, root / "out"


def test_every_bad_row_quarantined_with_its_reason(csv_run):
    m, _, lines, out = csv_run
    q = pd.read_parquet(out / "quarantine").sort_values("input_row")
    expected = [(i, BAD[line]) for i, line in enumerate(lines) if line in BAD]
    assert list(zip(q["input_row"], q["reason"], strict=True)) == expected
    original = q.set_index("input_row").loc[expected[4][0]]  # the "yesterday" row, values as strings
    assert (original["uid"], original["iid"], original["time"], original["act"], original["stars"]) == (
        "u1",
        "i1",
        "yesterday",
        "view",
        "1",
    )
    assert {k: v for k, v in m["quarantine"].items() if v} == {
        "missing_user": 2,
        "missing_item": 1,
        "missing_timestamp": 1,
        "bad_timestamp": 1,
        "impossible_timestamp": 2,
        "bad_rating": 1,
        "missing_action": 1,
        "unknown_action": 1,
    }


def test_every_good_row_kept_and_counts_add_up(csv_run):
    m, _, _, out = csv_run
    s = m["stats"]
    assert (s["events_in"], s["kept"], s["quarantined"], s["duplicates"], s["filtered"]) == (20, 8, 10, 2, 0)
    assert s["events_in"] == s["kept"] + s["quarantined"] + s["duplicates"] + s["filtered"]
    test = pq.read_table(out / "test").to_pylist()
    items = {v["value"]: v["id"] for v in pq.read_table(out / "vocab" / "item.parquet").to_pylist()}
    by_user = {r["user"]: r for r in test}
    assert by_user["u1"]["item"] == [items["i1"], items["i2"], items["i3"], items["i2"]]
    assert by_user["u2"]["item"] == [items["i1"], items["i2"], items["i3"], items["i1"]]
    assert by_user["u2"]["ts"] == [1000, 1003, 1004, 1007]
    device = pq.read_table(out / "vocab" / "device.parquet").to_pylist()
    assert [(d["value"], d["count"]) for d in device] == [
        ("<pad>", 0),
        ("<unk>", 1),
        ("web", 4),
        ("mobile", 3),
    ]
    assert by_user["u2"]["device"] == [1, 2, 2, 3]


def test_pandas_reference_agrees_on_bad_rows(csv_run):
    m, cfg, _, _ = csv_run
    ref = pandas_prepare.prepare(cfg)
    assert ref.stats == m["stats"]
    assert {k: v for k, v in m["quarantine"].items() if v} == ref.quarantine


def test_malformed_json_lines_are_quarantined(spark, tmp_path):
    lines = [
        {"user_id": "a", "item_id": 1, "ts": 10, "action": "view"},
        {"user_id": "a", "item_id": 2, "ts": 20, "action": "view"},
        {"user_id": "a", "item_id": 3, "ts": 30, "action": "view"},
        {"user_id": "a", "item_id": 1, "ts": 40, "action": "view"},
    ]
    text = [json.dumps(r) for r in lines]
    text.insert(1, '{"user_id": "a", "item_id": ')  # a truncated line
    (tmp_path / "events.json").write_text("\n".join(text) + "\n")
    cfg = config(tmp_path / "events.json", tmp_path / "out", input__format="json", shards__files_per_split=1)
    m = run_prepare(cfg, spark)
    assert (m["stats"]["events_in"], m["stats"]["kept"], m["quarantine"]["malformed_row"]) == (5, 4, 1)
    q = pd.read_parquet(tmp_path / "out" / "quarantine")
    assert q["input_row"].tolist() == [1] and q["raw_record"].tolist() == ['{"user_id": "a", "item_id": ']


def test_missing_path_and_column_stop_with_a_clear_error(spark, tmp_path, capsys):
    with pytest.raises(InputDataError, match="does not exist"):
        run_prepare(config(tmp_path / "nope", tmp_path / "out"), spark)
    (tmp_path / "e.csv").write_text("user_id,item_id\n1,2\n")
    with pytest.raises(InputDataError, match="missing timestamp column 'ts'"):
        run_prepare(config(tmp_path / "e.csv", tmp_path / "out", input__format="csv"), spark)
    assert not (tmp_path / "out").exists()
    code = main(["--set", f"prepare.input.path='{tmp_path / 'nope'}'"], session_factory=lambda: spark)
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not exist" in err[0]
