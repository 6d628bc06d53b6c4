"""The built-in synthetic behaviour log (`seqrec generate`): a short-video / e-commerce shaped event log
with a planted sequential signal, written as streaming Parquet.

What is in the log:
- items with Zipf popularity (`zipf_exponent`), spread evenly over `num_categories` categories;
- users with `clusters_per_user` taste clusters (categories chosen by category popularity) and their
  own weights over them; per-user lengths log-normal with mean `mean_events_per_user`, clipped;
- the planted signal: every item has `num_successors` successors (mostly in its own category, drawn
  by popularity). With probability `transition_prob` the next item is a uniformly chosen successor of
  the previous item, otherwise a fresh draw from the user's clusters by popularity. A sequence model
  can learn "after X comes one of {a, b, c}"; a popularity ranking cannot;
- actions view/click/like/purchase (mostly views; purchases rare, but likely right after a click);
- sessions: seconds to minutes between events of a session (with some exact same-second ties),
  hours to days between sessions; per-user timestamps never decrease.

Output layout under `cfg.output` (written to a hidden sibling folder, renamed when complete):

    events/part-NNNNN.parquet   user_id int64, item_id int64, ts int64 (unix s), action string
    items.parquet               item_id int64, category string ("c007"), ascending item_id
    _SUCCESS                    written last: JSON of the generator config and the counts

Generation is streaming: users are made in blocks of about one million events, each block a Parquet
row group (sorted by time, as a real log is), so memory stays bounded by one block whatever
`num_events` is. Every random draw comes from a seed sequence (seed, stream[, block]), so the same
config gives byte-identical files.

Example:
    result = generate(GenerateConfig(num_events=100_000, output="/tmp/log"))
    print(result.summary())
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from seqrec.config import GenerateConfig

log = logging.getLogger(__name__)

GENERATOR_VERSION = 1
"""Bumped whenever the same config would give different bytes: a stored _SUCCESS from another version
is not reused."""
SUCCESS_FILE = "_SUCCESS"
EVENTS_DIR = "events"
ITEMS_FILE = "items.parquet"
ACTIONS = ("view", "click", "like", "purchase")
EVENT_SCHEMA = pa.schema(
    [("user_id", pa.int64()), ("item_id", pa.int64()), ("ts", pa.int64()), ("action", pa.string())]
)

# Shape of the log (not config: they make it look like a real log, nothing downstream depends on them).
_SAME_CATEGORY_SUCCESSOR_P = 0.8  # planted successors mostly stay in the category, as "related items" do
_BASE_ACTION_CDF = (0.75, 0.93)  # view 75%, click 18%, like 7% before purchases are placed
_PURCHASE_AFTER_CLICK_P = 0.25  # a purchase is likely right after a click ...
_PURCHASE_BASE_P = 0.01  # ... and rare otherwise (about 5% of events overall)
_NEW_SESSION_P = 0.12  # mean session length about 8 events
_WITHIN_GAP_LOG = (math.log(30.0), 1.0)  # median 30 s, seconds to minutes
_BETWEEN_GAP_LOG = (math.log(18 * 3600.0), 1.0)  # median 18 h, hours to days
_TIE_P = 0.03  # share of within-session gaps that are exactly 0 s (same-second events)
_START_SPREAD_S = 30 * 86400  # users start uniformly over 30 days after start_time
_LENGTH_SIGMA = 1.0  # log-normal shape of per-user lengths
_BLOCK_EVENTS = 1 << 20  # events per generated block (memory bound)
_ITEM_ID_BASE = 1_000_000
_USER_ID_MODULUS = 1 << 40  # user ids: an affine bijection of the user index mod 2^40
# Independent random streams: a change in one part of the generator does not shift the others.
_STREAM_CATALOG, _STREAM_SUCCESSORS, _STREAM_LENGTHS, _STREAM_BLOCK, _STREAM_USER_IDS = range(5)


@dataclass(frozen=True)
class GenerateResult:
    """What `generate` wrote (or found already written)."""

    output: Path
    num_events: int
    num_users: int
    num_items: int
    num_files: int
    seconds: float
    skipped: bool

    def summary(self) -> str:
        status = "skipped (same config already complete)" if self.skipped else "written"
        rows = [
            ("events", f"{self.num_events:,}"),
            ("users", f"{self.num_users:,}"),
            ("items", f"{self.num_items:,}"),
            ("files", f"{self.num_files:,}"),
            ("seconds", f"{self.seconds:.1f}"),
            ("output", str(self.output)),
        ]
        return "\n".join([f"synthetic log {status}"] + [f"  {k:<8} {v}" for k, v in rows])


# --------------------------------------------------------------------------------------------------
# Catalog: ids, categories, popularity, planted successors
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SortedKeys:
    """`np.searchsorted(keys, x, side="right")` in O(1) expected time per query, for x in [0, top).

    A guide table over 2N equal buckets gives each query a start index close to its answer, then a few
    vectorised steps finish it. A binary search over a large catalog is ~20 dependent cache misses per
    draw: for 1M items this is about 3x faster than np.searchsorted."""

    keys: np.ndarray  # [N] non-decreasing
    guide: np.ndarray  # [2N + 1] guide[b] = searchsorted(keys, b / scale, side="right")
    scale: float  # buckets per unit of x

    @classmethod
    def build(cls, keys: np.ndarray, top: float) -> SortedKeys:
        scale = 2 * keys.size / top
        return cls(keys, np.searchsorted(keys, np.arange(2 * keys.size + 1) / scale, side="right"), scale)

    def search(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        # Start one bucket early, so float rounding at a bucket edge can never start past the answer.
        bucket = np.clip((x * self.scale).astype(np.int64) - 1, 0, self.guide.size - 1)
        idx, last = self.guide[bucket].ravel(), self.keys.size - 1
        x = x.ravel()
        todo = np.flatnonzero((idx <= last) & (self.keys[np.minimum(idx, last)] <= x))
        while todo.size:  # few queries need more than one step
            idx[todo] += 1
            i = idx[todo]
            todo = todo[(i <= last) & (self.keys[np.minimum(i, last)] <= x[todo])]
        return idx.reshape(bucket.shape)


@dataclass(frozen=True)
class Catalog:
    """Items as rows 0..N-1 in ascending item_id order (the row order of items.parquet)."""

    item_ids: np.ndarray  # [N] int64, ascending
    category: np.ndarray  # [N] int64 category index
    weight: np.ndarray  # [N] float64 Zipf popularity weight
    by_category: np.ndarray  # [N] item rows grouped by category
    cat_start: np.ndarray  # [C + 1] offsets of each category in by_category
    cat_key: SortedKeys  # [N] category + within-category cumulative popularity share, in by_category order
    cat_mass: np.ndarray  # [C] total popularity weight of each category
    global_cdf: SortedKeys  # [N] cumulative popularity share over all items
    successors: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), dtype=np.int64))
    """[N, S] item rows of the planted successors (filled in last by build_catalog)."""


def build_catalog(cfg: GenerateConfig) -> Catalog:
    """The deterministic item catalog of a config (everything but the users)."""
    n, c = cfg.num_items, cfg.num_categories
    rng = np.random.default_rng([cfg.seed, _STREAM_CATALOG])
    item_ids = np.sort(rng.choice(8 * n, size=n, replace=False)).astype(np.int64) + _ITEM_ID_BASE
    weight = (rng.permutation(n) + 1.0) ** -cfg.zipf_exponent  # popularity rank is unrelated to id
    category = rng.permutation(np.arange(n) % c)  # equal-size categories, none empty
    by_category = np.argsort(category, kind="stable")
    cat_start = np.searchsorted(category[by_category], np.arange(c + 1))
    cat_mass = np.bincount(category, weights=weight, minlength=c)
    cum = np.cumsum(weight[by_category])
    within = cum - np.repeat(cum[cat_start[:-1]] - weight[by_category][cat_start[:-1]], np.diff(cat_start))
    cat_key = SortedKeys.build(category[by_category] + within / cat_mass[category[by_category]], top=c)
    global_cdf = SortedKeys.build(np.cumsum(weight) / weight.sum(), top=1.0)
    partial = Catalog(item_ids, category, weight, by_category, cat_start, cat_key, cat_mass, global_cdf)
    return dataclasses.replace(partial, successors=_plant_successors(cfg, partial))


def _sample_in_category(cat: Catalog, category: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Item rows drawn by popularity within the given categories (u: uniforms in [0, 1))."""
    pos = cat.cat_key.search(category + u)
    # Rounding can put the key just past its category's last item: clamp into the category.
    pos = np.clip(pos, cat.cat_start[category], cat.cat_start[category + 1] - 1)
    return cat.by_category[pos]


