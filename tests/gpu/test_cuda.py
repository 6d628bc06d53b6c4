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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_cross_entropy_on_cuda_equals_materialised_logits(dtype):
    from seqrec.losses import linear_cross_entropy

    gen = torch.Generator(device="cuda").manual_seed(0)
    query = torch.randn(3000, 64, device="cuda", generator=gen).to(dtype).requires_grad_()
    cand = torch.randn(5000, 64, device="cuda", generator=gen).to(dtype).requires_grad_()
    labels = torch.randint(2, 5000, (3000,), device="cuda", generator=gen)
    linear_cross_entropy(query, cand, labels, masked=2).backward()
    got = (query.grad.float(), cand.grad.float())
    query.grad = cand.grad = None
    logits = (query @ cand.T).float()
    logits[:, :2] = -float("inf")
    torch.nn.functional.cross_entropy(logits, labels).backward()
    tol = {"rtol": 1e-3, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 1e-3}
    torch.testing.assert_close(got[0], query.grad.float(), **tol)
    torch.testing.assert_close(got[1], cand.grad.float(), **tol)


def test_gpu_mfu_benchmark_runs(tmp_path):
    import subprocess
    import sys

    from tests.conftest import REPO_ROOT

    out = tmp_path / "mfu.json"
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "benchmarks" / "gpu_mfu.py"), "--steps", "3", "--warmup", "2",
                           "--items", "100000", "--output", str(out)], capture_output=True, text=True, cwd=REPO_ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    row = json.loads(out.read_text())
    assert row["precision"] == "bf16" and row["model_tflops"] > 0
