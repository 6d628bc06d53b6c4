"""Single-process pandas version of the sequence builder: the baseline of the prepare benchmark and
the reference the Spark job is tested against (same input -> same rows, vocabularies and counts).

It is written the way research preprocessing scripts usually are: load the whole log into one
DataFrame, vectorised filters, `groupby(...).agg(list)`, then a Python loop per user that cuts,
truncates and pads the rows. Memory therefore grows with the log. Same semantics as spark_jobs/
(see the docstrings there): validation reasons, exact-duplicate removal, filters, vocabularies,
leave-one-out / time split, sliding windows, item features. Generic formats only (parquet, csv,
json lines); the MovieLens adapters exist in the Spark job.

    .venv/bin/python benchmarks/pandas_prepare.py --config configs/demo.toml --output /tmp/pandas-shards
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from seqrec.config import PrepareConfig, load_config  # noqa: E402
from spark_jobs.vocab import Vocab, build_vocab, item_features  # noqa: E402

log = logging.getLogger("pandas_prepare")
MIN_LOO_EVENTS = 3


@dataclass
class Result:
    splits: dict[str, pd.DataFrame]
    vocabs: dict[str, Vocab]
    item_features: pa.Table
    stats: dict[str, int]
    quarantine: dict[str, int] = field(default_factory=dict)
    filtered: dict[str, int] = field(default_factory=dict)


def _files(path: str) -> list[Path]:
    p = Path(path)
    if p.is_dir():  # Spark's rule: skip files starting with _ or .
        return sorted(f for f in p.rglob("*") if f.is_file() and not f.name.startswith(("_", ".")))
    return [p]


def read_table(path: str, fmt: str, sep: str = ",", header: bool = True) -> pd.DataFrame:
    readers = {
        "parquet": lambda f: pd.read_parquet(f, dtype_backend="numpy_nullable"),  # ints with nulls stay ints
        "csv": lambda f: pd.read_csv(
            f, sep=sep, header=0 if header else None, dtype=str, keep_default_na=False, na_values=[""]
        ),
        "json": lambda f: pd.read_json(f, lines=True, dtype=False),
    }
    if fmt not in readers:
        raise ValueError(f"pandas reference reads parquet, csv or json, not {fmt!r}")
    frames = [readers[fmt](f) for f in _files(path)]
    df = pd.concat(frames, ignore_index=True)
    if fmt == "csv" and not header:
        df.columns = [f"_c{i}" for i in range(df.shape[1])]
    return df


def _as_str(s: pd.Series) -> pd.Series:
    """Values as strings (None stays None), trimmed like Spark's trim()."""
    if pd.api.types.is_integer_dtype(s) or pd.api.types.is_bool_dtype(s):
        return s.astype("string").astype(object).where(s.notna(), None)
    return s.astype(object).map(lambda v: None if pd.isna(v) else str(v).strip(" "))


def _multi(value: object, separator: str) -> list[str] | None:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return None
    if isinstance(value, list | np.ndarray):
        return [str(v) for v in value]
    return [x for x in str(value).split(separator) if x]


def _numeric(s: pd.Series) -> pd.Series:
    return pd.to_numeric(s, errors="coerce")


def validate(df: pd.DataFrame, cfg: PrepareConfig) -> tuple[pd.DataFrame, dict[str, int]]:
    inp, c = cfg.input, cfg.input.columns
    out = pd.DataFrame({"_row": np.arange(len(df), dtype=np.int64)})
    out["user"], out["item"] = _as_str(df[c.user]), _as_str(df[c.item])
    blank = lambda s: s.isna() | (s == "")  # noqa: E731
    checks = [("missing_user", blank(out["user"])), ("missing_item", blank(out["item"]))]
    if inp.timestamp_format == "order":
        secs = out["_row"].astype(float)
    else:
        raw_ts = _as_str(df[c.timestamp])
        if inp.timestamp_format == "iso":
            secs = (
                pd.to_datetime(raw_ts, errors="coerce", utc=True) - pd.Timestamp(0, tz="UTC")
            ).dt.total_seconds()
        else:
            secs = _numeric(raw_ts) / (1000.0 if inp.timestamp_format == "unix_ms" else 1.0)
        checks += [("missing_timestamp", blank(raw_ts)), ("bad_timestamp", secs.isna())]
    ok = (secs >= inp.min_timestamp) & (secs < inp.max_timestamp)
    checks.append(("impossible_timestamp", ~ok))
    out["ts"] = np.floor(secs.where(ok, 0)).astype(np.int64)
    if c.rating:
        raw_rating = _as_str(df[c.rating])
        out["rating"] = _numeric(raw_rating)
        checks.append(("bad_rating", raw_rating.notna() & ~np.isfinite(out["rating"].fillna(np.nan))))
    if c.action:
        out["action"] = _as_str(df[c.action])
        checks.append(("missing_action", blank(out["action"])))
        if inp.valid_actions:
            checks.append(("unknown_action", ~out["action"].isin(inp.valid_actions)))
    for name in c.context:
        out[f"ctx_{name}"] = _as_str(df[name])
    reason = np.select([m.to_numpy(bool) for _, m in checks], [n for n, _ in checks], default="")
    counts = pd.Series(reason[reason != ""]).value_counts().to_dict()
    return out[reason == ""].reset_index(drop=True), {k: int(v) for k, v in counts.items()}


