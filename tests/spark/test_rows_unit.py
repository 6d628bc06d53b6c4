"""The vectorised per-user logic (spark_jobs/rows.py) and the prepare config rules, without Spark."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from seqrec.config import ConfigError, load_config
from spark_jobs.rows import RowParams, analyze, duplicates, gather, windows
from spark_jobs.write import _spark_hash_int, assign_buckets, row_groups

pytestmark = pytest.mark.unit


def params(**kw) -> RowParams:
    base = {"kind": "leave_one_out", "max_len": 3, "sliding_window": True, "stride": 3, "min_user_events": 1}
    return RowParams(**{**base, **kw})


@settings(max_examples=200, deadline=None)
@given(end=st.integers(0, 60), max_len=st.integers(1, 9), stride_frac=st.floats(0.01, 1.0))
def test_sliding_windows_label_every_event_once(end, max_len, stride_frac):
    stride = max(1, round(max_len * stride_frac))
    p = params(max_len=max_len, stride=stride)
    user, k, start, length = windows(np.array([end]), p, sliding=True)
    if end < 2:
        assert len(user) == 0
        return
    assert list(k) == list(range(len(k))) and (length >= 2).all() and (length <= max_len + 1).all()
    assert start[0] == 0 and start[-1] + length[-1] == end  # oldest window starts at 0, newest ends at end
    labels = np.concatenate([np.arange(s + 1, s + n) for s, n in zip(start, length, strict=True)])
    assert set(labels) == set(range(1, end))  # every event but the first is a label
    if stride == max_len:
        assert len(labels) == end - 1  # ... exactly once


def test_gather_left_pads():
    values = np.array([10, 11, 12, 13, 20, 21])
    out = gather(
        values, np.array([0, 4]), np.array([0, 1, 0]), np.array([1, 0, 0]), np.array([3, 2, 1]), width=4
    )
    assert out.tolist() == [[0, 11, 12, 13], [0, 0, 20, 21], [0, 0, 0, 10]]


def test_duplicates_are_found_when_not_adjacent():
    group = np.array([0, 0, 0, 1, 1])  # (user, ts) groups
    item = np.array([5, 6, 5, 5, 5])
    row = np.array([0, 1, 2, 3, 4])
    assert duplicates(group, [item], row).tolist() == [False, False, True, False, True]


def test_analyze_loo_counts_and_reasons():
    # users: a has 4 events (one duplicate), b has 2 -> too short, c has 1 and min_user_events = 2
    new_user = np.array([1, 0, 0, 0, 0, 1, 0, 1], dtype=bool)
    ts = np.array([1, 2, 2, 3, 4, 1, 2, 5])
    item = np.array([7, 8, 8, 9, 7, 7, 8, 9])
    a = analyze(new_user, ts, np.arange(8), [item], params(min_user_events=2, sliding_window=False))
    assert a.duplicate_E.tolist() == [False, False, True, False, False, False, False, False]
    assert a.reason_counts == {"min_user_events": 1, "too_short": 2, "time_split_unused": 0}
    assert a.kept_E.tolist() == [True, True, False, True, True, False, False, False]
    assert a.train_E.tolist() == [True, True, False, False, False, False, False, False]
    assert {s: e.tolist() for s, e in a.ends.items()} == {"train": [2], "valid": [3], "test": [4]}


def test_analyze_time_split():
    # one user, ts 1 2 3 | valid cut 3 | 4 | test cut 5 | 5 6: valid target ts 3, test target ts 5
    new_user = np.array([1, 0, 0, 0, 0, 0], dtype=bool)
    ts = np.array([1, 2, 3, 4, 5, 6])
    a = analyze(new_user, ts, np.arange(6), [ts], params(kind="time", valid_time=3, test_time=5))
    assert {s: e.tolist() for s, e in a.ends.items()} == {"train": [2], "valid": [3], "test": [5]}
    assert a.reason_counts["time_split_unused"] == 1 and a.train_E.sum() == 2


def test_row_groups_reach_world_size_and_stay_even():
    from seqrec.config import ShardConfig

    cfg = ShardConfig(files_per_split=3, max_world_size=8, row_group_rows=100)
    groups = row_groups([250, 30, 1], cfg, "valid")
    assert sum(map(len, groups)) == 8 and [sum(g) for g in groups] == [250, 30, 1]
    assert all(max(g) - min(g) <= 1 for g in groups)
    with pytest.raises(ValueError, match="fewer than prepare.shards.max_world_size"):
        row_groups([3, 2], cfg, "test")


def test_bucket_assignment_balances_and_hash_matches_spark_formula():
    counts = {b: (b % 7) + 1 for b in range(1024)}
    group_of = assign_buckets(counts, 4)
    loads = np.bincount(group_of, weights=[counts[b] for b in range(1024)], minlength=4)
    assert loads.max() - loads.min() <= 7
    assert [_spark_hash_int(v) for v in (0, 1, -1, 42)] == [933211791, -559580957, -1604776387, 29417773]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("prepare.split.kind='time'", "valid_time and prepare.split.test_time are required"),
        ("prepare.input.format='sequence-lines'", "timestamp_format = 'order'"),
        ("prepare.filters.min_rating=3.0", "needs prepare.input.columns.rating"),
        ("prepare.input.columns.context=['action']", "mapped to two roles"),
        ("prepare.input.item_single_features=['item']", "feature names must be unique"),
        ("prepare.split.window_stride=99", "window_stride must be in"),
    ],
)
def test_prepare_config_rules(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])
