"""Sharded TorchRec tables on real gloo processes: N ranks == 1 rank, the fused row-wise updates equal a
reference, sharded full ranking equals ranking over the whole table, and the trainer resumes exactly."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from seqrec import checkpoint as ckpt
from seqrec.metrics import target_ranks
from seqrec.tables import init_rows
from tests.dist import workers
from tests.dist.harness import launch
from tests.fixtures import write_tiny_dataset

pytestmark = pytest.mark.dist


def assemble(per_rank: dict[int, dict], table: str, num_rows: int | None = None) -> torch.Tensor:
    """The whole table from every rank's shards (each row exactly once)."""
    shards = sorted((start, rows) for r in per_rank.values() for start, rows in r[table])
    full = torch.cat([rows for _, rows in shards])
    starts = [start for start, _ in shards]
    assert starts == sorted(set(starts)) and starts[0] == 0
    if num_rows is not None:
        assert full.shape[0] == num_rows
    return full


def initial_table(seed: int, index: int, rows: int, dim: int) -> torch.Tensor:
    out = torch.empty(rows, dim)
    init_rows(out, 0, seed, index)
    return out


# ------------------------------------------------------------------------------ 2 ranks == 1 rank
@pytest.fixture(scope="module")
def equivalence(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist-tables")
    seqs = workers.full_length_sequences(num_users=64, num_items=30, length=12)
    write_tiny_dataset(root / "data", max_len=8, sequences=seqs)
    data = str(root / "data")
    out = {}
    for optimizer in ("rowwise_adagrad", "sgd"):
        one = launch(workers.tables_equivalence_worker, 1, data, str(root / f"one-{optimizer}"), 4, 3, optimizer)
        two = launch(workers.tables_equivalence_worker, 2, data, str(root / f"two-{optimizer}"), 4, 3, optimizer)
        out[optimizer] = (one, two)
    return out


@pytest.mark.parametrize("optimizer", ["rowwise_adagrad", "sgd"])
def test_two_sharded_ranks_match_one_rank(equivalence, optimizer):
    one, two = equivalence[optimizer]
    assert two[0]["plan"]["item"]["sharding"] in ("row_wise", "table_wise")
    for rank in (0, 1):
        assert two[rank]["losses"] == pytest.approx(one[0]["losses"], rel=1e-5, abs=1e-6)
        for name, value in one[0]["params"].items():
            torch.testing.assert_close(two[rank]["params"][name], value, rtol=1e-4, atol=1e-5, msg=name)
    for table in one[0]["tables"]:
        want = assemble({0: one[0]["tables"]}, table)
        got = assemble({r: two[r]["tables"] for r in two}, table)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=table)
        # the initial rows do not depend on the world size or the plan
        init_two = assemble({r: two[r]["initial"] for r in two}, table)
        init_one = assemble({0: one[0]["initial"]}, table)
        torch.testing.assert_close(init_two, init_one, rtol=0, atol=0)
    moved = float((assemble({0: one[0]["tables"]}, "item") - assemble({0: one[0]["initial"]}, "item")).abs().sum())
    assert moved > 1e-3  # the tables were trained, so the equality is not trivial


# ------------------------------------------------------------------------------ fused update == reference
def reference_updates(optimizer: str, lrs: list[float], world: int) -> dict[str, torch.Tensor]:
    """Plain-tensor replay: per step, the gradient of every row summed over all its occurrences on all
    ranks and averaged over ranks (each rank's loss is its own); then SGD or row-wise Adagrad (one
    accumulator per row: the mean of g^2 over the row)."""
    specs = workers.update_specs()
    weights = {t.name: initial_table(11, i, t.num_embeddings, 4).double() for i, t in enumerate(specs)}
    table_of = {f: t for t in specs for f in t.features}
    state = {t.name: torch.zeros(t.num_embeddings, dtype=torch.float64) for t in specs}
    for step, lr in enumerate(lrs):
        ids, w = workers.update_inputs(step, world)
        grads = {t.name: torch.zeros(t.num_embeddings, 4, dtype=torch.float64) for t in specs}
        for feature, x in ids.items():
            table = table_of[feature].name
            for r in range(world):
                if table_of[feature].multi_valued and feature == table:  # sum pooling over the non-pad ids
                    for bag, row_ids in enumerate(x[r]):
                        for i in row_ids.tolist():
                            if i != 0:
                                grads[table][i] += w[feature][r][bag].double() / world
                else:
                    for pos, i in enumerate(x[r].tolist()):
                        grads[table][i] += w[feature][r][pos].double() / world
        for name, g in grads.items():
            if optimizer == "sgd":
                weights[name] -= lr * g
            else:
                touched = g.abs().sum(1) > 0
                state[name] += torch.where(touched, (g * g).mean(1), 0.0)
                step_size = lr / (state[name].sqrt() + 1e-8)
                weights[name] -= torch.where(touched.unsqueeze(1), step_size.unsqueeze(1) * g, 0.0)
    return {k: v.float() for k, v in weights.items()}


