"""The GPU MFU benchmark runs end to end (on the CPU here, a tiny model through its --cpu smoke mode),
and without a GPU and without --cpu it skips cleanly: exit 0, nothing written."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.unit

SCRIPT = str(REPO_ROOT / "benchmarks" / "gpu_mfu.py")
TINY = ["--set", "model.d_model=16", "--set", "embeddings.dim=16", "--set", "model.num_layers=1",
        "--set", "model.num_heads=2", "--set", "prepare.split.max_len=12", "--set", "loss.num_negatives=8",
        "--set", "train.micro_batch_size=4", "--set", "train.global_batch_size=4"]


def test_gpu_mfu_smoke_on_cpu(tmp_path) -> None:
    out = tmp_path / "mfu.json"
    proc = subprocess.run(
        [sys.executable, SCRIPT, "--cpu", "--items", "50", "--steps", "2", "--warmup", "1", "--output", str(out), *TINY],
        capture_output=True, text=True, cwd=REPO_ROOT, timeout=300, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    row = json.loads(out.read_text())
    assert row["device"] == "cpu" and row["mfu_pct"] is None and row["precision"] == "bf16"
    assert row["model_tflops"] > 0 and row["tokens_per_s"] > 0 and row["max_len"] == 12


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="a GPU is present: the benchmark runs")
def test_gpu_mfu_skips_without_a_gpu(tmp_path) -> None:
    out = tmp_path / "mfu.json"
    proc = subprocess.run([sys.executable, SCRIPT, "--output", str(out)], capture_output=True, text=True, cwd=REPO_ROOT, timeout=120)
    assert proc.returncode == 0 and "skipped, no CUDA device" in proc.stdout
    assert not out.exists()
