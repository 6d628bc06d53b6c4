"""Time to quality: wall seconds from launching `seqrec train` until validation NDCG@10 first reaches
each threshold, and the test NDCG@10 of the validation-selected checkpoint.

Prepares the shards (skipped when built with the same config), trains from scratch with the
committed config (plus `--set` overrides) under torchrun, reads the validation curve from the run's
`metrics.jsonl` and writes `results/time_to_quality_<dataset><tag>.json` and an SVG plot of
validation NDCG@10 against wall seconds beside it. Wall seconds count everything the user waits
for: process start, data loading, training and every validation pass. The test split is scored
once, at the end, with the best validation checkpoint (never used for selection).

    .venv/bin/python benchmarks/time_to_quality.py                       # movielens-1m-seq, 1 process x 2 threads
    .venv/bin/python benchmarks/time_to_quality.py --nproc 2 --tag _2x1  # the same with 2 processes x 1 thread
    .venv/bin/python benchmarks/time_to_quality.py --set train.epochs=5 --thresholds 0.05 0.1

Published full-ranking ML-1M references (../shared/data/README.md): SASRec+ (full cross-entropy)
0.1821 NDCG@10, gSASRec 0.1726, HSTU-large 0.1893; movielens-1m-seq targets are close, not equal.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import REPO, RESULTS, hardware, matmul_ceiling, metrics, prepare, table, train, write  # noqa: E402

DATASETS = {
    "movielens-1m-seq": "configs/movielens-1m-seq.toml",
    "movielens-100k": "configs/movielens-100k.toml",
    "movielens-latest-small": "configs/movielens-latest-small.toml",
}
KEY = "ndcg@10"


def curve(run_dir: Path, t0: float) -> list[dict]:
    """(step, epoch, wall seconds since launch, validation NDCG@10) of every validation pass."""
    epochs, points = {}, []
    for m in metrics(run_dir):
        if "train/epoch" in m:
            epochs[m["step"]] = m["train/epoch"]
        if f"valid/{KEY}_full" in m:
            points.append(
                {"step": m["step"], "wall_s": m["time"] - t0, "valid_" + KEY: m[f"valid/{KEY}_full"]}
            )
    for p in points:
        known = [s for s in epochs if s <= p["step"]]
        p["epoch"] = epochs[max(known)] if known else 0
    return points


def first_reached(points: list[dict], threshold: float) -> dict | None:
    for p in points:
        if p["valid_" + KEY] >= threshold:
            return p
    return None


def svg_plot(points: list[dict], thresholds: list[float], title: str) -> str:
    """A small self-contained SVG line plot of validation NDCG@10 against wall minutes."""
    w, h, pad = 640, 400, 50
    xmax = max(p["wall_s"] for p in points) / 60 or 1.0
    ymax = max(max(p["valid_" + KEY] for p in points), *thresholds) * 1.1

    def xy(minutes: float, y: float) -> tuple[float, float]:
        return pad + (w - 2 * pad) * minutes / xmax, h - pad - (h - 2 * pad) * y / ymax

    line = " ".join("{:.1f},{:.1f}".format(*xy(p["wall_s"] / 60, p["valid_" + KEY])) for p in points)
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">',
        f'<rect width="{w}" height="{h}" fill="white"/>',
        f'<text x="{w / 2}" y="20" text-anchor="middle">{title}</text>',
        f'<line x1="{pad}" y1="{h - pad}" x2="{w - pad}" y2="{h - pad}" stroke="black"/>',
        f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{h - pad}" stroke="black"/>',
        f'<text x="{w / 2}" y="{h - 12}" text-anchor="middle">wall minutes since launch</text>',
        f'<text x="14" y="{h / 2}" transform="rotate(-90 14 {h / 2})" text-anchor="middle">validation NDCG@10 (full ranking)</text>',
    ]
    for i in range(6):
        minutes, y = xmax * i / 5, ymax * i / 5
        x0, _ = xy(minutes, 0)
        _, y0 = xy(0, y)
        parts.append(f'<text x="{x0:.1f}" y="{h - pad + 16}" text-anchor="middle">{minutes:.1f}</text>')
        parts.append(f'<text x="{pad - 6}" y="{y0 + 4:.1f}" text-anchor="end">{y:.3f}</text>')
    for t in thresholds:
        _, y0 = xy(0, t)
        parts.append(f'<line x1="{pad}" y1="{y0:.1f}" x2="{w - pad}" y2="{y0:.1f}" stroke="gray" stroke-dasharray="4 4"/>')
        parts.append(f'<text x="{w - pad + 4}" y="{y0 + 4:.1f}">{t}</text>')
    parts.append(f'<polyline points="{line}" fill="none" stroke="steelblue" stroke-width="2"/>')
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", choices=list(DATASETS), default="movielens-1m-seq")
    p.add_argument("--nproc", type=int, default=1, help="training processes (threads: cores / nproc)")
    p.add_argument("--thresholds", type=float, nargs="+", default=[0.123, 0.15, 0.18])
    p.add_argument("--tag", default="", help="suffix of the result files")
    p.add_argument("--set", dest="sets", action="append", default=[], help="config override (section.key=value)")
    args = p.parse_args()
    config = DATASETS[args.dataset]
    from seqrec.config import load_config

    cfg = load_config(REPO / config, args.sets)
    source = Path(cfg.prepare.input.path)
    if not (REPO / source).exists() and not source.exists():
        raise SystemExit(f"{args.dataset}: {source} is absent (the MovieLens copies live in ../shared/data)")
    prepare(config, args.sets)
    ceiling = matmul_ceiling("fp32", threads=max(1, (os.cpu_count() or 2) // args.nproc))
    run_dir = REPO / "runs" / f"ttq-{args.dataset}{args.tag}"
    t0 = time.time()
    wall = train(config, run_dir, args.nproc, [*args.sets, "checkpoint.resume='never'"], log=run_dir / "train.log")
    points = curve(run_dir, t0)
    results = json.loads((run_dir / "results.json").read_text())
    reached = {str(t): first_reached(points, t) for t in args.thresholds}
    name = f"time_to_quality_{args.dataset}{args.tag}"
    payload = {
        "dataset": args.dataset,
        "config": config,
        "overrides": args.sets,
        "protocol": results["protocol"],
        "nproc": args.nproc,
        "wall_seconds": wall,
        "reached": reached,
        "best_step": results["best_step"],
        "valid_best": results["valid"],
        "test_of_best": results["test"],
        "popularity_test": results["popularity"]["test"],
        "train": results["train"],
        "model": results["model"],
        "curve": points,
        "fp32_matmul_ceiling_gflops": ceiling,
        "hardware": hardware(),
    }
    path = write(name, payload)
    (RESULTS / f"{name}.svg").write_text(svg_plot(points, args.thresholds, f"{args.dataset}: validation NDCG@10"))
    rows = [
        {
            "threshold": t,
            "reached_at_s": r["wall_s"] if r else "not reached",
            "step": r["step"] if r else "",
            "epoch": r["epoch"] if r else "",
        }
        for t, r in ((float(t), reached[t]) for t in reached)
    ]
    print(table(rows, ["threshold", "reached_at_s", "step", "epoch"]))
    print(
        f"best validation step {results['best_step']}: valid {KEY} {results['valid'][KEY]:.4f}, "
        f"test {KEY} {results['test'][KEY]:.4f} (popularity {results['popularity']['test'][KEY]:.4f}); "
        f"wall {wall:.0f} s"
    )
    print("->", path)


if __name__ == "__main__":
    main()
