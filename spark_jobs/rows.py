"""Per-user sequence logic, vectorised with numpy over blocks of whole users.

Runs in Spark's Python workers (imports no pyspark): once to count (spark_jobs/tasks.py, stats
pass) and once to write (the same analysis again, then rows). A block holds complete users, their
events sorted by (user, timestamp, input position `_row`): equal timestamps keep input order.

Per user, in that order:
1. exact duplicates (same timestamp, item, action, rating and context values) keep their first
   occurrence; positions `pos` (1-based) count the remaining events, `n` is their number;
2. users with n < `filters.min_user_events` are dropped (`min_user_events`);
3. the split, `leave_one_out`: the last event is the test target, the second-to-last the validation
   target; test row = events[1..n], valid row = events[1..n-1], train row = events[1..n-2]. A user
   needs n >= 3 (else `too_short`); the train row is emitted when it has >= 2 events.
   `time` (valid_time V <= test_time T): train row = every event with ts < V (emitted when >= 2);
   valid row: the first event with V <= ts < T is the target, every event before it (ts < V) the
   history; test row: the first event with ts >= T is the target, every event before it the
   history (validation-period events included). Rows need a non-empty history. Events after the
   last one a row uses are `time_split_unused`; a user with no row at all is `too_short`;
4. the training part (what `train_count` counts) is pos <= n-2 (leave_one_out) or ts < V (time):
   validation and test targets never leak into it;
5. rows keep the most recent W = max_len + 1 events of their prefix, LEFT-padded with 0. With
   `sliding_window`, a training prefix of m > W events gives windows ending at m, m - s, m - 2s, ...
   (s = window_stride, default max_len) until one starts at the first event, oldest first: with
   s = max_len every event of the prefix is a label exactly once.

Legend: E events in the block, U users, R rows of a split, W row width.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SPLITS = ("train", "valid", "test")
USER_REASONS = ("min_user_events", "too_short", "time_split_unused")


@dataclass(frozen=True, slots=True)
class RowParams:
    """The settings of the per-user logic (plain values: shipped to the Python workers)."""

    kind: str  # leave_one_out | time
    max_len: int
    sliding_window: bool
    stride: int
    min_user_events: int
    valid_time: int = 0
    test_time: int = 0

    @property
    def width(self) -> int:
        return self.max_len + 1


@dataclass(slots=True)
class Analysis:
    """What the per-user logic decided for a block."""

    kept_E: np.ndarray  # bool: the event is in the output (not a duplicate, not filtered)
    train_E: np.ndarray  # bool: kept and in the training part
    duplicate_E: np.ndarray  # bool
    reason_counts: dict[str, int]  # events removed per USER_REASONS entry
    user_U: np.ndarray  # index of each kept user's first event in the block (kept users only)
    ends: dict[str, np.ndarray]  # per split, per kept user: prefix length of its row (< 2: no row)
    kept_start_U: np.ndarray  # per kept user: offset of its first kept event among kept events


def _starts(new_E: np.ndarray) -> np.ndarray:
    return np.flatnonzero(new_E)


def duplicates(group_E: np.ndarray, keys: list[np.ndarray], row_E: np.ndarray) -> np.ndarray:
    """True for events equal (all `keys`) to an earlier event (lower `row_E`) of the same group.

    Groups (user, timestamp) are contiguous; only groups of 2+ events need a look.
    """
    dup_E = np.zeros(len(group_E), dtype=bool)
    if len(group_E) < 2:
        return dup_E
    size_G = np.bincount(group_E)
    idx = np.flatnonzero(size_G[group_E] > 1)
    if len(idx) == 0:
        return dup_E
    order = np.lexsort([row_E[idx], *[k[idx] for k in reversed(keys)], group_E[idx]])
    sorted_idx = idx[order]
    same = group_E[sorted_idx][1:] == group_E[sorted_idx][:-1]
    for k in keys:
        same &= k[sorted_idx][1:] == k[sorted_idx][:-1]
    dup_E[sorted_idx[1:][same]] = True
    return dup_E


def _ends(n_U: np.ndarray, cv_U: np.ndarray, ct_U: np.ndarray, kind: str) -> dict[str, np.ndarray]:
    if kind == "time":
        return {
            "train": np.where(cv_U >= 2, cv_U, 0),
            "valid": np.where((ct_U > cv_U) & (cv_U >= 1), cv_U + 1, 0),
            "test": np.where((n_U > ct_U) & (ct_U >= 1), ct_U + 1, 0),
        }
    return {
        "train": np.where(n_U >= 4, n_U - 2, 0),
        "valid": np.where(n_U >= 3, n_U - 1, 0),
        "test": np.where(n_U >= 3, n_U, 0),
    }


def analyze(
    new_user_E: np.ndarray, ts_E: np.ndarray, row_E: np.ndarray, keys: list[np.ndarray], p: RowParams
) -> Analysis:
    """Steps 1-4 of the module docstring for one block. `new_user_E` marks each user's first event;
    `keys` are the event's content codes besides the timestamp (item, action, rating, context)."""
    if len(ts_E) == 0:
        empty = np.zeros(0, dtype=np.int64)
        return Analysis(
            new_user_E,
            new_user_E,
            new_user_E,
            dict.fromkeys(USER_REASONS, 0),
            empty,
            {s: empty for s in SPLITS},
            empty,
        )
    user_E = np.cumsum(new_user_E) - 1
    new_group_E = new_user_E.copy()
    new_group_E[1:] |= ts_E[1:] != ts_E[:-1]
    dup_E = duplicates(np.cumsum(new_group_E) - 1, keys, row_E)
    live_E = ~dup_E
    num_users = int(new_user_E.sum())
    n_U = np.bincount(user_E, weights=live_E, minlength=num_users).astype(np.int64)
    cv_U = np.bincount(user_E, weights=live_E & (ts_E < p.valid_time), minlength=num_users).astype(np.int64)
    ct_U = np.bincount(user_E, weights=live_E & (ts_E < p.test_time), minlength=num_users).astype(np.int64)
    if p.kind != "time":
        cv_U, ct_U = n_U - 2, n_U - 1
    ends = _ends(n_U, cv_U, ct_U, p.kind)
    last_U = np.maximum.reduce([ends["train"], ends["valid"], ends["test"]])
    enough_U = n_U >= p.min_user_events
    # position among the user's live events (1-based)
    live_before = np.cumsum(live_E) - live_E
    pos_E = live_before - live_before[_starts(new_user_E)][user_E] + 1
    user_reason_E = np.where(
        ~enough_U[user_E], 0, np.where(last_U[user_E] == 0, 1, np.where(pos_E > last_U[user_E], 2, -1))
    )
    kept_E = live_E & (user_reason_E < 0)
    counts = np.bincount(user_reason_E[live_E & (user_reason_E >= 0)], minlength=3)
    train_limit_U = n_U - 2 if p.kind != "time" else cv_U
    train_E = kept_E & (pos_E <= train_limit_U[user_E])
    keep_U = enough_U & (last_U > 0)
    kept_per_user = np.bincount(user_E, weights=kept_E, minlength=num_users).astype(np.int64)[keep_U]
    return Analysis(
        kept_E=kept_E,
        train_E=train_E,
        duplicate_E=dup_E,
        reason_counts={r: int(c) for r, c in zip(USER_REASONS, counts, strict=True)},
        user_U=_starts(new_user_E)[keep_U],
        ends={s: e[keep_U] for s, e in ends.items()},
        kept_start_U=np.cumsum(kept_per_user) - kept_per_user,
    )


