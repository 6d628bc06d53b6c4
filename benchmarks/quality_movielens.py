"""Ranking quality on real MovieLens logs: leave-one-out, full ranking, seen items excluded.

Prepares the shards with Spark (skipped when already built with the same config), trains with the
committed config under torchrun, and reports valid and test NDCG@10, HR@10, MRR of the
best-validation checkpoint beside the popularity baseline, with training time and hardware.

    .venv/bin/python benchmarks/quality_movielens.py --dataset movielens-1m-seq
    .venv/bin/python benchmarks/quality_movielens.py --dataset movielens-100k --nproc 2

Published full-ranking references on ML-1M (all items ranked, seen excluded): SASRec+ (full
cross-entropy) 0.1821 NDCG@10, HSTU-large 0.1893 (see ../shared/data/README.md). Numbers on
movielens-1m-seq are close references, not the same targets.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import REPO, hardware, prepare, table, train, write  # noqa: E402

DATASETS = {
    "movielens-1m-seq": "configs/movielens-1m-seq.toml",
    "movielens-100k": "configs/movielens-100k.toml",
    "movielens-latest-small": "configs/movielens-latest-small.toml",
}
KEYS = ("ndcg@10", "hr@10", "mrr")


def bench(dataset: str, nproc: int, sets: list[str]) -> dict:
    config = DATASETS[dataset]
    from seqrec.config import load_config

    cfg = load_config(REPO / config, sets)
    source = Path(cfg.prepare.input.path)
    if not (REPO / source).exists() and not source.exists():
        raise SystemExit(f"{dataset}: {source} is absent (the MovieLens copies live in ../shared/data)")
    prepare(config)
    run_dir = REPO / "runs" / f"bench-{dataset}"
    seconds = train(config, run_dir, nproc, [*sets, "checkpoint.resume='never'"], log=run_dir / "train.log")
    r = json.loads((run_dir / "results.json").read_text())
    return {
        "dataset": dataset,
        "config": config,
        "overrides": sets,
        "protocol": r["protocol"],
        "best_step": r["best_step"],
        "valid": {k: r["valid"][k] for k in KEYS},
        "test": {k: r["test"][k] for k in KEYS},
        "popularity_test": {k: r["popularity"]["test"][k] for k in KEYS},
        "train": r["train"],
        "wall_seconds": seconds,
        "nproc": nproc,
        "model": r["model"],
        "hardware": hardware(),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", choices=[*DATASETS, "all"], default="movielens-1m-seq")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--set", dest="sets", action="append", default=[], help="config override (section.key=value)")
    args = p.parse_args()
    names = list(DATASETS) if args.dataset == "all" else [args.dataset]
    rows = []
    for name in names:
        result = bench(name, args.nproc, args.sets)
        path = write(f"quality_{name}", result)
        rows.append(
            {
                "dataset": name,
                **{f"valid_{k}": result["valid"][k] for k in KEYS},
                **{f"test_{k}": result["test"][k] for k in KEYS},
                **{f"pop_{k}": result["popularity_test"][k] for k in KEYS},
                "train_min": result["train"]["seconds"] / 60,
                "best_step": result["best_step"],
            }
        )
        print(f"written {path}")
    print(table(rows, list(rows[0])))


if __name__ == "__main__":
    main()