def _sample_global(cat: Catalog, u: np.ndarray) -> np.ndarray:
    return np.minimum(cat.global_cdf.search(u), len(cat.weight) - 1)


def _first_distinct(rows: np.ndarray, cand: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row of `cand` ([T, M], -1 = empty), the first k distinct values that are not the row's own
    item, padded with -1; and whether the row got k of them."""
    order = np.argsort(cand, axis=1, kind="stable")
    srt = np.take_along_axis(cand, order, axis=1)
    dup_sorted = np.zeros_like(srt, dtype=bool)
    dup_sorted[:, 1:] = srt[:, 1:] == srt[:, :-1]  # stable sort: the earliest copy stays valid
    dup = np.empty_like(dup_sorted)
    np.put_along_axis(dup, order, dup_sorted, axis=1)
    valid = (cand >= 0) & ~dup & (cand != rows[:, None])
    pick = np.argsort(~valid, axis=1, kind="stable")[:, :k]
    out = np.where(np.take_along_axis(valid, pick, axis=1), np.take_along_axis(cand, pick, axis=1), -1)
    return out, valid.sum(axis=1) >= k


def _plant_successors(cfg: GenerateConfig, cat: Catalog) -> np.ndarray:
    """[N, S] successor rows: distinct, never the item itself, mostly from its own category."""
    rng = np.random.default_rng([cfg.seed, _STREAM_SUCCESSORS])
    n, k = cfg.num_items, cfg.num_successors
    succ = np.full((n, k), -1, dtype=np.int64)
    todo, rounds, m = np.arange(n), 0, 2 * k + 2
    while todo.size:  # a row is redrawn until it has k distinct successors (fast: few rows repeat)
        same = rng.random((todo.size, m)) < _SAME_CATEGORY_SUCCESSOR_P
        u = rng.random((todo.size, m))
        cand = np.empty((todo.size, m), dtype=np.int64)
        cand[same] = _sample_in_category(cat, np.broadcast_to(cat.category[todo][:, None], same.shape)[same], u[same])
        cand[~same] = _sample_global(cat, u[~same])
        if rounds >= 20:  # tiny categories and steep popularity: finish with uniform draws
            cand = rng.integers(n, size=(todo.size, m))
        picked, done = _first_distinct(todo, np.concatenate([succ[todo], cand], axis=1), k)
        succ[todo], todo, rounds = picked, todo[~done], rounds + 1
    return succ


def planted_successors(cfg: GenerateConfig) -> np.ndarray:
    """[num_items, num_successors] int64 item ids: row r holds the planted successors of the item in
    row r of items.parquet (ascending item_id). Deterministic from the config's seed."""
    cat = build_catalog(cfg)
    return cat.item_ids[cat.successors]


# --------------------------------------------------------------------------------------------------
# Users: lengths (a sequential stream, so the total is exact) and one block of events
# --------------------------------------------------------------------------------------------------


def _normal_cdf(x: float) -> float:
    return 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))


