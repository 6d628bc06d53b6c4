"""Derived training defaults (seqrec/recipe.py): exact values from manifest statistics, pinned values
left alone, and one-line errors naming the manifest field when nothing can be derived."""

from __future__ import annotations

import pytest

from seqrec import recipe
from seqrec.config import ConfigError, RunConfig, load_config
from seqrec.data.schema import Manifest

pytestmark = pytest.mark.unit


def manifest(rows: int, tokens: int, num_items: int = 3418) -> Manifest:
    raw = {
        "schema_version": 1,
        "max_len": 200,
        "features": {"item": {"kind": "item", "num_embeddings": num_items}},
        "splits": {"train": {"rows": rows, "tokens": tokens, "files": []}},
    }
    return Manifest(root="/data/shards", raw=raw)


def test_movielens_1m_like_data() -> None:
    cfg = RunConfig()
    notes = recipe.resolve(cfg, manifest(6040, 645_238), world_size=2)
    t = cfg.train
    assert (t.global_batch_size, t.micro_batch_size) == (128, 64)
    assert t.epochs == 64 and t.max_steps == 64 * (6040 // 128)  # 47 steps per epoch
    assert cfg.model.dropout == 0.1  # 106.8 events per training row: dense
    assert (t.eval_every, t.save_every, t.early_stopping_patience) == (120, 120, 5)
    assert len(notes) == 8 and all("=" in n for n in notes)


def test_sparse_short_histories_get_high_dropout_and_fewer_epochs() -> None:
    cfg = RunConfig()
    recipe.resolve(cfg, manifest(22_363, 198_502), world_size=1)  # 8.9 events per row
    assert cfg.model.dropout == 0.5
    assert (cfg.train.global_batch_size, cfg.train.micro_batch_size) == (128, 128)
    assert cfg.train.epochs == 17 and cfg.train.max_steps == 17 * (22_363 // 128)


def test_large_data_gets_larger_batches_split_into_micro_batches() -> None:
    cfg = RunConfig()
    recipe.resolve(cfg, manifest(10_000_000, 400_000_000), world_size=2)
    assert cfg.train.global_batch_size == 1024 and cfg.train.micro_batch_size == 256  # 512 per rank: 2 x 256
    assert cfg.train.epochs == 1 and cfg.train.max_steps == 10_000_000 // 1024
    cfg = RunConfig()
    recipe.resolve(cfg, manifest(1_000_000, 40_000_000), world_size=3)
    assert cfg.train.global_batch_size == 513 and cfg.train.micro_batch_size == 171  # 512 rounded up to 3 ranks


@pytest.mark.parametrize("mean,want", [(1.0, 0.5), (10.0, 0.5), (31.6, 0.3), (100.0, 0.1), (900.0, 0.1)])
def test_dropout_is_log_linear_between_sparse_and_dense(mean: float, want: float) -> None:
    assert recipe.derived_dropout(mean) == pytest.approx(want, abs=0.006)


def test_pinned_values_are_kept_and_nothing_is_read() -> None:
    cfg = load_config(None, [
        "train.global_batch_size=64", "train.micro_batch_size=32", "train.max_steps=7", "model.dropout=0.3",
        "train.eval_every=3", "train.save_every=2", "train.early_stopping_patience=0",
    ])
    assert recipe.resolve(cfg, manifest(0, 0, num_items=3), world_size=2) == []  # an unusable manifest is not read
    assert (cfg.train.global_batch_size, cfg.train.micro_batch_size, cfg.train.max_steps) == (64, 32, 7)
    assert (cfg.model.dropout, cfg.train.eval_every, cfg.train.save_every, cfg.train.early_stopping_patience) == (0.3, 3, 2, 0)


def test_epochs_set_the_length_when_max_steps_is_unset() -> None:
    cfg = load_config(None, ["train.epochs=2.5", "train.global_batch_size=100"])
    recipe.resolve(cfg, manifest(1000, 20_000), world_size=1)
    assert cfg.train.max_steps == 25 and cfg.train.eval_every == 1


@pytest.mark.parametrize(
    "rows,tokens,items,match",
    [
        (0, 0, 50, r"/data/shards/manifest.json: splits.train.rows is 0"),
        (10, 100, 3, r"/data/shards/manifest.json: features.item.num_embeddings is 3 \(1 real item\)"),
        (10, 0, 50, r"splits.train.tokens is 0"),
    ],
)
def test_unusable_statistics_name_the_manifest_field(rows: int, tokens: int, items: int, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        recipe.resolve(RunConfig(), manifest(rows, tokens, items), world_size=1)


@pytest.mark.parametrize(
    "edit,message",
    [
        (lambda m: m["splits"]["train"].update(rows=0, tokens=0, files=[]), "splits.train.rows is 0"),
        (lambda m: m["features"]["item"].update(num_embeddings=3), "features.item.num_embeddings is 3"),
    ],
    ids=["empty-train-split", "one-item"],
)
def test_seqrec_train_names_the_manifest_field_exit_2_nothing_written(tmp_path, edit, message) -> None:
    import json
    import subprocess
    import sys

    from tests.fixtures import write_tiny_dataset

    data = tmp_path / "data"
    write_tiny_dataset(data, num_users=16, num_items=12, max_len=4)
    raw = json.loads((data / "manifest.json").read_text())
    edit(raw)
    (data / "manifest.json").write_text(json.dumps(raw))
    run = tmp_path / "run"
    proc = subprocess.run(  # a process of its own: the real command line, logging and exit code
        [sys.executable, "-m", "seqrec", "--log-level", "warning", "train", "--set", f"data.path='{data}'",
         "--set", f"run_dir='{run}'", "--set", "tracking.wandb='disabled'"],
        capture_output=True, text=True, timeout=300,
    )
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2
    assert len(err) == 1 and err[0].startswith("seqrec train: error: ") and message in err[0], err
    assert not run.exists() or not any(run.iterdir())  # at most the empty folder of the writability check
