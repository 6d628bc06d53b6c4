"""CUDA + NCCL paths: the real trainer on GPUs with bf16 (skipped on machines without a GPU)."""

from __future__ import annotations

import json

import pytest
import torch

from tests.dist import workers
from tests.dist.harness import launch
from tests.fixtures import write_tiny_dataset

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (NCCL + bf16 paths)"),
]


@pytest.mark.parametrize("zero_stage", [0, 3])
def test_bf16_nccl_training_on_gpus(tmp_path, zero_stage):
    write_tiny_dataset(tmp_path / "data", num_users=64, num_items=30, max_len=8)
    nproc = min(2, torch.cuda.device_count())
    sets = {"data": str(tmp_path / "data"), "run_dir": str(tmp_path / "run"), "train.max_steps": 20,
            "train.micro_batch_size": 4, "train.global_batch_size": 4 * nproc, "train.precision": "bf16",
            "train.eval_every": 10, "train.save_every": 10, "dist.zero_stage": zero_stage}
    launch(workers.train_worker, nproc, sets)
    r = json.loads((tmp_path / "run" / "results.json").read_text())
    assert r["model"]["precision"] == "bf16" and r["hardware"]["device"] == "cuda"
    assert r["test"]["ndcg@10"] > r["popularity"]["test"]["ndcg@10"]
