"""The Spark job against the pandas reference (benchmarks/pandas_prepare.py) on a generated log with
injected bad rows, duplicates and ties; shard layout (balance, row groups, determinism, vocabulary
reuse); petastorm reading the shards disjoint and complete at world sizes 1, 2, 4 and 8."""

from __future__ import annotations

import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from benchmarks import pandas_prepare
from seqrec.config import GenerateConfig
from seqrec.data import schema
from seqrec.data.synthetic import generate
from spark_jobs.build_sequences import run_prepare
from tests.spark.logs import config

pytestmark = pytest.mark.spark


@pytest.fixture(scope="module")
def log(tmp_path_factory) -> Path:
    """20k generated events in 4 files + a 5th file of bad rows, exact duplicates and timestamp ties."""
    root = tmp_path_factory.mktemp("synthetic")
    generate(
        GenerateConfig(
            num_events=20_000,
            num_items=300,
            num_categories=10,
            mean_events_per_user=20,
            min_events_per_user=2,
            max_events_per_user=200,
            events_per_file=6000,
            output=str(root),
        )
    )
    first = pq.read_table(root / "events" / "part-00000.parquet").slice(0, 200)
    bad = pa.table(
        {
            "user_id": pa.array([None, 7, 7, 7, 7], pa.int64()),
            "item_id": pa.array([1_000_001, None, 1_000_001, 1_000_001, 1_000_001], pa.int64()),
            "ts": pa.array([1_700_000_000, 1_700_000_000, None, -1, 1_700_000_000], pa.int64()),
            "action": ["view", "view", "view", "view", "share"],
        }
    )
    ties = first.slice(0, 50).set_column(3, "action", pa.array(["click"] * 50))  # same times, other action
    extra = pa.concat_tables([first.slice(100, 60), bad.cast(first.schema), ties])  # 60 exact duplicates
    pq.write_table(extra, root / "events" / "part-00099.parquet")
    return root


def _loo_cfg(log: Path, out: Path, **kw):
    return config(
        log / "events",
        out,
        log / "items.parquet",
        input__item_single_features=["category"],
        input__valid_actions=["view", "click", "like", "purchase"],
        filters__k_core=3,
        split__max_len=8,
        split__sliding_window=True,
        split__window_stride=5,
        shards__files_per_split=3,
        shards__max_world_size=8,
        shards__row_group_rows=64,
        vocab_min_count=2,
        **kw,
    )


def _time_cfg(log: Path, out: Path):
    ts = pq.read_table(log / "events").column("ts").drop_null().to_numpy()
    valid, test = (int(np.quantile(ts, q)) for q in (0.7, 0.85))
    return config(
        log / "events",
        out,
        log / "items.parquet",
        input__item_single_features=["category"],
        filters__min_item_events=2,
        filters__actions=["view", "click"],
        filters__start_time=int(np.quantile(ts, 0.05)),
        split__kind="time",
        split__valid_time=valid,
        split__test_time=test,
        split__max_len=5,
        shards__files_per_split=2,
        shards__max_world_size=4,
    )


@pytest.fixture(scope="module")
def loo(spark, log, tmp_path_factory):
    out = tmp_path_factory.mktemp("loo") / "shards"
    cfg = _loo_cfg(log, out)
    return run_prepare(cfg, spark), cfg, out


@pytest.fixture(scope="module")
def timecut(spark, log, tmp_path_factory):
    out = tmp_path_factory.mktemp("time") / "shards"
    cfg = _time_cfg(log, out)
    return run_prepare(cfg, spark), cfg, out


def spark_rows(out: Path, split: str) -> dict[str, list[tuple]]:
    rows: dict[str, list[tuple]] = {}
    for f in sorted((out / split).glob("*.parquet")):
        for r in pq.read_table(f).to_pylist():
            rows.setdefault(r.pop("user"), []).append(tuple(sorted(r.items())))
    return rows


