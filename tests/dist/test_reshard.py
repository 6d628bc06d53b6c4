"""Checkpoints that reshard: a run saved on 2 ranks resumes on 1 and then on 4 with the same weights
and a data position that neither repeats nor skips a sample (real gloo processes, sharded tables)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch

from seqrec import checkpoint as ckpt
from tests.dist import workers
from tests.dist.harness import launch
from tests.dist.test_tables import assemble
from tests.fixtures import write_tiny_dataset

pytestmark = pytest.mark.dist

GLOBAL_BATCH = 8


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist-reshard")
    write_tiny_dataset(root, num_users=64, num_items=30, max_len=8, row_group_rows=4)
    return str(root)


def _sets(data: str, run_dir: Path, world: int, **extra) -> dict:
    return {
        "data": data,
        "run_dir": str(run_dir),
        "embeddings.backend": "torchrec",
        "loss.kind": "sampled",
        "loss.num_negatives": 8,
        "train.max_steps": 8,
        "train.micro_batch_size": {1: 4, 2: 4, 4: 2}[world],  # world 1 accumulates 2 micro batches
        "train.global_batch_size": GLOBAL_BATCH,
        "train.save_every": 2,
        "train.eval_every": 4,
        "train.trace_samples": True,
        "checkpoint.keep_last_k": 10,
        **extra,
    }


def _trace(run_dir: Path) -> Counter:
    return Counter(ln for p in sorted((run_dir / "trace").glob("rank_*.txt")) for ln in p.read_text().splitlines())


def _saved(folder: Path, cfg) -> tuple[dict, torch.Tensor]:
    from seqrec.data.schema import read_manifest
    from seqrec.data.spec import DataSpec
    from seqrec.engine import TABLES_DIR
    from seqrec.export import consolidated_state_dict
    from seqrec.model import SeqRecModel
    from seqrec.tables import consolidate

    model = SeqRecModel(DataSpec.from_manifest(read_manifest(cfg.data.path)), cfg.model, cfg.embeddings, cfg.loss)
    return consolidated_state_dict(folder, 0), consolidate(folder / TABLES_DIR, model.tables, cfg.embeddings.dim)


def test_saved_on_2_resumes_on_1_then_4_with_same_weights_and_samples(data, tmp_path):
    full, chain = tmp_path / "full", tmp_path / "chain"
    launch(workers.train_worker, 2, _sets(data, full, 2))
    assert launch(workers.train_worker, 2, _sets(data, chain, 2, **{"train.stop_after": 4}))[0] is None

    # On 1 rank: the weights it resumes with are the ones saved by 2 ranks.
    cfg1 = workers.tiny_config(**_sets(data, chain, 1))
    dense, tables = _saved(ckpt.checkpoint_root(chain) / "step_00000004", cfg1)
    got = launch(workers.resumed_weights_worker, 1, _sets(data, chain, 1))[0]
    assert got["step"] == 4 and got["loader"]["rows"] == 4 * GLOBAL_BATCH // got["loader"]["virtual_shards"]
    for name, value in got["dense"].items():
        torch.testing.assert_close(value, dense[name].float(), rtol=1e-6, atol=0, msg=name)
    item_rows = tables[: len(got["tables"]["item"][0][1])]
    torch.testing.assert_close(assemble({0: got["tables"]}, "item"), item_rows, rtol=1e-6, atol=0)

    assert launch(workers.train_worker, 1, _sets(data, chain, 1, **{"train.stop_after": 2}))[0] is None
    # On 4 ranks, from the checkpoint the single rank wrote, to the end.
    cfg4 = workers.tiny_config(**_sets(data, chain, 4))
    dense, tables = _saved(ckpt.checkpoint_root(chain) / "step_00000006", cfg4)
    got = launch(workers.resumed_weights_worker, 4, _sets(data, chain, 4))
    for rank in range(4):
        for name, value in got[rank]["dense"].items():
            torch.testing.assert_close(value, dense[name].float(), rtol=1e-6, atol=0, msg=name)
    torch.testing.assert_close(assemble({r: got[r]["tables"] for r in got}, "item"), tables[: tables.shape[0] - _other_rows(cfg4)],
                               rtol=1e-6, atol=0)
    launch(workers.train_worker, 4, _sets(data, chain, 4))

    # Every step took exactly the samples it took in the uninterrupted 2-rank run.
    assert _trace(chain) == _trace(full)
    assert sum(_trace(full).values()) == 8 * GLOBAL_BATCH
    results = json.loads((chain / "results.json").read_text())
    assert results["train"]["steps"] == 8 and results["train"]["sequences"] == 8 * GLOBAL_BATCH


def _other_rows(cfg) -> int:
    """Rows of the tables after the item table in the consolidated layout."""
    from seqrec.data.schema import read_manifest
    from seqrec.data.spec import DataSpec
    from seqrec.model import SeqRecModel

    model = SeqRecModel(DataSpec.from_manifest(read_manifest(cfg.data.path)), cfg.model, cfg.embeddings, cfg.loss)
    return sum(t.num_embeddings for t in model.tables[1:])


def test_zero_partitions_do_not_reshard_and_say_so(data, tmp_path):
    run = tmp_path / "z2"
    sets = {**_sets(data, run, 2, **{"train.stop_after": 2, "dist.zero_stage": 2}), "embeddings.backend": "dense"}
    launch(workers.train_worker, 2, sets)
    messages = launch(workers.failing_train_worker, 1, {**sets, "train.micro_batch_size": 4, "train.stop_after": 0})
    assert "written by 2 ranks under ZeRO-2, resumed with 1" in messages[0]
