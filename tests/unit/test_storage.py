"""The storage layer (seqrec/data/storage.py) on the local file system and on a real S3 API (moto's
server on 127.0.0.1), and everything that reads shards through it: manifest, split checks, item
features, DataSpec, ShardLoader. Shards read from S3 must give exactly the rows of the local copy."""

from __future__ import annotations

import hashlib
import json
import socket
import time

import pyarrow as pa
import pytest
import torch

from seqrec.data import schema, storage
from seqrec.data.loader import ShardLoader, row_groups_per_rank
from seqrec.data.schema import SchemaError, StorageError
from seqrec.data.spec import DataSpec
from tests.conftest import free_port
from tests.fixtures import write_tiny_dataset

pytestmark = pytest.mark.unit


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path) -> str:
    """An empty folder: a local path or an s3:// prefix."""
    if request.param == "local":
        return str(tmp_path / "store")
    return request.getfixturevalue("s3_bucket") + "/store"


@pytest.fixture
def shards(tmp_path, s3_bucket) -> tuple[schema.Manifest, str]:
    """(manifest of a local tiny shard folder, the same folder uploaded to S3 through the storage layer)."""
    local = write_tiny_dataset(tmp_path / "shards", num_users=48, files_per_split=2, row_group_rows=4)
    url = f"{s3_bucket}/prefix/shards"
    copied = storage.copy_tree(local.root, url)
    assert schema.MANIFEST_FILE in copied and "train/part-00001.parquet" in copied
    return local, url


def test_round_trip_bytes_tables_sha256_listing(root) -> None:
    data = b"seqrec\n" * 1000
    storage.write_bytes(storage.join(root, "a/b.txt"), data)
    assert storage.read_bytes(storage.join(root, "a/b.txt")) == data
    assert storage.sha256(storage.join(root, "a/b.txt")) == hashlib.sha256(data).hexdigest()
    assert storage.exists(storage.join(root, "a/b.txt")) and storage.is_file(storage.join(root, "a/b.txt"))
    assert storage.is_dir(storage.join(root, "a")) and not storage.is_file(storage.join(root, "a"))
    assert not storage.exists(storage.join(root, "a/missing.txt"))

    table = pa.table({"id": pa.array([3, 1, 2], pa.int32()), "value": ["c", "a", "b"]})
    for name in ("t/y.parquet", "t/x.parquet"):
        storage.write_table(table, storage.join(root, name), compression="zstd")
    storage.write_bytes(storage.join(root, "t/notes.txt"), b"x")
    assert storage.read_table(storage.join(root, "t/x.parquet")).equals(table)
    assert storage.parquet_file(storage.join(root, "t/x.parquet")).metadata.num_rows == 3
    assert storage.list_files(storage.join(root, "t"), ".parquet") == [
        storage.join(storage.join(root, "t"), n) for n in ("x.parquet", "y.parquet")
    ]
    with storage.parquet_writer(storage.join(root, "w.parquet"), table.schema) as writer:
        writer.write_table(table)
    assert storage.read_table(storage.join(root, "w.parquet")).equals(table)

    storage.copy_file(storage.join(root, "a/b.txt"), storage.join(root, "copy/b.txt"))
    assert storage.read_bytes(storage.join(root, "copy/b.txt")) == data
    assert sorted(storage.copy_tree(storage.join(root, "t"), storage.join(root, "t2"))) == [
        "notes.txt", "x.parquet", "y.parquet"
    ]
    assert storage.read_table(storage.join(root, "t2/y.parquet")).equals(table)


def test_missing_object_raises_schema_error_naming_the_url(root) -> None:
    url = storage.join(root, "nothing/here.parquet")
    for read in (storage.read_bytes, storage.read_table, storage.sha256, storage.parquet_file):
        with pytest.raises(SchemaError, match=f"^{url}: no such file") as e:
            read(url)
        assert not isinstance(e.value, StorageError)
    with pytest.raises(SchemaError, match=f"{storage.join(root, 'nothing/manifest.json')}: no manifest"):
        schema.read_manifest(storage.join(root, "nothing"))


def test_s3a_and_s3n_name_the_same_objects_as_s3(s3_bucket) -> None:
    bucket = s3_bucket.removeprefix("s3://")
    storage.write_bytes(f"s3a://{bucket}/k/v.txt", b"hello")
    assert storage.read_bytes(f"s3://{bucket}/k/v.txt") == b"hello"
    assert storage.read_bytes(f"s3n://{bucket}/k/v.txt") == b"hello"


def test_spark_job_writes_through_the_same_layer(s3_bucket) -> None:
    from spark_jobs import storage as job_storage

    table = pa.table({"id": pa.array([0, 1], pa.int32())})
    url = s3_bucket.replace("s3://", "s3a://") + "/vocab/item.parquet"
    job_storage.write_table(table, url)
    assert job_storage.exists(url)
    assert storage.read_table(s3_bucket + "/vocab/item.parquet").equals(table)
    assert storage.parquet_file(url).metadata.row_group(0).column(0).compression == "ZSTD"


