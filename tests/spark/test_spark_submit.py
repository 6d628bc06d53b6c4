"""`spark-submit --master local[2] spark_jobs/build_sequences.py` runs the same job as `seqrec prepare`
(run from another folder: the script must import seqrec and spark_jobs from the installed venv)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from seqrec.data import schema
from tests.conftest import REPO_ROOT
from tests.spark.logs import write_known

pytestmark = pytest.mark.spark


def test_spark_submit_local(tmp_path):
    events, items = write_known(tmp_path)
    out = tmp_path / "out"
    (tmp_path / "run.toml").write_text(
        f"""
[prepare]
output = "{out}"
dataset_name = "known"
shuffle_partitions = 2
[prepare.input]
path = "{events}"
item_features_path = "{items}"
item_single_features = ["category"]
valid_actions = []
[prepare.filters]
min_user_events = 1
k_core = 2
[prepare.split]
max_len = 3
[prepare.shards]
files_per_split = 2
max_world_size = 1
row_group_rows = 2
"""
    )
    env = {
        **os.environ,
        "SPARK_LOCAL_IP": "127.0.0.1",
        "PYSPARK_PYTHON": sys.executable,
        "PYSPARK_DRIVER_PYTHON": sys.executable,
    }
    cmd = [
        str(Path(sys.executable).parent / "spark-submit"),
        "--master",
        "local[2]",
        "--driver-memory",
        "1g",
        "--conf",
        "spark.ui.enabled=false",
        str(REPO_ROOT / "spark_jobs" / "build_sequences.py"),
        "--config",
        str(tmp_path / "run.toml"),
        "--set",
        "prepare.dataset_name=submitted",
    ]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # spark-submit's PythonRunner merges the script's stderr (log lines) into its stdout
    assert re.search(r"prepare \[(\d+)/\1\] manifest", proc.stdout) and "events in" in proc.stdout
    manifest = schema.read_manifest(out)
    for split in schema.SPLITS:
        schema.verify_split(manifest, split, check_sha256=True)
    raw = json.loads((out / schema.MANIFEST_FILE).read_text())
    assert raw["dataset"] == "submitted" and raw["config"]["dataset_name"] == "submitted"
    assert raw["stats"] == {
        "events_in": 17,
        "kept": 11,
        "quarantined": 0,
        "duplicates": 1,
        "filtered": 5,
        "users": 2,
        "items": 3,
    }


def test_spark_submit_bad_input_is_one_line_exit_2(tmp_path):
    env = {**os.environ, "PYSPARK_PYTHON": sys.executable}
    cmd = [
        sys.executable,
        str(REPO_ROOT / "spark_jobs" / "build_sequences.py"),
        "--set",
        f"prepare.input.path='{tmp_path / 'missing'}'",
    ]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("build_sequences: error: prepare.input.path path")


def test_seqrec_prepare_missing_input_is_one_line_exit_2(tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "seqrec",
        "prepare",
        "--input",
        str(tmp_path / "missing"),
        "--output",
        str(tmp_path / "out"),
    ]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"seqrec prepare: error: prepare.input.path path {tmp_path / 'missing'} does not exist"
    ]
