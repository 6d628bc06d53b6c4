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


def test_sharded_tables_on_gpus_match_one_gpu(tmp_path):
    """fbgemm-gpu's CUDA kernels behind the same lookup: N GPUs == 1 GPU, like the gloo test."""
    pytest.importorskip("fbgemm_gpu")
    nproc = min(2, torch.cuda.device_count())
    if nproc < 2:
        pytest.skip("needs 2 GPUs")
    seqs = workers.full_length_sequences(num_users=64, num_items=30, length=12)
    write_tiny_dataset(tmp_path / "data", max_len=8, sequences=seqs)
    data = str(tmp_path / "data")
    one = launch(workers.tables_equivalence_worker, 1, data, str(tmp_path / "one"), 4, 3, "rowwise_adagrad")
    two = launch(workers.tables_equivalence_worker, 2, data, str(tmp_path / "two"), 4, 3, "rowwise_adagrad")
    for rank in (0, 1):
        assert two[rank]["losses"] == pytest.approx(one[0]["losses"], rel=1e-4)


def test_trainer_with_sharded_tables_on_gpus(tmp_path):
    pytest.importorskip("fbgemm_gpu")
    write_tiny_dataset(tmp_path / "data", num_users=64, num_items=30, max_len=8)
    nproc = min(2, torch.cuda.device_count())
    sets = {"data": str(tmp_path / "data"), "run_dir": str(tmp_path / "run"), "train.max_steps": 20,
            "train.micro_batch_size": 4, "train.global_batch_size": 4 * nproc, "train.precision": "bf16",
            "train.eval_every": 10, "train.save_every": 10, "embeddings.backend": "torchrec",
            "embeddings.table_optimizer": "adam", "loss.kind": "sampled", "loss.num_negatives": 8}
    launch(workers.train_worker, nproc, sets)
    r = json.loads((tmp_path / "run" / "results.json").read_text())
    assert r["hardware"]["device"] == "cuda"
    assert r["test"]["ndcg@10"] > r["popularity"]["test"]["ndcg@10"]