def _clipped_lognormal_mean(mu: float, sigma: float, lo: float, hi: float) -> float:
    a, b = (math.log(lo) - mu) / sigma, (math.log(hi) - mu) / sigma
    inside = math.exp(mu + sigma**2 / 2) * (_normal_cdf(b - sigma) - _normal_cdf(a - sigma))
    return lo * _normal_cdf(a) + inside + hi * (1.0 - _normal_cdf(b))


def length_mu(cfg: GenerateConfig) -> float:
    """The log-normal mu whose lengths, clipped to [min, max], have mean `mean_events_per_user`."""
    lo, hi = float(cfg.min_events_per_user), float(cfg.max_events_per_user)
    a, b = math.log(lo) - 10.0, math.log(hi) + 10.0
    for _ in range(100):  # bisection: the clipped mean grows with mu
        mid = (a + b) / 2
        a, b = (mid, b) if _clipped_lognormal_mean(mid, _LENGTH_SIGMA, lo, hi) < cfg.mean_events_per_user else (a, mid)
    return (a + b) / 2


class _LengthStream:
    """Per-user lengths in user order, drawn from one random stream whatever the block sizes are."""

    def __init__(self, cfg: GenerateConfig) -> None:
        self._cfg = cfg
        self._rng = np.random.default_rng([cfg.seed, _STREAM_LENGTHS])
        self._mu = length_mu(cfg)
        self._buf = np.zeros(0, dtype=np.int64)

    def _refill(self) -> None:
        x = np.rint(self._rng.lognormal(self._mu, _LENGTH_SIGMA, size=8192))
        self._buf = np.clip(x, self._cfg.min_events_per_user, self._cfg.max_events_per_user).astype(np.int64)

    def take(self, target: int) -> np.ndarray:
        """The next users, as few as make at least `target` events together."""
        parts, total = [], 0
        while total < target:
            if not self._buf.size:
                self._refill()
            n = min(int(np.searchsorted(np.cumsum(self._buf), target - total)) + 1, self._buf.size)
            parts.append(self._buf[:n])
            total += int(parts[-1].sum())
            self._buf = self._buf[n:]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    def finish(self, lengths: np.ndarray, remaining: int) -> np.ndarray:
        """Complete a last block to exactly `remaining` events with every user in [min, max]."""
        lengths = np.concatenate([lengths, self.take(remaining - int(lengths.sum()))])
        lengths[-1] -= int(lengths.sum()) - remaining  # still >= 1: the user before it ended short
        if lengths[-1] >= self._cfg.min_events_per_user:
            return lengths
        short, lengths = int(lengths[-1]), lengths[:-1].copy()
        for i in range(lengths.size - 1, -1, -1):  # hand its few events to earlier users with room
            add = min(short, self._cfg.max_events_per_user - int(lengths[i]))
            lengths[i] += add
            short -= add
            if not short:
                return lengths
        log.warning("generate: all users are at max_events_per_user; the last user has %d events", short)
        return np.append(lengths, short)


