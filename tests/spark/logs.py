"""Hand-written event logs for the Spark tests, and small config builders.

KNOWN is the log whose outputs test_prepare_known.py spells out by hand. Rows (input order):

     0 a 1 100 view      5 a 2 300 view      10 b 3  20 view     15 a 1 100 click  (not a duplicate of 0)
     1 a 2 100 click     6 a 3 400 like      11 b 9  30 view     16 a 2 600 view
     2 a 3  50 view      7 a 1 500 view      12 c 1   5 view
     3 a 1 100 view      8 b 2  10 view      13 c 2   6 view
       (duplicate of 0)  9 b 1  10 view      14 d 4   7 view
     4 a 4 200 view        (tie with 8)

Items table: 1 -> category x, tags "p|q"; 2 -> y, "q"; 3 -> x, "" (no tags); 4 -> z, "p|q|r|p"; 9 absent.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from seqrec.config import (
    ColumnsConfig,
    FilterConfig,
    InputConfig,
    PrepareConfig,
    RunConfig,
    ShardConfig,
    SplitConfig,
    validate,
)

KNOWN = [
    ("a", 1, 100, "view"),
    ("a", 2, 100, "click"),
    ("a", 3, 50, "view"),
    ("a", 1, 100, "view"),
    ("a", 4, 200, "view"),
    ("a", 2, 300, "view"),
    ("a", 3, 400, "like"),
    ("a", 1, 500, "view"),
    ("b", 2, 10, "view"),
    ("b", 1, 10, "view"),
    ("b", 3, 20, "view"),
    ("b", 9, 30, "view"),
    ("c", 1, 5, "view"),
    ("c", 2, 6, "view"),
    ("d", 4, 7, "view"),
    ("a", 1, 100, "click"),
    ("a", 2, 600, "view"),
]
KNOWN_ITEMS = [(1, "x", "p|q"), (2, "y", "q"), (3, "x", ""), (4, "z", "p|q|r|p")]


def write_known(root: Path, rows_per_file: int = 9) -> tuple[Path, Path]:
    """KNOWN as two Parquet files (input order spans files) and the item table; returns their paths."""
    events = root / "events"
    events.mkdir(parents=True)
    for i in range(0, len(KNOWN), rows_per_file):
        chunk = KNOWN[i : i + rows_per_file]
        table = pa.table(
            {
                "user_id": [r[0] for r in chunk],
                "item_id": pa.array([r[1] for r in chunk], pa.int64()),
                "ts": pa.array([r[2] for r in chunk], pa.int64()),
                "action": [r[3] for r in chunk],
            }
        )
        pq.write_table(table, events / f"part-{i // rows_per_file:05d}.parquet")
    items = root / "items.parquet"
    pq.write_table(
        pa.table(
            {
                "item_id": pa.array([r[0] for r in KNOWN_ITEMS], pa.int64()),
                "category": [r[1] for r in KNOWN_ITEMS],
                "tags": [r[2] for r in KNOWN_ITEMS],
            }
        ),
        items,
    )
    return events, items


def config(
    events: Path | str, output: Path | str, items: Path | str = "", **sections: object
) -> PrepareConfig:
    """A small PrepareConfig: 2 files per split, world size 1, tiny row groups, 2 shuffle partitions."""
    cfg = PrepareConfig(
        input=InputConfig(
            path=str(events), item_features_path=str(items), item_single_features=[], valid_actions=[]
        ),
        filters=FilterConfig(min_user_events=1),
        split=SplitConfig(max_len=3),
        shards=ShardConfig(files_per_split=2, max_world_size=1, row_group_rows=2),
        output=str(output),
        dataset_name="test",
        shuffle_partitions=2,
    )
    for key, value in sections.items():  # input__format="csv" sets cfg.input.format
        section, _, name = key.partition("__")
        target, attr = (getattr(cfg, section), name) if name else (cfg, section)
        setattr(target, attr, value)
    validate(RunConfig(prepare=cfg))  # the same rules as a TOML file
    return cfg


def columns(**kwargs: object) -> ColumnsConfig:
    return ColumnsConfig(**kwargs)  # type: ignore[arg-type]
