"""Two torchrun agents on this machine as two nodes (c10d rendezvous on 127.0.0.1), two processes
each, through launch/train.sh: train, checkpoint, get killed, resume; the result matches a
single-node run of 4 processes on the same data."""

from __future__ import annotations

import json
import os
import subprocess
import time
import uuid
from pathlib import Path

import pytest
import torch

from seqrec import checkpoint as ckpt
from seqrec.distributed import free_port
from tests.e2e.test_pipeline import _kill_tree
from tests.fixtures import write_tiny_dataset

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
CONFIG = """
[model]
d_model = 16
num_heads = 2
dropout = 0.0
[embeddings]
dim = 16
[optim]
lr = 0.01
embedding_lr = 0.01
warmup_steps = 2
[train]
micro_batch_size = 4
global_batch_size = 16
max_steps = 24
log_every = 4
eval_every = 8
save_every = 4
[checkpoint]
keep_last_k = 10
[tracking]
wandb = "disabled"
"""


def _node(config: Path, run_dir: Path, nnodes: int, node_rank: int, nproc: int, port: int, rdzv_id: str):
    env = {**os.environ, "NNODES": str(nnodes), "NODE_RANK": str(node_rank), "NPROC_PER_NODE": str(nproc),
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RDZV_ID": rdzv_id, "OMP_NUM_THREADS": "1",
           "RDZV_TIMEOUT": "120"}
    cmd = ["bash", str(REPO / "launch" / "train.sh"), "--config", str(config), "--run-dir", str(run_dir)]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _two_nodes(config: Path, run_dir: Path) -> list[subprocess.Popen]:
    port, rdzv_id = free_port(), uuid.uuid4().hex[:8]
    return [_node(config, run_dir, 2, r, 2, port, rdzv_id) for r in (0, 1)]


def _wait(procs: list[subprocess.Popen], timeout: float = 600) -> list[str]:
    outs = [p.communicate(timeout=timeout)[0] for p in procs]
    for p, out in zip(procs, outs, strict=True):
        assert p.returncode == 0, out[-4000:]
    return outs


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("multinode")
    write_tiny_dataset(root / "data", num_users=96, num_items=30, max_len=8, row_group_rows=4)
    config = root / "tiny.toml"
    config.write_text(f'[data]\npath = "{root / "data"}"\n' + CONFIG)
    return root, config


def test_two_nodes_killed_and_resumed_match_one_node_of_four(setup):
    root, config = setup
    reference = root / "one-node"
    _wait([_node(config, reference, 1, 0, 4, free_port(), "ref")])

    run_dir = root / "two-nodes"
    procs = _two_nodes(config, run_dir)
    marker = ckpt.checkpoint_root(run_dir) / "step_00000008" / ckpt.COMPLETE
    deadline = time.time() + 600
    while not marker.exists() and all(p.poll() is None for p in procs) and time.time() < deadline:
        time.sleep(0.01)
    for p in procs:
        _kill_tree(p.pid)  # both nodes die mid-training
        p.communicate()
    assert marker.exists() and not (run_dir / "results.json").exists()

    outs = _wait(_two_nodes(config, run_dir))
    assert any("resumed from" in out for out in outs)
    r, ref = (json.loads((d / "results.json").read_text()) for d in (run_dir, reference))
    assert r["hardware"]["world_size"] == ref["hardware"]["world_size"] == 4
    assert r["train"]["sequences"] == ref["train"]["sequences"] == 24 * 16
    assert r["best_step"] == ref["best_step"]
    for key, value in ref["test"].items():
        assert r["test"][key] == pytest.approx(value, abs=1e-9), key
    final = "step_00000024/mp_rank_00_model_states.pt"
    a = torch.load(ckpt.checkpoint_root(run_dir) / final, weights_only=False)["module"]
    b = torch.load(ckpt.checkpoint_root(reference) / final, weights_only=False)["module"]
    for name in b:
        # ranks may land on other nodes than in the reference, so all-reduce sums in another order
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6, msg=name)
