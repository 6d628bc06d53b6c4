"""The MovieLens adapters on the real files in ../shared/data (skipped with a reason when absent):
the configs in configs/ run as they are, only input and output folders are redirected."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest

from seqrec.config import load_config
from seqrec.data import schema
from spark_jobs.build_sequences import run_prepare
from tests.conftest import REPO_ROOT, shared_data

pytestmark = pytest.mark.spark


def _prepare(spark, name: str, tmp_path, **paths: str) -> tuple[dict, schema.Manifest]:
    cfg = load_config(REPO_ROOT / "configs" / f"{name}.toml").prepare
    folder = str(shared_data(name))
    cfg.input.path = folder
    if cfg.input.item_features_path:
        cfg.input.item_features_path = folder
    cfg.output = str(tmp_path / "shards")
    cfg.shuffle_partitions = 2
    m = run_prepare(cfg, spark)
    manifest = schema.read_manifest(cfg.output)
    for split in schema.SPLITS:
        schema.verify_split(manifest, split)
    return m, manifest


def _genres(out, item: str) -> set[str]:
    items = {r["value"]: r["id"] for r in pq.read_table(f"{out}/vocab/item.parquet").to_pylist()}
    names = {r["id"]: r["value"] for r in pq.read_table(f"{out}/vocab/genres.parquet").to_pylist()}
    ids = pq.read_table(f"{out}/{schema.ITEM_FEATURES_FILE}").column("genres")[items[item]].as_py()
    return {names[i] for i in ids if i}


def test_movielens_100k(spark, tmp_path):
    m, manifest = _prepare(spark, "movielens-100k", tmp_path)
    assert m["stats"] == {
        "events_in": 100_000,
        "kept": 100_000,
        "quarantined": 0,
        "duplicates": 0,
        "filtered": 0,
        "users": 943,
        "items": 1_682,
    }
    assert manifest.rows("test") == manifest.rows("valid") == manifest.rows("train") == 943
    assert m["features"]["genres"] == {"kind": "item_multi", "num_embeddings": 19 + 2, "max_values": 6}
    assert _genres(manifest.root, "1") == {"Animation", "Children's", "Comedy"}  # Toy Story
    assert schema.item_features_table(manifest).column("train_count").to_numpy().sum() == 100_000 - 2 * 943


def test_movielens_latest_small(spark, tmp_path):
    m, manifest = _prepare(spark, "movielens-latest-small", tmp_path)
    assert m["stats"] == {
        "events_in": 100_836,
        "kept": 100_836,
        "quarantined": 0,
        "duplicates": 0,
        "filtered": 0,
        "users": 610,
        "items": 9_724,
    }
    assert m["features"]["genres"]["num_embeddings"] == 20 + 2
    assert _genres(manifest.root, "11") == {"Comedy", "Drama", "Romance"}  # "American President, The (1995)"


def test_movielens_1m_seq(spark, tmp_path):
    m, manifest = _prepare(spark, "movielens-1m-seq", tmp_path)
    assert (
        m["stats"]["events_in"] == 988_555 and m["stats"]["users"] == 6_040 and m["stats"]["items"] == 3_416
    )
    assert m["stats"]["quarantined"] == m["stats"]["duplicates"] == m["stats"]["filtered"] == 0
    first = next(r for r in pq.read_table(f"{manifest.root}/test").to_pylist() if r["user"] == "1")
    items = {r["id"]: r["value"] for r in pq.read_table(f"{manifest.root}/vocab/item.parquet").to_pylist()}
    lines = [
        ln.split() for ln in (shared_data("movielens-1m-seq") / "sequences.txt").read_text().splitlines()
    ]
    history = [item for user, item in lines if user == "1"]
    assert [items[i] for i in first["item"] if i] == history[-201:]  # line order is time, most recent kept
    assert first["ts"][-1] - first["ts"][-2] == 1  # the line index is the timestamp


def test_movielens_1m_dat_adapter(spark, tmp_path):
    """`::`-separated ratings.dat and movies.dat (latin-1 titles), from a folder; min_rating on ratings."""
    ratings = [
        (u, m, r, 978300000 + 10 * i)
        for i, (u, m, r) in enumerate(
            [
                (1, 10, 5),
                (1, 20, 3),
                (1, 30, 4),
                (1, 40, 5),
                (2, 10, 4),
                (2, 30, 2),
                (2, 20, 5),
                (2, 40, 4),
                (1, 50, 5),
                (2, 50, 4),
            ]
        )
    ]
    (tmp_path / "ratings.dat").write_text("".join(f"{u}::{m}::{r}::{t}\n" for u, m, r, t in ratings))
    movies = "10::GoldenEye (1995)::Action|Adventure|Thriller\n20::\xc9toile (1989)::Drama\n30::Heat (1995)::Action|Crime\n"
    (tmp_path / "movies.dat").write_bytes(movies.encode("latin-1"))
    cfg = load_config(
        None,
        [
            f"prepare.input.path='{tmp_path}'",
            "prepare.input.format='movielens-1m'",
            f"prepare.input.item_features_path='{tmp_path}'",
            "prepare.input.item_features_format='movielens-1m'",
            "prepare.input.item_single_features=[]",
            "prepare.input.item_multi_features=['genres']",
            "prepare.input.valid_actions=[]",
            "prepare.input.columns.action=''",
            "prepare.input.columns.rating='rating'",
            "prepare.filters.min_rating=4.0",
            "prepare.filters.min_user_events=1",
            "prepare.shards.max_world_size=1",
            f"prepare.output='{tmp_path / 'out'}'",
            "prepare.shuffle_partitions=2",
        ],
    ).prepare
    m = run_prepare(cfg, spark)
    assert m["stats"]["events_in"] == 10 and m["filtered"]["min_rating"] == 2 and m["stats"]["kept"] == 8
    test = {r["user"]: r for r in pq.read_table(tmp_path / "out" / "test").to_pylist()}
    items = {
        r["id"]: r["value"] for r in pq.read_table(tmp_path / "out" / "vocab" / "item.parquet").to_pylist()
    }
    assert [items[i] for i in test["1"]["item"] if i] == ["10", "30", "40", "50"]  # 20 was rated 3
    assert _genres(str(tmp_path / "out"), "10") == {"Action", "Adventure", "Thriller"}
    assert _genres(str(tmp_path / "out"), "40") == {"<unk>"}  # not in movies.dat
