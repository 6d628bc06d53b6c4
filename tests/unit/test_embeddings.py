"""FusedEmbedding equals one nn.Embedding per table (forward and gradients), plus its contracts."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from seqrec.embeddings import FusedEmbedding, TableSpec

pytestmark = pytest.mark.unit


def reference_forward(
    emb: FusedEmbedding, ids: dict[str, torch.Tensor]
) -> tuple[dict, dict[str, nn.Embedding]]:
    """Per-feature nn.Embedding with copies of the fused rows; masked sum/mean for multi-valued ones."""
    tables, out = {}, {}
    for name, spec in emb.tables.items():
        table = nn.Embedding(spec.num_embeddings, emb.dim)
        with torch.no_grad():
            table.weight.copy_(emb.weight[emb.rows(name)])
        tables[name] = table
        if name not in ids:
            continue
        vec = table(ids[name])
        if spec.multi_valued:
            keep = (ids[name] != 0).unsqueeze(-1).float()
            vec = (vec * keep).sum(-2)
            if emb.multi_pooling == "mean":
                vec = vec / keep.sum(-2).clamp(min=1)
        out[name] = vec
    return out, tables


@st.composite
def fused_cases(draw: st.DrawFn) -> tuple:
    num_tables = draw(st.integers(1, 4))
    tables = [
        TableSpec(f"f{i}", draw(st.integers(1, 12)), multi_valued=draw(st.booleans()))
        for i in range(num_tables)
    ]
    dim = draw(st.integers(1, 6))
    batch_shape = tuple(draw(st.lists(st.integers(0, 4), min_size=1, max_size=2)))
    pooling = draw(st.sampled_from(["sum", "mean"]))
    seed = draw(st.integers(0, 2**16))
    used = draw(st.lists(st.booleans(), min_size=num_tables, max_size=num_tables))
    k = draw(st.integers(1, 4))
    return tables, dim, batch_shape, pooling, seed, used, k


@settings(max_examples=30, deadline=None)
@given(fused_cases())
def test_forward_and_grads_equal_per_feature_embeddings(case: tuple) -> None:
    tables, dim, batch_shape, pooling, seed, used, k = case
    gen = torch.Generator().manual_seed(seed)
    emb = FusedEmbedding(tables, dim, multi_pooling=pooling)
    ids = {
        t.name: torch.randint(
            0, t.num_embeddings, batch_shape + ((k,) if t.multi_valued else ()), generator=gen
        )
        for t, use in zip(tables, used, strict=True)
        if use or t is tables[0]
    }
    got = emb(ids)
    want, ref_tables = reference_forward(emb, ids)
    assert set(got) == set(ids)
    for name in ids:
        assert got[name].shape == batch_shape + (dim,)
        torch.testing.assert_close(got[name], want[name])

    upstream = {name: torch.randn(got[name].shape, generator=gen) for name in got}
    sum((got[n] * upstream[n]).sum() for n in got).backward()
    sum((want[n] * upstream[n]).sum() for n in want).backward()
    for name, table in ref_tables.items():
        want_grad = table.weight.grad if table.weight.grad is not None else torch.zeros_like(table.weight)
        torch.testing.assert_close(emb.weight.grad[emb.rows(name)], want_grad)


def test_aliases_read_the_same_rows_and_their_gradients_add_up() -> None:
    emb = FusedEmbedding([TableSpec("item", 5, aliases=("item_label",)), TableSpec("cat", 4)], 3)
    out = emb({"item": torch.tensor([2, 3]), "item_label": torch.tensor([3, 4]), "cat": torch.tensor([1])})
    torch.testing.assert_close(out["item_label"], emb.weight[[3, 4]])
    (out["item"].sum() + 2 * out["item_label"].sum()).backward()
    want = torch.zeros(9, 3)
    want[2], want[3], want[4] = 1, 3, 2
    torch.testing.assert_close(emb.weight.grad, want)
    with pytest.raises(ValueError, match="read by two tables"):
        FusedEmbedding([TableSpec("item", 5, aliases=("cat",)), TableSpec("cat", 4)], 3)


def test_offsets_rows_and_item_first() -> None:
    emb = FusedEmbedding([TableSpec("item", 10), TableSpec("cat", 4), TableSpec("genre", 6, True)], 2)
    assert emb.offsets == {"item": 0, "cat": 10, "genre": 14}
    assert emb.rows("item") == slice(0, 10) and emb.rows("genre") == slice(14, 20)
    assert emb.weight.shape == (20, 2) and emb.num_rows == 20
    out = emb({"cat": torch.tensor([3])})
    torch.testing.assert_close(out["cat"], emb.weight[13:14])


def test_one_embedding_call_for_all_features(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = F.embedding

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "embedding", counting)
    emb = FusedEmbedding([TableSpec("a", 5), TableSpec("b", 5, True), TableSpec("c", 3)], 4)
    emb(
        {
            "a": torch.zeros(2, 3, dtype=torch.long),
            "b": torch.ones(2, 3, 2, dtype=torch.long),
            "c": torch.ones(3, dtype=torch.long),
        }
    )
    assert calls == [torch.Size([6 + 12 + 3])]


@pytest.mark.parametrize("pooling", ["sum", "mean"])
def test_all_pad_multi_valued_row_pools_to_zero(pooling: str) -> None:
    emb = FusedEmbedding([TableSpec("genre", 4, multi_valued=True)], 3, multi_pooling=pooling)
    out = emb({"genre": torch.tensor([[0, 0, 0], [2, 0, 2]])})["genre"]
    assert torch.equal(out[0], torch.zeros(3))
    want = emb.weight[2] * (2 if pooling == "sum" else 1)
    torch.testing.assert_close(out[1], want)


def test_out_of_range_ids_are_refused_with_the_feature_name() -> None:
    emb = FusedEmbedding([TableSpec("item", 5), TableSpec("cat", 3)], 2)
    with pytest.raises(ValueError, match="feature 'item'.*max 5"):
        emb({"item": torch.tensor([1, 5])})  # would otherwise read cat's first row
    with pytest.raises(ValueError, match="feature 'cat'.*min -1"):
        emb({"cat": torch.tensor([-1])})
    with pytest.raises(KeyError, match="serves feature 'genre'"):
        emb({"genre": torch.tensor([1])})
    assert emb({}) == {}


def test_bad_tables_are_refused() -> None:
    with pytest.raises(ValueError, match="unique"):
        FusedEmbedding([TableSpec("a", 2), TableSpec("a", 3)], 2)
    with pytest.raises(ValueError, match="'b': num_embeddings"):
        FusedEmbedding([TableSpec("a", 2), TableSpec("b", 0)], 2)
    with pytest.raises(ValueError, match="multi_pooling"):
        FusedEmbedding([TableSpec("a", 2)], 2, multi_pooling="max")  # type: ignore[arg-type]


def test_meta_build_then_init_weights() -> None:
    with torch.device("meta"):
        emb = FusedEmbedding([TableSpec("item", 2000), TableSpec("cat", 48)], 16, init_std=0.05)
    assert emb.weight.is_meta
    emb.to_empty(device="cpu")
    emb.init_weights()
    assert abs(emb.weight.std().item() - 0.05) < 0.003
