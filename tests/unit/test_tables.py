"""Sharded-table building blocks that need no process group: config refusals, plan limits, init rows."""

from __future__ import annotations

import pytest
import torch

from seqrec.config import EmbeddingsConfig
from seqrec.embeddings import TableSpec
from seqrec.tables import INIT_BLOCK_ROWS, ShardedTables, TablePlanError, init_rows, parse_sharding

pytestmark = pytest.mark.unit

SPECS = [TableSpec("item", 100, aliases=("item_label",)), TableSpec("genre", 10, multi_valued=True)]


def build(specs=SPECS, **cfg) -> ShardedTables:
    emb = EmbeddingsConfig(backend="torchrec", dim=cfg.pop("dim", 8), **cfg)
    return ShardedTables(specs, emb, device=torch.device("cpu"), world_size=2, seed=0, grad_scale=1.0, multi_pooling="sum")


@pytest.mark.parametrize(
    "pins,match",
    [
        (["item=column_wise"], "table 'item' pinned to 'column_wise'.*supported: row_wise, table_wise"),
        (["item=data_parallel"], "table 'item' pinned to 'data_parallel'"),
        (["items=row_wise"], "entry 'items=row_wise'.*'genre', 'item'"),
        (["item"], "expected '<table>=<type>'"),
    ],
)
def test_bad_sharding_pins_name_the_table(pins, match):
    with pytest.raises(TablePlanError, match=match):
        parse_sharding(pins, SPECS)
    assert parse_sharding([" item = table_wise", "genre=row_wise"], SPECS) == {"item": "table_wise", "genre": "row_wise"}


@pytest.mark.parametrize("optimizer", ["adam", "lamb"])
def test_the_cpu_kernel_refuses_adam_and_lamb_by_name(optimizer):
    with pytest.raises(TablePlanError, match=f"table_optimizer = '{optimizer}'.*rowwise_adagrad, adagrad, sgd"):
        build(table_optimizer=optimizer)


def test_width_must_suit_the_kernel():
    with pytest.raises(TablePlanError, match="embeddings.dim = 6: .*multiple of 4"):
        build(dim=6)


def test_a_plan_over_the_memory_budget_names_the_tables_and_the_limit():
    big = [TableSpec("item", 200_000), TableSpec("genre", 10)]
    with pytest.raises(TablePlanError, match=r"item 200000 x 64.*do not fit 0.01 GiB per rank \(embeddings.memory_budget_gib\) on 2 ranks"):
        build(big, dim=64, memory_budget_gib=0.01)


def test_initial_rows_do_not_depend_on_how_the_table_is_split():
    rows, dim = 2 * INIT_BLOCK_ROWS + 77, 4
    whole = torch.empty(rows, dim)
    init_rows(whole, 0, seed=3, table_index=1)
    for cuts in ([0, 5, INIT_BLOCK_ROWS + 1, rows], [0, INIT_BLOCK_ROWS, rows], [0, rows - 1, rows]):
        parts = [torch.empty(b - a, dim) for a, b in zip(cuts, cuts[1:], strict=False)]
        for a, part in zip(cuts, parts, strict=False):
            init_rows(part, a, seed=3, table_index=1)
        assert torch.equal(torch.cat(parts), whole)
    other = torch.empty(rows, dim)
    init_rows(other, 0, seed=3, table_index=2)
    assert not torch.equal(other, whole)
    assert abs(float(whole.std()) - 0.02) < 1e-3


def test_large_tables_are_sharded_row_wise_unless_pinned():
    cfg = EmbeddingsConfig(backend="torchrec", row_wise_min_rows=1000)
    big, small = TableSpec("item", 1000), TableSpec("genre", 999)
    assert ShardedTables._allowed(big, {}, cfg) == ["row_wise"]
    assert ShardedTables._allowed(small, {}, cfg) == ["row_wise", "table_wise"]
    assert ShardedTables._allowed(big, {"item": "table_wise"}, cfg) == ["table_wise"]