def row_filters(df: pd.DataFrame, cfg: PrepareConfig, filtered: dict[str, int]) -> pd.DataFrame:
    f = cfg.filters
    if f.min_rating is not None:
        drop = df["rating"].isna() | (df["rating"] < f.min_rating)
        filtered["min_rating"] = int(drop.sum())
        df = df[~drop]
    if f.actions:
        drop = ~df["action"].isin(f.actions)
        filtered["actions"] = int(drop.sum())
        df = df[~drop]
    if f.start_time is not None or f.end_time is not None:
        lo = f.start_time if f.start_time is not None else -(2**62)
        hi = f.end_time if f.end_time is not None else 2**62
        drop = (df["ts"] < lo) | (df["ts"] >= hi)
        filtered["time_window"] = int(drop.sum())
        df = df[~drop]
    return df


def count_filters(df: pd.DataFrame, cfg: PrepareConfig, filtered: dict[str, int]) -> pd.DataFrame:
    f = cfg.filters
    if f.min_item_events > 1:
        keep = df.groupby("item")["item"].transform("size") >= f.min_item_events
        filtered["min_item_events"] = int((~keep).sum())
        df = df[keep]
    if f.k_core > 0:
        n0 = len(df)
        while True:
            keep = (df.groupby("item")["item"].transform("size") >= f.k_core) & (
                df.groupby("user")["user"].transform("size") >= f.k_core
            )
            if keep.all():
                break
            df = df[keep]
        filtered["k_core"] = n0 - len(df)
    return df


def split_positions(df: pd.DataFrame, cfg: PrepareConfig, filtered: dict[str, int]) -> pd.DataFrame:
    sp = cfg.split
    df = df.sort_values(["user", "ts", "_row"], kind="mergesort").reset_index(drop=True)
    df["pos"] = df.groupby("user").cumcount() + 1
    df["n"] = df.groupby("user")["user"].transform("size")
    if sp.kind == "time":
        df["cv"] = (df["ts"] < sp.valid_time).groupby(df["user"]).transform("sum")
        df["ct"] = (df["ts"] < sp.test_time).groupby(df["user"]).transform("sum")
        train_end = np.where(df["cv"] >= 2, df["cv"], 0)
        valid_end = np.where((df["ct"] > df["cv"]) & (df["cv"] >= 1), df["cv"] + 1, 0)
        test_end = np.where((df["n"] > df["ct"]) & (df["ct"] >= 1), df["ct"] + 1, 0)
        last = np.maximum.reduce([train_end, valid_end, test_end])
        df["train"] = df["ts"] < sp.valid_time
    else:
        df["cv"], df["ct"] = df["n"] - 2, df["n"] - 1
        last = np.where(df["n"] >= MIN_LOO_EVENTS, df["n"], 0)
        df["train"] = df["pos"] <= df["n"] - 2
    reason = np.select(
        [df["n"] < cfg.filters.min_user_events, last == 0, df["pos"] > last],
        ["min_user_events", "too_short", "time_split_unused"],
        default="",
    )
    for name, count in pd.Series(reason[reason != ""]).value_counts().items():
        filtered[name] = int(count)
    return df[reason == ""].reset_index(drop=True)


def _pad(values: list, width: int) -> list:
    return [0] * (width - len(values)) + values


