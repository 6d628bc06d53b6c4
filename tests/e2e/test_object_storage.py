"""Training, export and recommend from shards in object storage (a real S3 API: moto's server on
127.0.0.1), compared with the same commands on the local copy.

`seqrec prepare` cannot write s3a:// here: Spark's S3A connector (hadoop-aws and the AWS SDK bundle
jars) is not on this machine's Spark classpath and cannot be fetched (no Maven access). So Spark
prepares locally, the finished folder is uploaded through seqrec's storage layer, and everything
after that reads `s3://bucket/prefix`.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from seqrec import checkpoint as ckpt
from seqrec.config import load_config
from seqrec.data import schema, storage

pytestmark = [pytest.mark.e2e, pytest.mark.spark]

STEPS = 20
CONFIG = f"""
name = "e2e-s3"
[generate]
num_events = 2_000
num_items = 60
num_categories = 5
mean_events_per_user = 20.0
seed = 3
[prepare]
dataset_name = "synthetic-e2e-s3"
[prepare.split]
max_len = 10
[prepare.shards]
files_per_split = 2
max_world_size = 2
row_group_rows = 8
[model]
d_model = 16
num_heads = 2
num_layers = 1
[embeddings]
dim = 16
[loss]
kind = "sampled"
num_negatives = 16
[optim]
warmup_steps = 2
[train]
micro_batch_size = 8
global_batch_size = 16
max_steps = {STEPS}
log_every = 10
eval_every = {STEPS}
save_every = {STEPS}
[tracking]
wandb = "disabled"
"""


def _env() -> dict[str, str]:
    import os

    return {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "WANDB_SILENT": "true"}


def _seqrec(*args: str, torchrun: bool = False) -> str:
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"] if torchrun else []
    cmd = [sys.executable, *launcher, "-m", "seqrec", *args]
    proc = subprocess.run(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:]
    return proc.stdout


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, spark) -> tuple[Path, Path]:
    """(config file, local shard folder prepared by Spark)."""
    root = tmp_path_factory.mktemp("e2e-s3")
    config = root / "e2e.toml"
    text = CONFIG.replace("[generate]\n", f'[generate]\noutput = "{root}/log"\n', 1)
    text = text.replace("[prepare]\n", f'[prepare]\noutput = "{root}/shards"\n', 1)
    text = text.replace("[prepare.split]", f'[prepare.input]\npath = "{root}/log/events"\n'
                        f'item_features_path = "{root}/log/items.parquet"\n[prepare.split]', 1)
    config.write_text(text + f'\n[data]\npath = "{root}/shards"\n')
    _seqrec("generate", "--config", str(config))
    from spark_jobs.build_sequences import run_prepare

    run_prepare(load_config(config).prepare, spark=spark)
    return config, root / "shards"


def test_train_export_recommend_from_s3_equal_local(prepared, s3_bucket, tmp_path) -> None:
    config, local = prepared
    url = f"{s3_bucket}/prefix/shards"
    copied = storage.copy_tree(str(local), url)
    assert schema.MANIFEST_FILE in copied and any(p.startswith("vocab/") for p in copied)
    assert schema.read_manifest(url).raw == schema.read_manifest(local).raw

    runs = {"local": tmp_path / "run-local", "s3": tmp_path / "run-s3"}
    data = {"local": str(local), "s3": url}
    for kind, run_dir in runs.items():
        _seqrec("train", "--config", str(config), "--run-dir", str(run_dir),
                "--set", f"data.path='{data[kind]}'", torchrun=True)
    r_local, r_s3 = (json.loads((runs[k] / "results.json").read_text()) for k in ("local", "s3"))
    assert r_s3["data"] == url and r_local["data"] == str(local)
    assert r_s3["train"]["steps"] == STEPS and r_s3["train"]["sequences"] == STEPS * 16
    assert r_s3["test"] == r_local["test"] and r_s3["popularity"] == r_local["popularity"]
    final = f"step_{STEPS:08d}/mp_rank_00_model_states.pt"
    a, b = (torch.load(ckpt.checkpoint_root(runs[k]) / final, weights_only=False)["module"] for k in ("s3", "local"))
    assert a.keys() == b.keys()
    for name in b:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=name)

    # Export copies manifest, item features and vocabularies out of the bucket; recommend reads
    # histories from it (a split folder and a single file).
    export = tmp_path / "export"
    _seqrec("export", "--config", str(config), "--run-dir", str(runs["s3"]), "--checkpoint", "last",
            "--set", f"data.path='{url}'", "--output", str(export))
    for rel in copied:
        if rel == schema.MANIFEST_FILE or rel == schema.ITEM_FEATURES_FILE or rel.startswith("vocab/"):
            assert (export / rel).read_bytes() == (local / rel).read_bytes(), rel
    first_test_file = schema.read_manifest(local).files("test")[0].path
    for source, name in ((f"{url}/test", "s3"), (str(local / "test"), "local"),
                         (f"{url}/{first_test_file}", "s3-file")):
        _seqrec("recommend", "--model", str(export), "--input", source, "--output", str(tmp_path / f"{name}.parquet"), "--k", "5")
    recs = {n: pq.read_table(tmp_path / f"{n}.parquet") for n in ("s3", "local", "s3-file")}
    assert recs["s3"].num_rows == 5 * schema.read_manifest(local).rows("test")
    assert recs["s3"].equals(recs["local"])
    assert recs["s3-file"].equals(recs["local"].slice(0, recs["s3-file"].num_rows))


def test_cli_reports_missing_and_unreachable_storage_in_one_line(s3_bucket, monkeypatch, tmp_path) -> None:
    from tests.conftest import free_port

    url = f"{s3_bucket}/nothing/shards"
    args = [sys.executable, "-m", "seqrec", "train", "--dry-run", "--run-dir", str(tmp_path / "run"),
            "--set", f"data.path='{url}'", "--set", "tracking.wandb=disabled"]
    for endpoint, message in ((None, f"{url}/manifest.json: no manifest"),
                              (f"http://127.0.0.1:{free_port()}", f"{url}/manifest.json: storage access failed")):
        if endpoint:
            monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
        proc = subprocess.run(args, env=_env(), capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2, proc.stderr[-2000:]
        errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
        assert len(errors) == 1 and errors[0].startswith("seqrec train: error: ") and message in errors[0]
