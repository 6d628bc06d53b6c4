"""The sequence builder on a hand-written log (tests/spark/logs.py KNOWN) with every answer spelled out:
timestamp ties keep input order, exact duplicates go, k-core iterates, both split kinds, truncation,
sliding windows, vocabulary ids and tie-breaks, item side features, train_count, counts, manifest."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest

from seqrec.data import schema
from spark_jobs.build_sequences import run_prepare
from tests.spark.logs import config, write_known

pytestmark = pytest.mark.spark


def read_split(out: Path, split: str) -> dict[str, list[dict]]:
    """{user: [row, ...]} with each user's rows in stored order (a user's rows share one file)."""
    rows: dict[str, list[dict]] = {}
    for f in sorted((out / split).glob("*.parquet")):
        for row in pq.read_table(f).to_pylist():
            rows.setdefault(row.pop("user"), []).append(row)
    return rows


def vocab(out: Path, feature: str) -> list[tuple[int, str, int]]:
    t = pq.read_table(out / "vocab" / f"{feature}.parquet").to_pylist()
    return [(r["id"], r["value"], r["count"]) for r in t]


def row(length, item, ts, action, target=None) -> dict:
    r = {"length": length, "item": item, "ts": ts, "action": action}
    return r if target is None else {**r, "target": target}


@pytest.fixture(scope="module")
def loo(spark, tmp_path_factory):
    root = tmp_path_factory.mktemp("known")
    events, items = write_known(root)
    cfg = config(
        events,
        root / "loo",
        items,
        filters__k_core=2,
        input__item_single_features=["category"],
        input__item_multi_features=["tags"],
        input__max_values_per_item=2,
    )
    return run_prepare(cfg, spark), root / "loo"


@pytest.fixture(scope="module")
def timecut(spark, tmp_path_factory):
    root = tmp_path_factory.mktemp("known_time")
    events, _ = write_known(root)
    cfg = config(
        events,
        root / "time",
        split__kind="time",
        split__valid_time=300,
        split__test_time=450,
        split__max_len=2,
        split__sliding_window=True,
    )
    return run_prepare(cfg, spark), root / "time"


def test_loo_counts_add_up(loo):
    m, _ = loo
    assert m["stats"] == {
        "events_in": 17,
        "kept": 11,
        "quarantined": 0,
        "duplicates": 1,
        "filtered": 5,
        "users": 2,
        "items": 3,
    }
    assert {k: v for k, v in m["filtered"].items() if v} == {"k_core": 3, "too_short": 2}
    assert sum(m["quarantine"].values()) == 0


def test_loo_vocabularies_by_count_then_value(loo):
    _, out = loo
    # items 1 and 2 both have 4 kept events: value order breaks the tie
    assert vocab(out, "item") == [(0, "<pad>", 0), (1, "<unk>", 0), (2, "1", 4), (3, "2", 4), (4, "3", 3)]
    assert vocab(out, "action") == [
        (0, "<pad>", 0),
        (1, "<unk>", 0),
        (2, "view", 8),
        (3, "click", 2),
        (4, "like", 1),
    ]
    assert vocab(out, "category") == [(0, "<pad>", 0), (1, "<unk>", 0), (2, "x", 2), (3, "y", 1)]
    assert vocab(out, "tags") == [(0, "<pad>", 0), (1, "<unk>", 0), (2, "q", 2), (3, "p", 1)]


def test_loo_rows_ties_truncation_targets(loo):
    _, out = loo
    # user a in (ts, input order): 3 1 2 1 2 3 1 2 -> ids 4 2 3 2 3 4 2 3 (row 3 was a duplicate)
    assert read_split(out, "test") == {
        "a": [row(4, [3, 4, 2, 3], [300, 400, 500, 600], [2, 4, 2, 2], target=3)],
        "b": [row(3, [0, 3, 2, 4], [0, 10, 10, 20], [0, 2, 2, 2], target=4)],  # b's tie: 2 before 1
    }
    assert read_split(out, "valid") == {
        "a": [row(4, [2, 3, 4, 2], [100, 300, 400, 500], [3, 2, 4, 2], target=2)],
        "b": [row(2, [0, 0, 3, 2], [0, 0, 10, 10], [0, 0, 2, 2], target=2)],
    }
    # b has 3 events: its train prefix has 1 event and no next-item label, so no train row
    assert read_split(out, "train") == {"a": [row(4, [3, 2, 3, 4], [100, 100, 300, 400], [3, 3, 2, 4])]}


def test_loo_item_features_and_train_count(loo):
    m, out = loo
    t = pq.read_table(out / schema.ITEM_FEATURES_FILE).to_pydict()
    assert t["item"] == [0, 1, 2, 3, 4]
    # training part = all but the last two events per user: a: 3 1 2 1 2 3, b: 2
    assert t["train_count"] == [0, 0, 2, 3, 2]
    assert t["category"] == [0, 1, 2, 3, 2]
    assert t["tags"] == [[0, 0], [1, 0], [3, 2], [2, 0], [0, 0]]  # item 3 has no tags
    features = m["features"]
    assert features["item"] == {"kind": "item", "num_embeddings": 5}
    assert features["tags"] == {"kind": "item_multi", "num_embeddings": 4, "max_values": 2}
    assert features["category"] == {"kind": "item_single", "num_embeddings": 4}
    assert features["action"] == {"kind": "event", "num_embeddings": 5}


def test_loo_manifest_and_shards_verify(loo):
    m, out = loo
    manifest = schema.read_manifest(out)
    for split in schema.SPLITS:
        schema.verify_split(manifest, split, check_sha256=True)
    schema.item_features_table(manifest)
    assert manifest.split_kind == "leave_one_out" and manifest.max_len == 3
    assert m["splits"]["test"]["tokens"] == 7 and m["splits"]["valid"]["rows"] == 2
    assert not list(out.parent.glob(".loo.tmp-*"))


def test_time_split_windows_and_unused_events(timecut):
    m, out = timecut
    assert m["stats"]["kept"] == 14 and m["stats"]["duplicates"] == 1
    assert {k: v for k, v in m["filtered"].items() if v} == {"time_split_unused": 1, "too_short": 1}
    # items by kept count: 1 (5), 2 (4), 3 (3), then 4 and 9 (1 each, value order)
    assert [v[1] for v in vocab(out, "item")] == ["<pad>", "<unk>", "1", "2", "3", "4", "9"]
    train = read_split(out, "train")
    # a's training prefix (ts < 300): 3 1 2 1 4 -> windows of 3, stride 2, oldest first
    assert train["a"] == [
        row(3, [4, 2, 3], [50, 100, 100], [2, 2, 3]),
        row(3, [3, 2, 5], [100, 100, 200], [3, 3, 2]),
    ]
    assert train["b"] == [
        row(2, [0, 3, 2], [0, 10, 10], [0, 2, 2]),
        row(3, [2, 4, 6], [10, 20, 30], [2, 2, 2]),
    ]
    assert train["c"] == [row(2, [0, 2, 3], [0, 5, 6], [0, 2, 2])]
    # valid target: a's first event at/after 300; test target: first at/after 450 (history keeps 300, 400)
    assert read_split(out, "valid") == {"a": [row(3, [2, 5, 3], [100, 200, 300], [3, 2, 2], target=3)]}
    assert read_split(out, "test") == {"a": [row(3, [3, 4, 2], [300, 400, 500], [2, 4, 2], target=2)]}
    t = pq.read_table(out / schema.ITEM_FEATURES_FILE).to_pydict()
    assert t["train_count"] == [0, 0, 4, 3, 2, 1, 1]  # events before valid_time only
    assert m["split_kind"] == "time"


@pytest.fixture(scope="module")
def reused(spark, loo, tmp_path_factory):
    """KNOWN again without k-core, reusing the vocabularies of `loo` (items 4 and 9 are new there)."""
    root = tmp_path_factory.mktemp("reuse")
    events, items = write_known(root)
    cfg = config(
        events,
        root / "out",
        items,
        reuse_vocab=str(loo[1]),
        input__item_single_features=["category"],
        input__item_multi_features=["tags"],
        input__max_values_per_item=2,
    )
    return run_prepare(cfg, spark), cfg, root / "out"


def test_reused_vocabularies_map_unseen_values_to_unknown(reused, loo):
    m, _, out = reused
    for name in ("item", "action", "category", "tags"):
        assert (out / "vocab" / f"{name}.parquet").read_bytes() == (
            loo[1] / "vocab" / f"{name}.parquet"
        ).read_bytes()
    assert m["features"]["item"]["num_embeddings"] == 5
    test = read_split(out, "test")
    assert test["a"][0]["item"] == [3, 4, 2, 3]
    assert read_split(out, "valid")["a"][0]["item"] == [1, 3, 4, 2]  # item 4 -> <unk>
    assert test["b"][0]["item"] == [3, 2, 4, 1] and test["b"][0]["target"] == 1  # item 9 -> <unk>


def test_failed_run_leaves_the_old_output_untouched(spark, reused, monkeypatch):
    from spark_jobs import build_sequences

    m, cfg, out = reused
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    killed = out.parent / ".out.tmp-999999999-0dead"  # left by a killed run (its pid is gone)
    killed.mkdir()
    (killed / schema.MANIFEST_FILE).write_text("{}")

    def fail(tmp: str) -> None:
        # the new output is complete in its hidden temp folder; the output path still shows the old one
        assert Path(tmp, schema.MANIFEST_FILE).is_file() and Path(tmp).name.startswith(".out.tmp-")
        assert (out / schema.MANIFEST_FILE).read_bytes() == before[out / schema.MANIFEST_FILE]
        raise RuntimeError("injected failure before commit")

    monkeypatch.setattr(build_sequences, "before_commit", fail)
    with pytest.raises(RuntimeError, match="injected"):
        run_prepare(cfg, spark)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert [
        p.name for p in out.parent.iterdir() if p.name.startswith(".")
    ] == []  # killed run's temp removed too
