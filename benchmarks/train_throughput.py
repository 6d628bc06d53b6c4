"""Training throughput: sequences/s, tokens/s and the step-time breakdown (data wait, forward,
backward, optimizer step) for a config at 1 and 2 processes, ZeRO 0/2/3, fp32 and bf16.

Every variant trains the same number of steps from scratch in the same run (this machine is noisy,
so compare rows of one result file). The first logging window (warm-up, JIT) is dropped.

    .venv/bin/python benchmarks/train_throughput.py                      # movielens-1m-seq, full grid
    .venv/bin/python benchmarks/train_throughput.py --config configs/demo.toml --nprocs 2 --stages 0
"""

from __future__ import annotations

import argparse
import itertools
import shutil
import sys
import tempfile
from pathlib import Path
from statistics import median

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import hardware, metrics, prepare, table, train, write  # noqa: E402

PHASES = ("data_wait", "forward", "backward", "optimizer")


def measure(config: str, nproc: int, stage: int, precision: str, steps: int, log_every: int, sets: list[str]) -> dict:
    run_dir = Path(tempfile.mkdtemp(prefix="seqrec-throughput-"))
    try:
        seconds = train(
            config,
            run_dir,
            nproc,
            [
                f"dist.zero_stage={stage}",
                f"train.precision={precision!r}",
                f"train.max_steps={steps}",
                f"train.log_every={log_every}",
                f"train.eval_every={10 * steps}",
                f"train.save_every={10 * steps}",
                "train.time_breakdown=true",
                "eval.max_valid_users=256",
                "tracking.wandb='disabled'",
                *sets,
            ],
        )
        windows = [m for m in metrics(run_dir) if "perf/sequences_per_s" in m][1:]  # drop warm-up window
        row = {
            "nproc": nproc,
            "zero": stage,
            "precision": precision,
            "sequences_per_s": median(m["perf/sequences_per_s"] for m in windows),
            "tokens_per_s": median(m["perf/tokens_per_s"] for m in windows),
            "step_ms": 1000 * median(m["perf/step_s"] for m in windows),
            "wall_s": seconds,
        }
        for phase in PHASES:
            row[f"{phase}_pct"] = median(m.get(f"perf/{phase}_pct", 0.0) for m in windows)
        return row
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/movielens-1m-seq.toml")
    p.add_argument("--nprocs", default="1,2")
    p.add_argument("--stages", default="0,2,3")
    p.add_argument("--precisions", default="fp32,bf16")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--set", dest="sets", action="append", default=[], help="extra config override")
    p.add_argument("--name", default="train_throughput")
    args = p.parse_args()
    prepare(args.config)
    rows = []
    grid = itertools.product(
        [int(x) for x in args.nprocs.split(",")], [int(x) for x in args.stages.split(",")], args.precisions.split(",")
    )
    for nproc, stage, precision in grid:
        rows.append(measure(args.config, nproc, stage, precision, args.steps, args.log_every, args.sets))
        print(table(rows[-1:], list(rows[-1])), flush=True)
    columns = ["nproc", "zero", "precision", "sequences_per_s", "tokens_per_s", "step_ms",
               *[f"{ph}_pct" for ph in PHASES]]
    path = write(args.name, {"config": args.config, "steps": args.steps, "overrides": args.sets,
                             "hardware": hardware(), "rows": rows})
    print(table(rows, columns))
    print(f"data wait < 5% of step time in {sum(r['data_wait_pct'] < 5 for r in rows)}/{len(rows)} variants")
    print(f"written {path}")


if __name__ == "__main__":
    main()
