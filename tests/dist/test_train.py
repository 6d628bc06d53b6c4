"""The real trainer on 2 gloo processes: exact resume, non-finite loss handling, run folder contract."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch

from seqrec import checkpoint as ckpt
from tests.dist import workers
from tests.dist.harness import launch
from tests.fixtures import write_tiny_dataset

pytestmark = pytest.mark.dist


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist-train")
    write_tiny_dataset(root, num_users=64, num_items=30, max_len=8, row_group_rows=4)
    return str(root)


def _sets(data: str, run_dir: Path, **extra) -> dict:
    return {
        "data": data,
        "run_dir": str(run_dir),
        "train.max_steps": 12,
        "train.micro_batch_size": 4,
        "train.global_batch_size": 8,
        "train.save_every": 4,
        "train.eval_every": 4,
        "train.trace_samples": True,
        "checkpoint.keep_last_k": 10,
        **extra,
    }


def _trace(run_dir: Path) -> Counter:
    lines = [ln for p in sorted((run_dir / "trace").glob("rank_*.txt")) for ln in p.read_text().splitlines()]
    return Counter(lines)


def _module_weights(folder: Path) -> dict[str, torch.Tensor]:
    return torch.load(folder / "mp_rank_00_model_states.pt", weights_only=False)["module"]


def test_interrupted_and_resumed_equals_uninterrupted(data, tmp_path):
    full, cut = tmp_path / "full", tmp_path / "cut"
    launch(workers.train_worker, 2, _sets(data, full))
    # first invocation leaves after 5 steps (between checkpoints), the second resumes and finishes
    assert launch(workers.train_worker, 2, _sets(data, cut, **{"train.stop_after": 5}))[0] is None
    assert ckpt.latest(ckpt.checkpoint_root(cut)).name == "step_00000005"
    launch(workers.train_worker, 2, _sets(data, cut))

    trace_full, trace_cut = _trace(full), _trace(cut)
    assert sum(trace_full.values()) == 12 * 8  # every step consumed one global batch
    assert trace_cut == trace_full  # same (step, sample) multiset: nothing repeated or skipped
    last_full = _module_weights(ckpt.checkpoint_root(full) / "step_00000012")
    last_cut = _module_weights(ckpt.checkpoint_root(cut) / "step_00000012")
    for name, value in last_full.items():
        torch.testing.assert_close(last_cut[name], value, rtol=0, atol=0, msg=name)
    r_full = json.loads((full / "results.json").read_text())
    r_cut = json.loads((cut / "results.json").read_text())
    assert r_cut["test"] == r_full["test"]
    assert r_cut["train"]["sequences"] == r_full["train"]["sequences"] == 12 * 8


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(data, tmp_path):
    run = tmp_path / "nan"
    messages = launch(workers.diverging_train_worker, 2, _sets(data, run), 6)
    for rank in (0, 1):
        assert "non-finite training loss" in messages[rank]
        assert "step_00000004" in messages[rank]
    root = ckpt.checkpoint_root(run)
    assert [p.name for p in ckpt.complete_checkpoints(root)] == ["step_00000004"]
    assert not (run / "results.json").exists()  # a diverged run does not look finished


def test_zero3_export_reproduces_test_metrics_and_recommends(data, tmp_path):
    from seqrec.data.schema import read_manifest
    from seqrec.distributed import DistInfo
    from seqrec.evaluate import by_scores, evaluate
    from seqrec.export import export_model, load_exported, recommend

    run = tmp_path / "z3"
    sets = _sets(data, run, **{"dist.zero_stage": 3, "train.max_steps": 8, "train.trace_samples": False})
    launch(workers.train_worker, 2, sets)
    results = json.loads((run / "results.json").read_text())

    cfg = workers.tiny_config(**sets)
    out = export_model(cfg, checkpoint="best", output=tmp_path / "export")
    model, manifest, _ = load_exported(out)
    info = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    with torch.no_grad():
        scorer = by_scores(lambda b: model(b, task="score")["scores"], cfg.eval.exclude_seen)
        metrics = evaluate(scorer, read_manifest(data), "test", cfg.eval, info)
    assert metrics == pytest.approx(results["test"], rel=1e-6)  # consolidated ZeRO-3 shards == trained model

    summary = recommend(model_dir=out, histories=Path(data) / "test", output=tmp_path / "recs.parquet", k=5)
    import pyarrow.parquet as pq

    recs = pq.read_table(tmp_path / "recs.parquet").to_pandas()
    assert summary["users"] == manifest.rows("test") == recs["user"].nunique()
    assert len(recs) == 5 * summary["users"]
    assert recs.groupby("user")["rank"].apply(list).map(lambda r: r == [1, 2, 3, 4, 5]).all()
    histories = pq.read_table(Path(data) / "test").to_pandas()
    seen = {u: set(map(str, items)) for u, items in zip(histories["user"], histories["item"], strict=True)}
    assert not any(item in seen[user] for user, item in zip(recs["user"], recs["item"], strict=True))
