"""Shared helpers of the benchmarks: run commands, prepare shards once, read run folders, print tables."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
BIN = Path(sys.executable).parent


def env(threads: int = 1) -> dict[str, str]:
    return {
        **os.environ,
        "OMP_NUM_THREADS": str(threads),
        "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu"),
        "SPARK_LOCAL_IP": "127.0.0.1",
        "WANDB_SILENT": "true",
    }


def run(cmd: list[str], *, threads: int = 1, log: Path | None = None) -> float:
    """Run a command from the repo root; raise with its output tail on failure; return seconds."""
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env(threads), capture_output=True, text=True)
    if log is not None:
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{(proc.stdout + proc.stderr)[-3000:]}")
    return time.perf_counter() - t0


def prepare(config: str, sets: list[str] = ()) -> None:
    """`seqrec prepare` for a config (skips when the shards were built with the same config)."""
    args = [a for s in sets for a in ("--set", s)]
    run([str(BIN / "seqrec"), "prepare", "--config", config, *args], threads=2)


def train(config: str, run_dir: Path, nproc: int, sets: list[str], log: Path | None = None) -> float:
    args = [a for s in [f"run_dir={str(run_dir)!r}", *sets] for a in ("--set", s)]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           "-m", "seqrec", "train", "--config", config, *args]
    return run(cmd, threads=max(1, (os.cpu_count() or 2) // nproc), log=log)


def metrics(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def hardware() -> dict[str, Any]:
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "gpu": gpu,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def matmul_ceiling(dtype: str = "fp32", threads: int = 2, n: int = 2048, repeats: int = 7) -> float:
    """This machine's matmul rate in GFLOP/s right now (median of `repeats` n x n products at
    `threads` threads): the ceiling that useful FLOP/s are compared with, measured in the same run
    because machines of one kind differ (AVX-512 with native bf16 on some, AVX2 only on others)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        dt = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
        a, b = torch.randn(n, n).to(dt), torch.randn(n, n).to(dt)
        a @ b  # warm-up
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - t)
            if times[-1] > 5.0:  # an emulated dtype (bf16 without hardware support): one slow sample is enough
                break
        times.sort()
        return 2 * n**3 / times[len(times) // 2] / 1e9
    finally:
        torch.set_num_threads(before)


def write(name: str, payload: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"created": time.strftime("%Y-%m-%d %H:%M:%S"), **payload}, indent=2) + "\n")
    return path


def table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:,.4f}" if abs(v) < 10 else f"{v:,.1f}"
        return str(v)

    cells = [[fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.rjust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)
