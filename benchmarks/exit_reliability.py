"""Exit reliability: run the small 2-rank training N times from scratch and count clean exits.

Every run is the same command a user types (`torchrun --standalone --nproc-per-node 2 -m seqrec train`)
on a fresh run folder, with W&B offline, periodic validation and checkpoints, and the final test
evaluation, so every thread and resource a real run starts has to be torn down. A run counts as
clean when torchrun exits 0, `results.json` exists and the output holds no abort
("terminate called", "Aborted", "core dumped", a non-zero worker exit).

    .venv/bin/python benchmarks/exit_reliability.py                 # 20 runs
    .venv/bin/python benchmarks/exit_reliability.py --runs 5 --keep  # keep the run folders

Writes benchmarks/results/exit_reliability.json and prints one line per run plus a summary.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import BIN, REPO, env, hardware, table, write  # noqa: E402

CONFIG = """
name = "exit-reliability"
[generate]
num_events = 30_000
num_items = 300
num_categories = 8
seed = 3
output = "{root}/log"
[prepare]
output = "{root}/shards"
dataset_name = "synthetic-exit"
[prepare.input]
path = "{root}/log/events"
item_features_path = "{root}/log/items.parquet"
[prepare.split]
max_len = 20
[prepare.shards]
files_per_split = 2
max_world_size = 2
row_group_rows = 128
[data]
path = "{root}/shards"
[model]
d_model = 32
num_heads = 2
[embeddings]
dim = 32
[loss]
kind = "sampled"
num_negatives = 64
[train]
micro_batch_size = 32
global_batch_size = 64
max_steps = 30
log_every = 5
eval_every = 15
save_every = 10
[eval]
max_valid_users = 200
[tracking]
wandb = "offline"
"""

ABORT_MARKERS = ("terminate called", "Aborted", "core dumped", "exitcode  : -", "SIGABRT", "Signal 6")


def setup(root: Path) -> Path:
    config = root / "exit.toml"
    config.write_text(CONFIG.format(root=root))
    for cmd in (["generate"], ["prepare"]):
        subprocess.run([str(BIN / "seqrec"), *cmd, "--config", str(config)], cwd=REPO, env=env(2), check=True,
                       capture_output=True, text=True)
    return config


def one_run(config: Path, run_dir: Path, timeout: float) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "seqrec", "train", "--config", str(config), "--run-dir", str(run_dir)]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=env(1), capture_output=True, text=True, timeout=timeout)
        rc, out = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as e:
        rc, out = "timeout", (e.stdout or b"").decode(errors="replace") + (e.stderr or b"").decode(errors="replace")
    seconds = time.perf_counter() - t0
    aborts = [m for m in ABORT_MARKERS if m in out]
    clean = rc == 0 and not aborts and (run_dir / "results.json").is_file()
    return {"rc": rc, "seconds": round(seconds, 1), "clean": clean, "aborts": aborts, "tail": "" if clean else out[-3000:]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--timeout", type=float, default=600, help="seconds per run before it counts as a hang")
    p.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = p.parse_args()
    root = Path(tempfile.mkdtemp(prefix="seqrec-exit-"))
    try:
        config = setup(root)
        rows = []
        for i in range(args.runs):
            run_dir = root / f"run_{i:02d}"
            row = {"run": i, **one_run(config, run_dir, args.timeout)}
            rows.append(row)
            print(f"run {i:2d}: rc {row['rc']} {'clean' if row['clean'] else 'FAILED ' + str(row['aborts'])} "
                  f"({row['seconds']} s)", flush=True)
            if not row["clean"]:
                print(row["tail"], flush=True)
            if not args.keep:
                shutil.rmtree(run_dir, ignore_errors=True)
        clean = sum(r["clean"] for r in rows)
        path = write("exit_reliability", {
            "command": "torchrun --standalone --nproc-per-node 2 -m seqrec train (fresh run folder each time)",
            "runs": args.runs, "clean_exits": clean, "hardware": hardware(), "rows": rows,
        })
        print(table(rows, ["run", "rc", "clean", "seconds"]))
        print(f"{clean} of {args.runs} runs exited 0 cleanly -> {path}")
        sys.exit(0 if clean == args.runs else 1)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