def pandas_rows(df) -> dict[str, list[tuple]]:
    rows: dict[str, list[tuple]] = {}
    for r in df.drop(columns="_k").to_dict("records"):
        rows.setdefault(r.pop("user"), []).append(tuple(sorted(r.items())))
    return rows


@pytest.mark.parametrize("run", ["loo", "timecut"])
def test_spark_equals_pandas_reference(run, request):
    m, cfg, out = request.getfixturevalue(run)
    ref = pandas_prepare.prepare(cfg)
    assert m["stats"] == ref.stats
    assert {k: v for k, v in m["quarantine"].items() if v} == ref.quarantine
    assert {k: v for k, v in m["filtered"].items() if v} == ref.filtered
    for split in schema.SPLITS:
        assert spark_rows(out, split) == pandas_rows(ref.splits[split]), split
    for name, vocab in ref.vocabs.items():
        assert pq.read_table(out / "vocab" / f"{name}.parquet").equals(vocab.table()), name
    assert pq.read_table(out / schema.ITEM_FEATURES_FILE).equals(ref.item_features)


def test_reference_log_exercises_every_path(loo, timecut):
    m, _, _ = loo
    assert m["stats"]["duplicates"] >= 60 and m["filtered"]["k_core"] > 0
    assert {k for k, v in m["quarantine"].items() if v} == {
        "missing_user",
        "missing_item",
        "missing_timestamp",
        "impossible_timestamp",
        "unknown_action",
    }
    assert m["splits"]["train"]["rows"] > m["splits"]["test"]["rows"]  # sliding windows
    t, _, _ = timecut
    assert all(
        t["filtered"][k] > 0 for k in ("actions", "time_window", "min_item_events", "time_split_unused")
    )


def test_shard_layout(loo):
    m, cfg, out = loo
    for split, section in m["splits"].items():
        files = section["files"]
        rows = [f["rows"] for f in files]
        assert len(files) == 3 and max(rows) - min(rows) <= max(rows) // 10
        assert sum(f["row_groups"] for f in files) >= cfg.shards.max_world_size
        for f in files:
            meta = pq.ParquetFile(out / f["path"]).metadata
            sizes = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
            assert max(sizes) <= cfg.shards.row_group_rows and max(sizes) - min(sizes) <= 1
        table = pq.read_table(out / split)
        widths = {len(x) for x in table.column("item").to_pylist()}
        assert widths == {cfg.split.max_len + 1}
        assert section["tokens"] == sum(table.column("length").to_pylist())


def test_rerun_with_reused_vocab_gives_identical_bytes(spark, log, loo, tmp_path):
    m, _, out = loo
    again = run_prepare(_loo_cfg(log, tmp_path / "again", reuse_vocab=str(out)), spark)
    assert again["splits"] == m["splits"]  # same paths, rows, row groups and sha256
    for name in m["features"]:
        assert (tmp_path / "again" / "vocab" / f"{name}.parquet").read_bytes() == (
            out / "vocab" / f"{name}.parquet"
        ).read_bytes()


@pytest.mark.parametrize("world", [1, 2, 4, 8])
def test_petastorm_shards_disjoint_and_complete(loo, world):
    from petastorm import make_batch_reader

    _, _, out = loo
    for split in schema.SPLITS:
        table = pq.read_table(out / split)
        expected = Counter(
            zip(
                table.column("user").to_pylist(),
                map(tuple, table.column("item").to_pylist()),
                map(tuple, table.column("ts").to_pylist()),
                strict=True,
            )
        )
        seen: Counter = Counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for rank in range(world):
                with make_batch_reader(
                    f"file://{out / split}",
                    cur_shard=rank,
                    shard_count=world,
                    num_epochs=1,
                    shuffle_row_groups=False,
                    reader_pool_type="dummy",
                ) as reader:
                    for batch in reader:
                        users = [u.decode() if isinstance(u, bytes) else u for u in batch.user]
                        seen.update(
                            zip(
                                users,
                                (tuple(x.tolist()) for x in batch.item),
                                (tuple(x.tolist()) for x in batch.ts),
                                strict=True,
                            )
                        )
        assert seen == expected, split