def windows(
    end_U: np.ndarray, p: RowParams, sliding: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(user index, window index k, start, length) of every row; users in order, windows oldest first."""
    w = p.width
    has_U = end_U >= 2
    count_U = (
        np.where(has_U, 1 + (np.maximum(end_U - w, 0) + p.stride - 1) // p.stride, 0)
        if sliding
        else has_U.astype(np.int64)
    )
    user_R = np.repeat(np.arange(len(end_U)), count_U)
    k_R = np.arange(len(user_R)) - np.repeat(np.cumsum(count_U) - count_U, count_U)
    stop_R = end_U[user_R] - (count_U[user_R] - 1 - k_R) * p.stride
    start_R = np.maximum(stop_R - w, 0)
    return user_R, k_R, start_R, stop_R - start_R


def num_rows(a: Analysis, p: RowParams) -> dict[str, int]:
    return {s: len(windows(a.ends[s], p, p.sliding_window and s == "train")[0]) for s in SPLITS}


def gather(
    values_E: np.ndarray,
    offset_U: np.ndarray,
    user_R: np.ndarray,
    start_R: np.ndarray,
    len_R: np.ndarray,
    width: int,
) -> np.ndarray:
    """(R x W) matrix: row r holds values_E[offset[user] + start : + len], left-padded with 0."""
    out_RW = np.zeros((len(user_R), width), dtype=values_E.dtype)
    total = int(len_R.sum())
    if total:
        row_T = np.repeat(np.arange(len(user_R)), len_R)
        j_T = np.arange(total) - np.repeat(np.cumsum(len_R) - len_R, len_R)
        src_T = np.repeat(offset_U[user_R] + start_R, len_R) + j_T
        out_RW[row_T, width - len_R[row_T] + j_T] = values_E[src_T]
    return out_RW


def build_rows(
    a: Analysis, kept_columns: dict[str, np.ndarray], p: RowParams
) -> dict[str, dict[str, np.ndarray]]:
    """{split: {"user": kept-user index per row, "length", "<col>": (R x W) matrix}} from the kept
    events' columns (`ts`, `item`, event features), users contiguous, each user's events in order."""
    out: dict[str, dict[str, np.ndarray]] = {}
    for split in SPLITS:
        user_R, _, start_R, len_R = windows(a.ends[split], p, p.sliding_window and split == "train")
        rows = {"user": user_R, "length": len_R.astype(np.int32)}
        for name, values_E in kept_columns.items():
            rows[name] = gather(values_E, a.kept_start_U, user_R, start_R, len_R, p.width)
        out[split] = rows
    return out
