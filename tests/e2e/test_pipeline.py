"""The whole tiny pipeline as a user runs it: generate -> Spark prepare -> torchrun 2 ranks -> results.

Also: `kill -9` of the training job, then the same command resumes from the last complete
checkpoint and ends exactly where an uninterrupted run ends.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from seqrec import checkpoint as ckpt
from seqrec.config import load_config

pytestmark = [pytest.mark.e2e, pytest.mark.spark]

CONFIG = """
name = "e2e"
[generate]
num_events = 40_000
num_items = 400
num_categories = 10
seed = 1
[prepare]
dataset_name = "synthetic-e2e"
[prepare.split]
max_len = 20
[prepare.shards]
files_per_split = 2
max_world_size = 4
row_group_rows = 128
[model]
d_model = 32
num_heads = 2
[embeddings]
dim = 32
[loss]
kind = "sampled"
num_negatives = 128
[optim]
lr = 0.003
embedding_lr = 0.003
warmup_steps = 10
[train]
micro_batch_size = 32
global_batch_size = 64
max_steps = 160
log_every = 10
eval_every = 80
save_every = 20
[checkpoint]
keep_last_k = 10
[tracking]
wandb = "offline"
"""


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "WANDB_SILENT": "true", **extra}


def _torchrun(config: Path, run_dir: Path, env: dict[str, str] | None = None, **popen) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "seqrec", "train", "--config", str(config), "--run-dir", str(run_dir)]
    return subprocess.Popen(cmd, env=env or _env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            **popen)


def _kill_tree(pid: int) -> None:
    """SIGKILL a process and all its descendants at once (torchrun workers are not in its group)."""
    import psutil

    parent = psutil.Process(pid)
    for p in [*parent.children(recursive=True), parent]:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass


def _run(proc: subprocess.Popen, timeout: float = 600) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-4000:]
    return out


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, spark):
    root = tmp_path_factory.mktemp("e2e")
    config = root / "e2e.toml"
    config.write_text(CONFIG + f'\n[data]\npath = "{root}/shards"\n')
    text = config.read_text().replace("[prepare]\n", f'[prepare]\noutput = "{root}/shards"\n', 1)
    text = text.replace("[generate]\n", f'[generate]\noutput = "{root}/log"\n', 1)
    text = text.replace("[prepare.split]", f'[prepare.input]\npath = "{root}/log/events"\n'
                        f'item_features_path = "{root}/log/items.parquet"\n[prepare.split]', 1)
    config.write_text(text)
    subprocess.run([sys.executable, "-m", "seqrec", "generate", "--config", str(config)], check=True, env=_env())
    from spark_jobs.build_sequences import run_prepare

    run_prepare(load_config(config).prepare, spark=spark)
    run_dir = root / "run"
    log = _run(_torchrun(config, run_dir))
    return config, run_dir, log


def test_run_folder_contract_and_model_beats_popularity(pipeline):
    config, run_dir, log = pipeline
    assert json.loads((run_dir / "config.json").read_text())["name"] == "e2e"
    r = json.loads((run_dir / "results.json").read_text())
    assert r["dataset"] == "synthetic-e2e"
    assert "full ranking" in r["protocol"] and "seen items excluded" in r["protocol"]
    for key in ("ndcg@10", "hr@10", "hr@1", "hr@50", "ndcg@50", "mrr"):
        assert 0.0 <= r["test"][key] <= 1.0
    assert set(r["popularity"]["test"]) >= {"ndcg@10", "hr@10"}
    assert r["train"]["steps"] == 160 and r["train"]["sequences"] == 160 * 64
    assert r["train"]["sequences_per_s"] > 0 and r["train"]["tokens_per_s"] > 0 and r["train"]["seconds"] > 0
    assert r["test"]["ndcg@10"] > 1.5 * r["popularity"]["test"]["ndcg@10"]
    assert r["test"]["hr@10"] > r["popularity"]["test"]["hr@10"]
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if "train/loss" in x] == list(range(10, 161, 10))
    assert any("valid/ndcg@10_full" in x for x in lines) and any("test/ndcg@10_full" in x for x in lines)
    done = [p.name for p in ckpt.complete_checkpoints(ckpt.checkpoint_root(run_dir))]
    assert done == [f"step_{s:08d}" for s in range(20, 161, 20)]
    assert list((run_dir / "wandb").glob("offline-run-*"))
    summary = subprocess.run([sys.executable, "-m", "seqrec", "summary", "--run-dir", str(run_dir)],
                             capture_output=True, text=True, check=True).stdout
    assert "ndcg@10_full" in summary and "popularity" in summary


def test_one_line_per_event(pipeline):
    """Rank 0 logs progress and metrics; other ranks only warnings and errors."""
    _, _, log = pipeline
    assert log.count("step 10 loss") == 1 and log.count("saved checkpoint") == 8
    assert "[rank1] INFO" not in log and "[rank0] INFO" in log


def test_evaluate_is_read_only_and_matches_the_run(pipeline, tmp_path):
    _, run_dir, _ = pipeline
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    out = tmp_path / "eval.json"
    proc = subprocess.run([sys.executable, "-m", "seqrec", "evaluate", "--run-dir", str(run_dir), "--checkpoint", "best",
                           "--split", "test", "--output", str(out)], env=_env(), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    after = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    assert after == before  # nothing in the run folder was written, rewritten or removed
    got, results = json.loads(out.read_text()), json.loads((run_dir / "results.json").read_text())
    assert got["metrics"] == {f"test/{k}_full" if k != "count" else "test/count": v for k, v in results["test"].items()}
    assert got["step"] == results["best_step"]
    assert got["popularity"]["test/ndcg@10_full"] == results["popularity"]["test"]["ndcg@10"]


def _start_and_kill_when(config: Path, run_dir: Path, env: dict[str, str], seen: str, timeout: float = 600) -> str:
    """Start the training job; SIGKILL the whole tree as soon as `seen` appears in its output."""
    proc = _torchrun(config, run_dir, env=env, start_new_session=True)
    lines: list[str] = []
    deadline = time.time() + timeout
    for line in proc.stdout:
        lines.append(line)
        if seen in line or time.time() > deadline:
            break
    _kill_tree(proc.pid)
    proc.communicate()
    assert any(seen in ln for ln in lines), "".join(lines)[-3000:]
    return "".join(lines)


def _run_with_fault(config: Path, run_dir: Path, env: dict[str, str], fault: str) -> str:
    """Run the job with rank 0 SIGKILLed at a fault point; the job must fail, not hang."""
    proc = _torchrun(config, run_dir, env={**env, "SEQREC_FAULT_POINT": fault})
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode != 0, out[-3000:]
    return out


def test_killed_at_every_moment_then_same_command_finishes_exactly(pipeline, tmp_path):
    """SIGKILL during start-up, during a checkpoint write and during evaluation; each time the same
    command runs again. The last one finishes with the uninterrupted run's weights and metrics.

    A stale build lock of DeepSpeed's shared-memory comm op sits in the extensions folder the whole
    time: a run that tried to build that op would wait on it forever (the old failure); ours build
    nothing, so the folder holds nothing else afterwards."""
    config, reference, _ = pipeline
    run_dir, ext = tmp_path / "killed", tmp_path / "torch_extensions"
    stale = ext / "deepspeed_shm_comm" / "lock"  # torch's FileBaton: waits while the file exists
    stale.parent.mkdir(parents=True)
    stale.write_text("")
    env = _env(TORCH_EXTENSIONS_DIR=str(ext))
    root = ckpt.checkpoint_root(run_dir)

    _start_and_kill_when(config, run_dir, env, "waiting for 2 ranks")  # start-up
    assert not root.exists() or not ckpt.complete_checkpoints(root)

    _run_with_fault(config, run_dir, env, "checkpoint:40")  # engine state written, COMPLETE not yet
    assert [p.name for p in ckpt.complete_checkpoints(root)] == ["step_00000020"]
    assert (root / "step_00000040").is_dir() and not (root / "step_00000040" / ckpt.COMPLETE).exists()

    log = _run_with_fault(config, run_dir, env, "eval")  # first validation of this run: step 80
    assert "resumed from" in log and str(root / "step_00000020") in log
    assert ckpt.latest(root).name == "step_00000060"

    log = _run(_torchrun(config, run_dir, env=env))
    assert "resumed from" in log and "step_00000060" in log
    r, ref = (json.loads((d / "results.json").read_text()) for d in (run_dir, reference))
    assert r["test"] == ref["test"] and r["valid"] == ref["valid"] and r["train"]["sequences"] == ref["train"]["sequences"]
    final = "step_00000160/mp_rank_00_model_states.pt"
    a = torch.load(root / final, weights_only=False)["module"]
    b = torch.load(ckpt.checkpoint_root(reference) / final, weights_only=False)["module"]
    for name in b:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=name)
    assert sorted(p.relative_to(ext).as_posix() for p in ext.rglob("*")) == ["deepspeed_shm_comm", "deepspeed_shm_comm/lock"]


def test_kill_9_then_same_command_resumes_exactly(pipeline, tmp_path):
    config, reference, _ = pipeline
    run_dir = tmp_path / "killed"
    proc = _torchrun(config, run_dir, start_new_session=True)
    marker = ckpt.checkpoint_root(run_dir) / "step_00000020" / ckpt.COMPLETE
    deadline = time.time() + 600
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    _kill_tree(proc.pid)  # the whole job (agent and workers), mid-training, no clean-up
    proc.communicate()
    assert not (run_dir / "results.json").exists()
    log = _run(_torchrun(config, run_dir))
    assert "resumed from" in log
    r, ref = (json.loads((d / "results.json").read_text()) for d in (run_dir, reference))
    assert r["test"] == ref["test"] and r["train"]["sequences"] == ref["train"]["sequences"]
    final = "step_00000160/mp_rank_00_model_states.pt"
    a = torch.load(ckpt.checkpoint_root(run_dir) / final, weights_only=False)["module"]
    b = torch.load(ckpt.checkpoint_root(reference) / final, weights_only=False)["module"]
    for name in b:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=name)