def _choose_clusters(rng: np.random.Generator, cat_mass: np.ndarray, num_users: int, k: int) -> np.ndarray:
    """[U, k] distinct categories per user, chosen by category popularity (Gumbel top-k)."""
    log_mass = np.log(cat_mass)
    step = max(1, (1 << 22) // cat_mass.size)  # bound the [users, categories] key matrix
    out = []
    for s in range(0, num_users, step):
        keys = log_mass - np.log(-np.log(rng.random((min(step, num_users - s), cat_mass.size))))
        out.append(np.argpartition(-keys, k - 1, axis=1)[:, :k])
    return np.concatenate(out) if out else np.zeros((0, k), dtype=np.int64)


def _items(rng: np.random.Generator, cfg: GenerateConfig, cat: Catalog, lengths: np.ndarray,
           user_of: np.ndarray, first: np.ndarray) -> np.ndarray:
    """Item rows of every event: fresh taste draws, and planted transitions from the previous item."""
    num_users, e = lengths.size, int(lengths.sum())
    clusters = _choose_clusters(rng, cat.cat_mass, num_users, cfg.clusters_per_user)
    cum_w = np.cumsum(rng.dirichlet(np.ones(cfg.clusters_per_user), size=num_users), axis=1)
    trans = (rng.random(e) < cfg.transition_prob) & ~first
    fresh = np.flatnonzero(~trans)
    slot = (rng.random(fresh.size)[:, None] > cum_w[user_of[fresh], :-1]).sum(axis=1)
    rows = np.empty(e, dtype=np.int64)
    rows[fresh] = _sample_in_category(cat, clusters[user_of[fresh], slot], rng.random(fresh.size))
    # A transition at t depends on t-1; its depth is its distance to the last fresh draw (a user's first
    # event is always fresh). Resolving depth 1, 2, ... in turn vectorises the chain.
    tpos = np.flatnonzero(trans)
    choice = rng.integers(cfg.num_successors, size=tpos.size)
    depth = tpos - np.maximum.accumulate(np.where(trans, 0, np.arange(e)))[tpos]
    order = np.argsort(depth, kind="stable")
    bounds = np.searchsorted(depth[order], np.arange(1, int(depth.max(initial=0)) + 2))
    for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
        sel = order[lo:hi]
        rows[tpos[sel]] = cat.successors[rows[tpos[sel] - 1], choice[sel]]
    return rows


def _actions(rng: np.random.Generator, first: np.ndarray) -> np.ndarray:
    """Action codes (index into ACTIONS): a base mix, then purchases, mostly right after a click."""
    base = np.searchsorted(_BASE_ACTION_CDF, rng.random(first.size), side="right")
    after_click = np.zeros(first.size, dtype=bool)
    after_click[1:] = base[:-1] == 1
    after_click &= ~first
    purchase = rng.random(first.size) < np.where(after_click, _PURCHASE_AFTER_CLICK_P, _PURCHASE_BASE_P)
    return np.where(purchase, 3, base).astype(np.int32)


def _timestamps(rng: np.random.Generator, start_time: int, lengths: np.ndarray, starts: np.ndarray,
                first: np.ndarray) -> np.ndarray:
    """Unix seconds: sessions of close events, separated by hours to days; non-decreasing per user."""
    e = first.size
    new_session = (rng.random(e) < _NEW_SESSION_P) & ~first
    within = ~new_session & ~first
    gap = np.empty(e)
    gap[first] = rng.random(lengths.size) * _START_SPREAD_S
    gap[new_session] = rng.lognormal(*_BETWEEN_GAP_LOG, size=int(new_session.sum()))
    within_gap = rng.lognormal(*_WITHIN_GAP_LOG, size=int(within.sum()))
    gap[within] = np.where(rng.random(within_gap.size) < _TIE_P, 0.0, within_gap)
    gap_s = np.floor(gap).astype(np.int64)
    cum = np.cumsum(gap_s)
    return start_time + cum - np.repeat(cum[starts] - gap_s[starts], lengths)


def user_ids(seed: int, index: np.ndarray) -> np.ndarray:
    """Sparse, distinct int64 user ids: an odd-multiplier affine bijection of the index mod 2^40."""
    rng = np.random.default_rng([seed, _STREAM_USER_IDS])
    mult, offset = np.uint64(rng.integers(1 << 39) * 2 + 1), np.uint64(rng.integers(1 << 40))
    # uint64 arithmetic wraps mod 2^64, a multiple of the modulus, so the bijection holds.
    return ((index.astype(np.uint64) * mult + offset) % np.uint64(_USER_ID_MODULUS)).astype(np.int64)


def make_block(cfg: GenerateConfig, cat: Catalog, lengths: np.ndarray, first_user: int, block: int) -> pa.Table:
    """Events of users first_user .. first_user + len(lengths) - 1, sorted by time (stable)."""
    rng = np.random.default_rng([cfg.seed, _STREAM_BLOCK, block])
    starts = np.cumsum(lengths) - lengths
    user_of = np.repeat(np.arange(lengths.size), lengths)
    first = np.zeros(user_of.size, dtype=bool)
    first[starts] = True
    rows = _items(rng, cfg, cat, lengths, user_of, first)
    actions = _actions(rng, first)
    ts = _timestamps(rng, cfg.start_time, lengths, starts, first)
    order = np.argsort(ts, kind="stable")  # a real log arrives in time order, users interleaved
    columns = [
        _arrow(user_ids(cfg.seed, first_user + user_of[order])),
        _arrow(cat.item_ids[rows[order]]),
        _arrow(ts[order]),
        _strings(ACTIONS).take(_arrow(actions[order])),
    ]
    return pa.Table.from_arrays(columns, schema=EVENT_SCHEMA)


# pa.array() imports pandas on first use (about 1 s per process): build arrays from buffers instead.
def _arrow(values: np.ndarray) -> pa.Array:
    values = np.ascontiguousarray(values)
    return pa.Array.from_buffers(pa.from_numpy_dtype(values.dtype), values.size, [None, pa.py_buffer(values)])


def _strings(values: list[str] | tuple[str, ...]) -> pa.Array:
    data = [v.encode() for v in values]
    offsets = np.concatenate([[0], np.cumsum([len(d) for d in data])]).astype(np.int32)
    return pa.Array.from_buffers(pa.string(), len(data), [None, pa.py_buffer(offsets), pa.py_buffer(b"".join(data))])


# --------------------------------------------------------------------------------------------------
# Writing: streaming Parquet into a temporary folder, _SUCCESS last, then rename
# --------------------------------------------------------------------------------------------------


def _identity(cfg: GenerateConfig) -> dict:
    """What determines the bytes: the config without its output path, and the generator version."""
    config = dataclasses.asdict(cfg)
    config.pop("output")
    return {"generator_version": GENERATOR_VERSION, "config": config}


def read_success(output: str | Path) -> dict | None:
    """The parsed _SUCCESS of a finished output folder, or None if the folder is not complete."""
    path = Path(output) / SUCCESS_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _write_items(cat: Catalog, path: Path, num_categories: int) -> None:
    width = max(3, len(str(num_categories - 1)))
    names = _strings([f"c{c:0{width}d}" for c in range(num_categories)])
    table = pa.table({"item_id": _arrow(cat.item_ids), "category": names.take(_arrow(cat.category))})
    pq.write_table(table, path)


def _write_events(cfg: GenerateConfig, cat: Catalog, events_dir: Path) -> dict[str, int]:
    """Stream every block into part files of about `events_per_file` events; return the counts."""
    events_dir.mkdir(parents=True)
    lengths_stream = _LengthStream(cfg)
    written = users = block = files = in_file = 0
    actions = np.zeros(len(ACTIONS), dtype=np.int64)
    writer: pq.ParquetWriter | None = None
    while written < cfg.num_events:
        remaining = cfg.num_events - written
        lengths = lengths_stream.take(min(_BLOCK_EVENTS, cfg.events_per_file - in_file, remaining))
        if int(lengths.sum()) > remaining - cfg.min_events_per_user:  # too little left for one more user
            lengths = lengths_stream.finish(lengths, remaining)
        table = make_block(cfg, cat, lengths, users, block)
        if writer is None:
            writer = pq.ParquetWriter(events_dir / f"part-{files:05d}.parquet", EVENT_SCHEMA)
            files += 1
        writer.write_table(table)
        for entry in table.column("action").value_counts().to_pylist():
            actions[ACTIONS.index(entry["values"])] += entry["counts"]
        written, in_file = written + table.num_rows, in_file + table.num_rows
        users, block = users + lengths.size, block + 1
        if in_file >= cfg.events_per_file:
            writer.close()
            writer, in_file = None, 0
        log.info("generate: %s / %s events", f"{written:,}", f"{cfg.num_events:,}")
    if writer is not None:
        writer.close()
    return {"num_events": written, "num_users": users, "num_items": cfg.num_items, "num_files": files,
            **{f"num_{a}": int(n) for a, n in zip(ACTIONS, actions, strict=True)}}


def _remove_stale_temps(output: Path) -> None:
    """Delete temporary folders of earlier runs that were killed (their process no longer exists)."""
    for tmp in output.parent.glob(f".{output.name}.tmp-*"):
        try:
            os.kill(int(tmp.name.rsplit("-", 1)[1]), 0)
        except (ValueError, ProcessLookupError):
            shutil.rmtree(tmp, ignore_errors=True)
        except PermissionError:  # alive, owned by someone else
            pass


def _publish(tmp: Path, output: Path) -> None:
    """Put the finished `tmp` at `output`; an older output is moved aside first and then deleted."""
    old = output.parent / f".{output.name}.old-{os.getpid()}"
    if output.exists():
        output.rename(old)
    tmp.rename(output)
    shutil.rmtree(old, ignore_errors=True)


def generate(cfg: GenerateConfig) -> GenerateResult:
    """Write the synthetic log to `cfg.output` (skipped when it already holds this exact config)."""
    started = time.perf_counter()
    output = Path(cfg.output)
    identity = _identity(cfg)
    done = read_success(output)
    if done is not None and {k: done.get(k) for k in identity} == identity:
        log.info("generate: %s already holds this config; nothing to do", output)
        return _result(output, done["counts"], time.perf_counter() - started, skipped=True)
    output.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(output)
    tmp = output.parent / f".{output.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        cat = build_catalog(cfg)
        _write_items(cat, tmp / ITEMS_FILE, cfg.num_categories)
        counts = _write_events(cfg, cat, tmp / EVENTS_DIR)
        (tmp / SUCCESS_FILE).write_text(json.dumps({**identity, "counts": counts}, indent=2, sort_keys=True) + "\n")
        _publish(tmp, output)
    except BaseException:  # also on Ctrl-C: leave nothing that looks like an output
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    result = _result(output, counts, time.perf_counter() - started, skipped=False)
    log.info("generate: wrote %s events in %.1f s to %s", f"{result.num_events:,}", result.seconds, output)
    return result


def _result(output: Path, counts: dict, seconds: float, skipped: bool) -> GenerateResult:
    return GenerateResult(output=output, num_events=counts["num_events"], num_users=counts["num_users"],
                          num_items=counts["num_items"], num_files=counts["num_files"], seconds=seconds,
                          skipped=skipped)