@pytest.mark.parametrize("lrs", [[0.1, 0.1, 0.1], [0.02, 0.1, 0.03]], ids=["constant", "scheduled"])
@pytest.mark.parametrize("optimizer", ["rowwise_adagrad", "sgd"])
def test_fused_table_updates_equal_the_reference(optimizer, lrs):
    got = launch(workers.table_update_worker, 2, optimizer, lrs)
    want = reference_updates(optimizer, lrs, world=2)
    for spec in workers.update_specs():
        torch.testing.assert_close(assemble({r: got[r]["tables"] for r in got}, spec.name, spec.num_embeddings),
                                   want[spec.name], rtol=1e-5, atol=1e-6, msg=spec.name)


# ------------------------------------------------------------------------------ sharded full ranking
@pytest.mark.parametrize(
    "exclude_seen,num_items,per_rank",
    [(True, 37, [5, 3]), (False, 37, [5, 3]), (True, 1301, [600, 301])],  # last: several score blocks
)
def test_sharded_ranks_and_top_k_equal_those_over_the_whole_table(exclude_seen, num_items, per_rank):
    dim = 8  # uneven per_rank: the short rank's rows pad the gather
    got = launch(workers.sharded_ranks_worker, 2, num_items, dim, per_rank, exclude_seen)
    half = -(-num_items // 2)
    assert sorted(s for r in got.values() for s in r["shards"]) == [(0, half), (half, num_items - half)]
    table = initial_table(5, 0, num_items, dim)
    for rank in (0, 1):
        query, targets, history = workers.ranking_inputs(rank, per_rank[rank], num_items, dim)
        want = target_ranks(query @ table.T, targets, history if exclude_seen else None)
        assert torch.equal(got[rank]["ranks"], want), (rank, got[rank]["ranks"], want)
        # top-10 merged over the ranks' shards == topk over the whole table, seen and reserved ids excluded
        scores = query @ table.T
        scores[:, :2] = -float("inf")
        if exclude_seen:
            scores.scatter_(1, history, -float("inf"))
        want_top = scores.topk(10, dim=1)
        got_scores, got_ids = got[rank]["top"]
        torch.testing.assert_close(got_scores, want_top.values)
        assert torch.equal(got_ids, want_top.indices)


# ------------------------------------------------------------------------------ the trainer
@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist-tables-train")
    write_tiny_dataset(root, num_users=64, num_items=30, max_len=8, row_group_rows=4)
    return str(root)


def _sets(data: str, run_dir: Path, **extra) -> dict:
    return {
        "data": data,
        "run_dir": str(run_dir),
        "embeddings.backend": "torchrec",
        "loss.kind": "sampled",
        "loss.num_negatives": 8,
        "train.max_steps": 8,
        "train.micro_batch_size": 4,
        "train.global_batch_size": 8,
        "train.save_every": 4,
        "train.eval_every": 4,
        "checkpoint.keep_last_k": 10,
        **extra,
    }


def test_trainer_with_sharded_tables_resumes_exactly_and_exports(data, tmp_path):
    from seqrec.data.schema import read_manifest
    from seqrec.distributed import DistInfo
    from seqrec.engine import TABLES_DIR
    from seqrec.evaluate import by_scores, evaluate
    from seqrec.export import export_model, load_exported
    from seqrec.tables import PLAN_FILE, consolidate

    full, cut = tmp_path / "full", tmp_path / "cut"
    launch(workers.train_worker, 2, _sets(data, full))
    assert launch(workers.train_worker, 2, _sets(data, cut, **{"train.stop_after": 3}))[0] is None
    launch(workers.train_worker, 2, _sets(data, cut))

    cfg = workers.tiny_config(**_sets(data, full))
    model, _, _ = load_exported(export_model(cfg, checkpoint="last", output=tmp_path / "export-full"))
    last_full = ckpt.checkpoint_root(full) / "step_00000008"
    last_cut = ckpt.checkpoint_root(cut) / "step_00000008"
    plan = json.loads((last_full / TABLES_DIR / PLAN_FILE).read_text())
    assert set(plan) == {t.name for t in model.tables}
    want = consolidate(last_full / TABLES_DIR, model.tables, cfg.embeddings.dim)
    torch.testing.assert_close(consolidate(last_cut / TABLES_DIR, model.tables, cfg.embeddings.dim), want, rtol=0, atol=0)
    assert math.isfinite(float(want.sum())) and not torch.equal(want, torch.zeros_like(want))
    r_full = json.loads((full / "results.json").read_text())
    r_cut = json.loads((cut / "results.json").read_text())
    assert r_cut["test"] == r_full["test"]

    # The consolidated export scores like the run's own sharded evaluation of its best checkpoint.
    best, _, _ = load_exported(export_model(cfg, checkpoint="best", output=tmp_path / "export-best"))
    info = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    with torch.no_grad():
        scorer = by_scores(lambda b: best(b, task="score")["scores"], cfg.eval.exclude_seen)
        metrics = evaluate(scorer, read_manifest(data), "test", cfg.eval, info)
    assert metrics == pytest.approx(r_full["test"], rel=1e-6)
