"""The synthetic behaviour log: exact counts, schema, determinism, the planted structure, atomic output."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from seqrec.config import ConfigError, GenerateConfig, from_dict
from seqrec.data import synthetic
from seqrec.data.synthetic import ACTIONS, generate, planted_successors, read_success

pytestmark = pytest.mark.unit

SMALL = GenerateConfig(num_events=60_000, num_items=2_000, num_categories=20, events_per_file=20_000, seed=3)


def _events(output: Path) -> dict[str, np.ndarray]:
    """All events in file order, then stably grouped by user (so each user's file order is kept)."""
    files = sorted((output / "events").glob("part-*.parquet"))
    table = pa.concat_tables([pq.read_table(f) for f in files])
    order = np.argsort(table["user_id"].to_numpy(), kind="stable")
    cols = {name: table[name].to_numpy(zero_copy_only=False)[order] for name in table.column_names}
    cols["same_user"] = cols["user_id"][1:] == cols["user_id"][:-1]  # pair (t, t+1) is within a user
    return cols


@pytest.fixture(scope="module")
def log_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synthetic") / "log"
    generate(dataclasses.replace(SMALL, output=str(out)))
    return out


@pytest.fixture(scope="module")
def events(log_dir) -> dict[str, np.ndarray]:
    return _events(log_dir)


# ---------------------------------------------------------------------------------------------- counts


def test_exact_event_count_whole_users_per_file_and_success_counts(log_dir):
    files = sorted((log_dir / "events").glob("part-*.parquet"))
    rows = [pq.ParquetFile(f).metadata.num_rows for f in files]
    assert sum(rows) == SMALL.num_events
    assert len(files) >= 3 and all(r >= SMALL.events_per_file for r in rows[:-1])
    assert all(r < SMALL.events_per_file + SMALL.max_events_per_user for r in rows)
    users_per_file = [set(pq.read_table(f, columns=["user_id"])["user_id"].to_numpy()) for f in files]
    assert sum(len(u) for u in users_per_file) == len(set().union(*users_per_file))  # no user is split
    counts = read_success(log_dir)["counts"]
    assert counts["num_events"] == SMALL.num_events and counts["num_files"] == len(files)
    assert counts["num_users"] == len(set().union(*users_per_file))
    assert sum(counts[f"num_{a}"] for a in ACTIONS) == SMALL.num_events


@pytest.mark.parametrize("num_events", [5, 7, 12, 1_003, 4_999, 20_011])
def test_exact_total_and_length_bounds_for_awkward_sizes(tmp_path, num_events):
    cfg = GenerateConfig(num_events=num_events, num_items=300, num_categories=10, events_per_file=700,
                         min_events_per_user=5, max_events_per_user=60, mean_events_per_user=20.0,
                         output=str(tmp_path / "log"))
    result = generate(cfg)
    ev = _events(tmp_path / "log")
    lengths = np.unique(ev["user_id"], return_counts=True)[1]
    assert ev["user_id"].size == result.num_events == num_events
    assert lengths.min() >= 5 and lengths.max() <= 60 and lengths.size == result.num_users


def test_user_lengths_respect_bounds_and_mean(events):
    lengths = np.unique(events["user_id"], return_counts=True)[1]
    assert lengths.min() >= SMALL.min_events_per_user and lengths.max() <= SMALL.max_events_per_user
    assert abs(lengths.mean() - SMALL.mean_events_per_user) < 0.1 * SMALL.mean_events_per_user
    assert np.median(lengths) < lengths.mean()  # log-normal: long right tail


def test_length_calibration_accounts_for_clipping():
    cfg = GenerateConfig(min_events_per_user=5, max_events_per_user=60, mean_events_per_user=30.0)
    rng = np.random.default_rng(0)
    x = np.clip(np.rint(rng.lognormal(synthetic.length_mu(cfg), 1.0, 400_000)), 5, 60)
    assert abs(x.mean() - 30.0) < 0.3


# ---------------------------------------------------------------------------------------------- schema


def test_schema_and_sparse_ids(log_dir, events):
    schema = pq.read_schema(next((log_dir / "events").glob("part-*.parquet")))
    assert [(f.name, f.type) for f in schema] == [
        ("user_id", pa.int64()), ("item_id", pa.int64()), ("ts", pa.int64()), ("action", pa.string())]
    items = pq.read_table(log_dir / "items.parquet")
    assert items.schema.types == [pa.int64(), pa.string()] and items.column_names == ["item_id", "category"]
    ids = items["item_id"].to_numpy()
    assert ids.size == SMALL.num_items and np.all(np.diff(ids) > 0)
    assert not np.array_equal(ids, np.arange(ids.size))  # not dense: the pipeline must build a vocabulary
    assert set(np.unique(events["item_id"])) <= set(ids)
    assert all(re.fullmatch(r"c\d{3}", c) for c in items["category"].to_pylist())
    assert len(set(items["category"].to_pylist())) == SMALL.num_categories
    assert set(np.unique(events["action"])) == set(ACTIONS)
    users = np.unique(events["user_id"])
    assert users.min() >= 0 and users.max() > 100 * users.size  # sparse user ids


# ---------------------------------------------------------------------------------------------- determinism


def _file_bytes(output: Path) -> dict[str, bytes]:
    return {str(p.relative_to(output)): p.read_bytes() for p in sorted(output.rglob("*")) if p.is_file()}


def test_same_config_gives_identical_bytes_and_other_seed_differs(tmp_path, log_dir):
    again = generate(dataclasses.replace(SMALL, output=str(tmp_path / "again")))
    assert not again.skipped
    assert _file_bytes(tmp_path / "again") == _file_bytes(log_dir)
    generate(dataclasses.replace(SMALL, seed=SMALL.seed + 1, output=str(tmp_path / "other")))
    a, b = _file_bytes(log_dir), _file_bytes(tmp_path / "other")
    assert a["events/part-00000.parquet"] != b["events/part-00000.parquet"]
    assert a["items.parquet"] != b["items.parquet"]


# ---------------------------------------------------------------------------------------------- structure


def test_popularity_is_zipf_like(log_dir, events):
    ids = pq.read_table(log_dir / "items.parquet")["item_id"].to_numpy()
    counts = np.sort(np.bincount(np.searchsorted(ids, events["item_id"]), minlength=ids.size))[::-1]
    top1pct = counts[: ids.size // 100].sum() / counts.sum()
    assert top1pct > 0.3  # 1% of the items take a large share (uniform would be 1%)
    ranks = np.arange(1, 101)
    slope = np.polyfit(np.log(ranks), np.log(counts[:100]), 1)[0]
    assert abs(slope + SMALL.zipf_exponent) < 0.3, slope


def _planted_share(log_dir: Path, cfg: GenerateConfig, events: dict[str, np.ndarray]) -> tuple[float, float]:
    """Share of consecutive pairs whose next item is a planted successor; and the same share with the next
    items shuffled (the chance rate)."""
    ids = pq.read_table(log_dir / "items.parquet")["item_id"].to_numpy()
    succ = planted_successors(cfg)
    prev = np.searchsorted(ids, events["item_id"][:-1][events["same_user"]])
    nxt = events["item_id"][1:][events["same_user"]]
    share = (succ[prev] == nxt[:, None]).any(axis=1).mean()
    chance = (succ[prev] == np.random.default_rng(0).permutation(nxt)[:, None]).any(axis=1).mean()
    return float(share), float(chance)


def test_planted_transitions_are_followed(log_dir, events):
    share, chance = _planted_share(log_dir, SMALL, events)
    p = SMALL.transition_prob
    # A fresh draw can hit a successor by chance, so the share is p plus a little.
    assert p - 0.02 < share < p + (1 - p) * 0.25, share
    assert chance < 0.1 and share > 5 * chance


def test_no_planted_signal_when_transition_prob_is_zero(tmp_path):
    cfg = dataclasses.replace(SMALL, num_events=20_000, transition_prob=0.0, output=str(tmp_path / "log"))
    generate(cfg)
    share, chance = _planted_share(tmp_path / "log", cfg, _events(tmp_path / "log"))
    assert share < 0.2 and abs(share - chance) < 0.15


def test_planted_successors_are_distinct_deterministic_and_mostly_same_category(log_dir):
    succ = planted_successors(SMALL)
    items = pq.read_table(log_dir / "items.parquet")
    ids, cats = items["item_id"].to_numpy(), np.array(items["category"].to_pylist())
    assert succ.shape == (SMALL.num_items, SMALL.num_successors) and succ.dtype == np.int64
    assert np.array_equal(succ, planted_successors(SMALL))
    assert not np.array_equal(succ, planted_successors(dataclasses.replace(SMALL, seed=99)))
    assert np.all(np.sort(succ, axis=1)[:, 1:] != np.sort(succ, axis=1)[:, :-1])  # distinct per row
    assert not (succ == ids[:, None]).any() and np.isin(succ, ids).all()
    same = (cats[np.searchsorted(ids, succ)] == cats[:, None]).mean()
    assert 0.7 < same < 0.95


def test_timestamps_non_decreasing_per_user_with_sessions_and_ties(events):
    ts, same = events["ts"], events["same_user"]
    assert ts.min() >= SMALL.start_time
    gaps = np.diff(ts)[same]
    assert gaps.min() >= 0  # in file order, every user's events never go back in time
    assert 0.01 < (gaps == 0).mean() < 0.06  # same-second ties exist, as in real logs
    within, between = (gaps < 600).mean(), (gaps >= 2 * 3600).mean()
    assert 0.8 < within < 0.92 and 0.08 < between < 0.16  # bimodal: sessions, then hours/days apart
    assert ((gaps >= 3600) & (gaps < 2 * 3600)).mean() < 0.01
    assert np.median(gaps[gaps >= 2 * 3600]) > 6 * 3600


def test_action_mix_and_purchases_follow_clicks(events):
    action, same = events["action"], events["same_user"]
    share = {a: (action == a).mean() for a in ACTIONS}
    assert share["view"] > 0.6 and share["view"] > share["click"] > share["like"]
    assert 0.01 < share["purchase"] < 0.1
    nxt, prev = action[1:][same], action[:-1][same]
    after_click = (nxt[prev == "click"] == "purchase").mean()
    after_view = (nxt[prev == "view"] == "purchase").mean()
    assert after_click > 5 * after_view


# ---------------------------------------------------------------------------------------------- atomic output


def test_skip_when_same_config_and_replace_when_different(tmp_path):
    cfg = dataclasses.replace(SMALL, num_events=10_000, output=str(tmp_path / "log"))
    first = generate(cfg)
    part = tmp_path / "log" / "events" / "part-00000.parquet"
    stamp = part.stat().st_mtime_ns, part.stat().st_ino
    second = generate(cfg)
    assert second.skipped and not first.skipped and second.num_events == first.num_events == 10_000
    assert (part.stat().st_mtime_ns, part.stat().st_ino) == stamp
    assert "skipped" in second.summary() and "10,000" in second.summary()
    third = generate(dataclasses.replace(cfg, num_events=12_000))
    assert not third.skipped and read_success(tmp_path / "log")["counts"]["num_events"] == 12_000
    assert sum(pq.ParquetFile(p).metadata.num_rows for p in (tmp_path / "log" / "events").iterdir()) == 12_000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["log"]  # no temporary folders left


def test_interrupted_run_leaves_nothing_complete_looking(tmp_path, monkeypatch):
    cfg = dataclasses.replace(SMALL, num_events=5_000, events_per_file=1_000, output=str(tmp_path / "log"))
    real, calls = synthetic.make_block, []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(synthetic, "make_block", failing)
    with pytest.raises(KeyboardInterrupt):
        generate(cfg)
    assert list(tmp_path.iterdir()) == []  # no output, no temporary folder
    monkeypatch.setattr(synthetic, "make_block", real)
    generate(cfg)
    calls.clear()
    monkeypatch.setattr(synthetic, "make_block", failing)
    with pytest.raises(KeyboardInterrupt):
        generate(dataclasses.replace(cfg, seed=7))
    # The earlier complete output survives a failed replacement untouched.
    assert read_success(tmp_path / "log")["config"]["seed"] == cfg.seed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["log"]


def test_stale_temporary_folder_of_a_killed_run_is_removed(tmp_path):
    stale = tmp_path / ".log.tmp-999999999"  # above any pid_max: that process cannot exist
    (stale / "events").mkdir(parents=True)
    generate(dataclasses.replace(SMALL, num_events=2_000, output=str(tmp_path / "log")))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["log"]
    assert json.loads((tmp_path / "log" / "_SUCCESS").read_text())["generator_version"] == synthetic.GENERATOR_VERSION


def test_cli_generate_writes_and_prints_summary(tmp_path, capsys):
    from seqrec.cli import main

    assert main(["generate", "--events", "3000", "--seed", "5", "--output", str(tmp_path / "log")]) == 0
    out = capsys.readouterr().out
    assert "3,000" in out and str(tmp_path / "log") in out
    assert read_success(tmp_path / "log")["config"]["seed"] == 5


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ({"num_successors": 0}, "generate.num_successors"),
        ({"clusters_per_user": 60}, "generate.clusters_per_user"),
        ({"mean_events_per_user": 3.0}, "generate.mean_events_per_user"),
        ({"num_categories": 9000}, "generate.num_categories"),
        ({"num_events": 3}, "generate.num_events"),
        ({"transition_prob": 1.5}, "generate.transition_prob"),
    ],
)
def test_config_validation_names_the_key(override, key):
    with pytest.raises(ConfigError, match=re.escape(key)):
        from_dict({"generate": override})


@pytest.mark.parametrize("n", [1, 2, 7, 1_000])
def test_sorted_keys_search_equals_numpy_searchsorted(n):
    rng = np.random.default_rng(n)
    keys = np.sort(np.round(rng.random(n) * 8, 1))  # rounding makes ties between keys
    keys[-1] = 8.0
    sk = synthetic.SortedKeys.build(keys, top=8.0)
    x = np.concatenate([rng.random(5_000) * 8, keys, np.nextafter(keys, 0), np.nextafter(keys, 9), [0.0]])
    x = x[x < 8.0].reshape(1, -1)  # shape is kept
    assert np.array_equal(sk.search(x), np.searchsorted(keys, x, side="right"))
