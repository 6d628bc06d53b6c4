"""The shard contract between the Spark job and the trainer, defined once (no torch import).

An output folder of `seqrec prepare` holds:

    manifest.json                 written last: a folder without it is not a finished output
    vocab/<feature>.parquet       id int32, value string, count int64; id 0 = <pad>, 1 = <unk>
    item_features.parquet         one row per item id 0..num_items-1: item, train_count, and one
                                  column per item side feature (int32, or list<int32> padded to
                                  max_values with 0 for multi-valued features)
    train/part-NNNNN.parquet      one row per training sequence
    valid/part-NNNNN.parquet      one row per validation user
    test/part-NNNNN.parquet       one row per test user
    quarantine/                   rejected input rows with a `reason` column

Every split row has the same layout. Lists have a fixed width `max_len + 1` (petastorm needs equal
lengths) and are LEFT-padded, so the most recent event is always the last element:

    user     string          raw user id
    length   int32           number of real events in the row (<= max_len + 1)
    item     list<int32>     item ids
    ts       list<int64>     event unix seconds (0 in padding)
    <event feature> list<int32>  one per event-level feature (action, context columns)
    target   int32           valid/test rows only: the held-out item, equal to item[-1]

The model reads `item[:-1]` as input and `item[1:]` as next-item labels. On valid/test rows only the
last label (the target) is scored, so the same row layout serves all splits.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from seqrec.data import storage
from seqrec.data.errors import SchemaError, StorageError
from seqrec.data.storage import join

SCHEMA_VERSION = 1
PAD_ID = 0
UNK_ID = 1
NUM_RESERVED_IDS = 2
PAD_VALUE = "<pad>"
UNK_VALUE = "<unk>"
SPLITS = ("train", "valid", "test")
EVAL_SPLITS = ("valid", "test")
MANIFEST_FILE = "manifest.json"
ITEM_FEATURES_FILE = "item_features.parquet"
VOCAB_DIR = "vocab"
QUARANTINE_DIR = "quarantine"

COL_USER = "user"
COL_LENGTH = "length"
COL_ITEM = "item"
COL_TS = "ts"
COL_TARGET = "target"
COL_TRAIN_COUNT = "train_count"

# Feature kinds in manifest["features"][name]["kind"].
KIND_ITEM = "item"  # the item id itself
KIND_ITEM_SINGLE = "item_single"  # single-valued item side feature (category)
KIND_ITEM_MULTI = "item_multi"  # multi-valued item side feature (genres)
KIND_EVENT = "event"  # per-event feature (action type, context)
FEATURE_KINDS = (KIND_ITEM, KIND_ITEM_SINGLE, KIND_ITEM_MULTI, KIND_EVENT)


__all__ = ["SchemaError", "StorageError", "join"]  # re-exported: callers import them from here


@dataclass(frozen=True, slots=True)
class FeatureSpec:
    name: str
    kind: str
    num_embeddings: int
    max_values: int = 1  # > 1 only for item_multi


@dataclass(frozen=True, slots=True)
class ShardFile:
    path: str  # relative to the output folder
    rows: int
    tokens: int
    row_groups: int
    sha256: str


@dataclass(frozen=True, slots=True)
class Manifest:
    """A parsed, validated manifest.json. `root` is the folder it was read from."""

    root: str
    raw: dict[str, Any]

    @property
    def dataset(self) -> str:
        return str(self.raw.get("dataset", "unknown"))

    @property
    def max_len(self) -> int:
        return int(self.raw["max_len"])

    @property
    def row_width(self) -> int:
        return self.max_len + 1

    @property
    def split_kind(self) -> str:
        return str(self.raw.get("split_kind", "leave_one_out"))

    @property
    def features(self) -> dict[str, FeatureSpec]:
        return {
            name: FeatureSpec(name, f["kind"], int(f["num_embeddings"]), int(f.get("max_values", 1)))
            for name, f in self.raw["features"].items()
        }

    @property
    def num_items(self) -> int:
        return self.features["item"].num_embeddings

    @property
    def event_features(self) -> list[str]:
        return [n for n, f in self.features.items() if f.kind == KIND_EVENT]

    @property
    def item_side_features(self) -> list[str]:
        return [n for n, f in self.features.items() if f.kind in (KIND_ITEM_SINGLE, KIND_ITEM_MULTI)]

    def files(self, split: str) -> list[ShardFile]:
        if split not in self.raw["splits"]:
            raise SchemaError(f"{self.manifest_path}: no split '{split}' (has {sorted(self.raw['splits'])})")
        return [ShardFile(**f) for f in self.raw["splits"][split]["files"]]

    def rows(self, split: str) -> int:
        return int(self.raw["splits"][split]["rows"])

    @property
    def manifest_path(self) -> str:
        return join(self.root, MANIFEST_FILE)

    def path(self, relative: str) -> str:
        return join(self.root, relative)


def shard_arrow_schema(event_features: list[str], with_target: bool) -> Any:
    """The exact Arrow schema of a shard file: the one definition the Spark writer and the test
    fixtures both write with (validation/test rows carry `target`)."""
    import pyarrow as pa

    fields = [
        pa.field(COL_USER, pa.string()),
        pa.field(COL_LENGTH, pa.int32()),
        pa.field(COL_ITEM, pa.list_(pa.int32())),
        pa.field(COL_TS, pa.list_(pa.int64())),
        *[pa.field(c, pa.list_(pa.int32())) for c in event_features],
    ]
    if with_target:
        fields.append(pa.field(COL_TARGET, pa.int32()))
    return pa.schema(fields)


def sha256_file(path: str | Path, chunk_bytes: int = 1 << 20) -> str:
    """sha256 of a local file or URL (seqrec.data.storage)."""
    return storage.sha256(path, chunk_bytes)


def _require(raw: dict[str, Any], key: str, path: str) -> Any:
    if key not in raw:
        raise SchemaError(f"{path}: manifest has no '{key}'")
    return raw[key]


def parse_manifest(raw: dict[str, Any], root: str) -> Manifest:
    path = join(root, MANIFEST_FILE)
    version = _require(raw, "schema_version", path)
    if version != SCHEMA_VERSION:
        raise SchemaError(
            f"{path}: schema_version {version} but this seqrec reads version {SCHEMA_VERSION}; "
            "re-run `seqrec prepare` with this version"
        )
    for key in ("max_len", "features", "splits"):
        _require(raw, key, path)
    features = raw["features"]
    if "item" not in features or features["item"].get("kind") != KIND_ITEM:
        raise SchemaError(f"{path}: features.item with kind 'item' is required")
    for name, f in features.items():
        if f.get("kind") not in FEATURE_KINDS:
            raise SchemaError(f"{path}: features.{name}.kind {f.get('kind')!r} is not one of {FEATURE_KINDS}")
        if int(f.get("num_embeddings", 0)) < NUM_RESERVED_IDS:
            raise SchemaError(f"{path}: features.{name}.num_embeddings must be >= {NUM_RESERVED_IDS}")
    return Manifest(root=root, raw=raw)


def read_manifest(root: str | Path) -> Manifest:
    """Read and validate `<root>/manifest.json`; `root` is a local folder or a URL (seqrec.data.storage)."""
    root = str(root)
    path = join(root, MANIFEST_FILE)
    if not storage.is_file(path):
        raise SchemaError(f"{path}: no manifest; is this a finished `seqrec prepare` output folder?")
    try:
        raw = json.loads(storage.read_bytes(path))
    except json.JSONDecodeError as e:
        raise SchemaError(f"{path}: manifest is not valid JSON ({e})") from None
    return parse_manifest(raw, root)


def verify_split(manifest: Manifest, split: str, check_sha256: bool = False) -> None:
    """Check every shard of a split exists and has the row count the manifest records."""
    for f in manifest.files(split):
        path = manifest.path(f.path)
        if not storage.is_file(path):
            raise SchemaError(f"{path}: shard listed in {manifest.manifest_path} is missing")
        try:
            meta = storage.parquet_file(path).metadata
        except StorageError:
            raise
        except Exception as e:  # pyarrow raises several types for corrupt files
            raise SchemaError(f"{path}: not a readable Parquet file ({e})") from None
        if meta.num_rows != f.rows:
            raise SchemaError(f"{path}: has {meta.num_rows} rows, manifest says {f.rows}")
        if check_sha256 and sha256_file(path) != f.sha256:
            raise SchemaError(f"{path}: sha256 differs from the manifest (file changed or corrupt)")


def item_features_table(manifest: Manifest) -> Any:
    """The item feature table as a pyarrow Table, checked against the manifest."""
    path = manifest.path(ITEM_FEATURES_FILE)
    if not storage.is_file(path):
        raise SchemaError(f"{path}: item feature table is missing")
    table = storage.read_table(path)
    if table.num_rows != manifest.num_items:
        raise SchemaError(f"{path}: {table.num_rows} rows but features.item.num_embeddings is {manifest.num_items}")
    missing = [c for c in [COL_ITEM, COL_TRAIN_COUNT, *manifest.item_side_features] if c not in table.column_names]
    if missing:
        raise SchemaError(f"{path}: missing columns {missing}")
    return table