def _rows_for_user(
    user: str, ev: dict[str, list], ends: dict[str, int], cfg: PrepareConfig, feats: list[str]
) -> dict[str, list[dict]]:
    """The research-code loop body: cut, truncate or window, pad."""
    sp = cfg.split
    width, stride = sp.max_len + 1, sp.window_stride or sp.max_len
    out: dict[str, list[dict]] = {}
    for split, end in ends.items():
        if end < 2:
            continue
        if split == "train" and sp.sliding_window:
            count = 1 + -(-max(end - width, 0) // stride)
            windows = [
                (max(end - k * stride - width, 0), min(width, end - k * stride))
                for k in range(count - 1, -1, -1)
            ]
        else:
            windows = [(max(end - width, 0), min(width, end))]
        for k, (start, length) in enumerate(windows):
            row = {"user": user, "_k": k, "length": length}
            for col in ["item", "ts", *feats]:
                row[col] = _pad(ev[col][start : start + length], width)
            if split != "train":
                row["target"] = row["item"][-1]
            out.setdefault(split, []).append(row)
    return out


def build_rows(df: pd.DataFrame, cfg: PrepareConfig, feats: list[str]) -> dict[str, pd.DataFrame]:
    per_user = df.groupby("user", sort=True).agg(
        item=("item_id", list),
        ts=("ts", list),
        n=("n", "first"),
        cv=("cv", "first"),
        ct=("ct", "first"),
        **{f: (f, list) for f in feats},
    )
    rows: dict[str, list[dict]] = {"train": [], "valid": [], "test": []}
    for user, r in per_user.iterrows():
        if cfg.split.kind == "time":
            ends = {
                "train": r.cv if r.cv >= 2 else 0,
                "valid": r.cv + 1 if r.ct > r.cv and r.cv >= 1 else 0,
                "test": r.ct + 1 if r.n > r.ct and r.ct >= 1 else 0,
            }
        else:
            ends = {"train": r.n - 2 if r.n >= 4 else 0, "valid": r.n - 1, "test": r.n}
        for split, split_rows in _rows_for_user(str(user), r, ends, cfg, feats).items():
            rows[split].extend(split_rows)
    return {s: pd.DataFrame(r) for s, r in rows.items()}


def prepare(cfg: PrepareConfig) -> Result:
    """The whole transformation in pandas; returns rows, vocabularies, item features and counts."""
    inp = cfg.input
    raw = read_table(inp.path, inp.format, inp.csv_delimiter, inp.csv_header)
    events_in = len(raw)
    good, quarantine = validate(raw, cfg)
    del raw
    filtered: dict[str, int] = {}
    passed = row_filters(good, cfg, filtered)
    keys = [c for c in passed.columns if c != "_row"]
    deduped = passed.drop_duplicates(subset=keys, keep="first")
    duplicates = len(passed) - len(deduped)
    kept = split_positions(count_filters(deduped, cfg, filtered), cfg, filtered)
    features = {
        "item": "item",
        **({"action": "action"} if inp.columns.action else {}),
        **{n: f"ctx_{n}" for n in inp.columns.context},
    }
    vocabs = {}
    for name, col in features.items():
        counts = kept[col].value_counts(dropna=False)
        vocabs[name] = build_vocab(
            name, {(None if pd.isna(k) else k): int(v) for k, v in counts.items()}, cfg.vocab_min_count
        )
    for name, col in features.items():
        target = "item_id" if name == "item" else name
        kept[target] = kept[col].map(vocabs[name].ids()).fillna(1).astype(np.int32)
    train_counts = kept.loc[kept["train"], "item"].value_counts().to_dict()
    items = None
    if inp.item_features_path:
        table = read_table(
            inp.item_features_path, inp.item_features_format, inp.csv_delimiter, inp.csv_header
        )
        items = pd.DataFrame({"item": _as_str(table[inp.item_key])})
        for f in inp.item_single_features:
            items[f] = _as_str(table[f])
        for f in inp.item_multi_features:
            items[f] = table[f].map(lambda v: _multi(v, inp.multi_value_separator))
        items = items[items["item"].isin(set(vocabs["item"].values))]
    side = item_features(
        vocabs["item"],
        train_counts,
        items,
        inp.item_single_features,
        inp.item_multi_features,
        inp.max_values_per_item,
        cfg.vocab_min_count,
        "",
    )
    feats = [n for n in features if n != "item"]
    splits = build_rows(kept, cfg, feats)
    stats = {
        "events_in": events_in,
        "kept": len(kept),
        "quarantined": sum(quarantine.values()),
        "duplicates": duplicates,
        "filtered": sum(filtered.values()),
        "users": int(kept["user"].nunique()),
        "items": len(kept["item"].unique()),
    }
    return Result(splits, {**vocabs, **side.vocabs}, side.table, stats, quarantine, filtered)


def write(result: Result, output: str) -> None:
    """One Parquet file per split plus vocabularies (the usual single-machine output)."""
    out = Path(output)
    for split, df in result.splits.items():
        (out / split).mkdir(parents=True, exist_ok=True)
        df.drop(columns="_k").to_parquet(out / split / "part-00000.parquet", index=False)
    (out / "vocab").mkdir(parents=True, exist_ok=True)
    for name, vocab in result.vocabs.items():
        pq.write_table(vocab.table(), out / "vocab" / f"{name}.parquet")
    pq.write_table(result.item_features, out / "item_features.parquet")
    (out / "stats.json").write_text(json.dumps(result.stats, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", "-c")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--output", required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    cfg = load_config(args.config, args.overrides).prepare
    t0 = time.perf_counter()
    result = prepare(cfg)
    write(result, args.output)
    seconds = time.perf_counter() - t0
    print(json.dumps({"seconds": round(seconds, 3), **result.stats}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