def test_unreachable_endpoint_fails_fast_with_the_url(s3_bucket, monkeypatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    url = f"{s3_bucket}/shards"
    t0 = time.monotonic()
    with pytest.raises(StorageError, match=rf"^{url}/manifest.json: storage access failed \(endpoint http://127.0.0.1:\d+\)") as e:
        schema.read_manifest(url)
    assert time.monotonic() - t0 < 30
    assert "connect" in str(e.value).lower()


def test_endpoint_that_never_answers_times_out(s3_bucket, monkeypatch) -> None:
    # Accepts the connection (kernel backlog) but never answers: the request timeout and the retry
    # limit bound the wait. The defaults keep every case under a minute.
    assert storage.CONNECT_TIMEOUT_S * storage.MAX_ATTEMPTS < 60
    assert storage.REQUEST_TIMEOUT_S * storage.MAX_ATTEMPTS < 60
    monkeypatch.setattr(storage, "REQUEST_TIMEOUT_S", 1.0)
    monkeypatch.setattr(storage, "MAX_ATTEMPTS", 2)
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{silent.getsockname()[1]}")
        t0 = time.monotonic()
        with pytest.raises(StorageError, match=f"^{s3_bucket}/x.bin: storage access failed"):
            storage.read_bytes(f"{s3_bucket}/x.bin")
        assert time.monotonic() - t0 < 15


def test_endpoint_env_precedence(monkeypatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://general:1")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://s3-only:2")
    assert storage.s3_endpoint() == "http://s3-only:2"
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3")
    assert storage.s3_endpoint() == "http://general:1"


def test_unknown_scheme_is_a_schema_error() -> None:
    with pytest.raises(SchemaError, match="^nope://b/x: unsupported URL"):
        storage.read_bytes("nope://b/x")


def test_manifest_checks_and_item_features_from_s3_equal_local(shards) -> None:
    local, url = shards
    remote = schema.read_manifest(url)
    assert remote.raw == local.raw and remote.root == url
    for split in schema.SPLITS:
        schema.verify_split(remote, split, check_sha256=True)
        assert [schema.sha256_file(remote.path(f.path)) for f in remote.files(split)] == [f.sha256 for f in local.files(split)]
        assert row_groups_per_rank(remote, split, 2) == row_groups_per_rank(local, split, 2)
    assert schema.item_features_table(remote).equals(schema.item_features_table(local))
    a, b = DataSpec.from_manifest(remote), DataSpec.from_manifest(local)
    assert a.item_features.keys() == b.item_features.keys()
    for name in a.item_features:
        assert torch.equal(a.item_features[name], b.item_features[name])
    assert torch.equal(a.item_counts, b.item_counts)


def test_verify_split_on_s3_detects_changed_and_missing_shards(shards) -> None:
    local, url = shards
    raw = json.loads(json.dumps(local.raw))
    raw["splits"]["train"]["files"][0]["sha256"] = "0" * 64
    raw["splits"]["valid"]["files"][1]["rows"] += 1
    raw["splits"]["test"]["files"][0]["path"] = "test/part-99999.parquet"
    storage.write_bytes(f"{url}/manifest.json", json.dumps(raw).encode())
    m = schema.read_manifest(url)
    schema.verify_split(m, "train")  # row counts still agree
    with pytest.raises(SchemaError, match=f"^{url}/train/part-00000.parquet: sha256 differs"):
        schema.verify_split(m, "train", check_sha256=True)
    with pytest.raises(SchemaError, match=f"^{url}/valid/part-00001.parquet: has \\d+ rows, manifest says"):
        schema.verify_split(m, "valid")
    with pytest.raises(SchemaError, match=f"^{url}/test/part-99999.parquet: shard listed in {url}/manifest.json is missing"):
        schema.verify_split(m, "test")


def _read(manifest: schema.Manifest, split: str, rank: int, train: bool, num_batches: int) -> list[dict[str, torch.Tensor]]:
    loader = ShardLoader(manifest, split, dp_rank=rank, dp_world_size=2, batch_size=8, seed=3, train=train)
    out = []
    with iter(loader) as batches:
        for batch in batches:
            out.append(batch)
            if len(out) == num_batches:
                break
    return out


@pytest.mark.parametrize(("split", "train"), [("train", True), ("test", False)])
def test_shard_loader_reads_the_same_batches_from_s3(shards, split, train) -> None:
    local, url = shards
    remote = schema.read_manifest(url)
    loader = ShardLoader(remote, split, dp_rank=0, dp_world_size=2, batch_size=8, train=train)
    assert isinstance(loader.filesystem, storage.LegacyArrowFileSystem)  # really through S3
    assert ShardLoader(local, split, dp_rank=0, dp_world_size=2, batch_size=8, train=train).filesystem is None
    for rank in (0, 1):
        # Training: past the end of the first epoch (a new shuffled reader per epoch).
        a, b = (_read(m, split, rank, train, num_batches=8) for m in (remote, local))
        assert len(a) == len(b) > 0
        if train:
            assert len(a) > ShardLoader(local, split, dp_rank=rank, dp_world_size=2, batch_size=8).steps_per_epoch
        for x, y in zip(a, b, strict=True):
            assert x.keys() == y.keys()
            for key in x:
                assert torch.equal(x[key], y[key]), key
