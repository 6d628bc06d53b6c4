"""SeqRecModel: shapes, masking, causality, padding invariance, feature flags, init, overfitting."""

from __future__ import annotations

import json
from dataclasses import replace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from seqrec.config import EmbeddingsConfig, LossConfig, ModelConfig
from seqrec.data.schema import SchemaError, read_manifest
from seqrec.data.spec import DataSpec
from seqrec.metrics import ranking_sums, target_ranks
from seqrec.model import Dropout, SeqRecModel, length_groups, time_gap_ids

pytestmark = pytest.mark.unit

MAX_LEN, V = 8, 40


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors gain nothing from threads, and on a shared 2-core box threads contend (4x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_spec(max_len: int = MAX_LEN, num_items: int = V) -> DataSpec:
    gen = torch.Generator().manual_seed(0)
    return DataSpec(
        max_len=max_len,
        num_items=num_items,
        event_features={"action": 5},
        item_features={
            "category": torch.randint(1, 6, (num_items,), generator=gen),
            "genre": torch.randint(0, 7, (num_items, 3), generator=gen),
        },
        item_feature_sizes={"category": 6, "genre": 7},
        item_counts=torch.randint(0, 20, (num_items,), generator=gen),
    )


def tiny_model(
    spec: DataSpec | None = None, *, dim: int = 16, loss: str = "full", groups: int = 4, **emb_flags: bool
) -> SeqRecModel:
    torch.manual_seed(0)
    model = SeqRecModel(
        spec or tiny_spec(),
        ModelConfig(d_model=16, num_layers=2, num_heads=2, dropout=0.0, length_groups=groups),
        EmbeddingsConfig(dim=dim, num_time_buckets=8, **emb_flags),
        LossConfig(kind=loss, num_negatives=8),
    )
    return model.eval()


def encode(model: SeqRecModel, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Hidden states of the input events, through the model's own (dense) table."""
    return model.encode(batch, model.embeddings(model.lookup_ids(batch, "query")))


def embed(model: SeqRecModel, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    rows = model.embeddings(model.lookup_ids(batch, "query"))
    return model.embed(batch["item"][:, :-1] != 0, rows)


def make_batch(lengths: list[int], width: int = MAX_LEN + 1, seed: int = 0) -> dict[str, torch.Tensor]:
    """Left-padded rows like the loader's: item, ts, action (0 in padding), length, target."""
    gen = torch.Generator().manual_seed(seed)
    B = len(lengths)
    real = torch.arange(width).unsqueeze(0) >= width - torch.tensor(lengths).unsqueeze(1)
    item = torch.randint(2, V, (B, width), generator=gen) * real
    ts = (1_700_000_000 + torch.randint(0, 5000, (B, width), generator=gen).cumsum(1)) * real
    action = torch.randint(1, 5, (B, width), generator=gen) * real
    return {"item": item, "ts": ts, "action": action, "length": torch.tensor(lengths), "target": item[:, -1]}


def left_pad(batch: dict[str, torch.Tensor], width: int) -> dict[str, torch.Tensor]:
    extra = width - batch["item"].shape[1]
    return {k: (torch.nn.functional.pad(v, (extra, 0)) if v.dim() == 2 else v) for k, v in batch.items()}


def test_train_output_counts_labels_exactly() -> None:
    model = tiny_model()
    batch = make_batch([9, 5, 2])
    batch["item"][0, 4] = 1  # an unknown label is not counted (but is a real input)
    out = model(batch)
    assert out["loss"].dim() == 0 and torch.isfinite(out["loss"])
    assert out["num_tokens"].dtype == torch.long and int(out["num_tokens"]) == (8 - 1) + 4 + 1
    out["loss"].backward()
    assert model.embeddings.weight.grad.abs().sum() > 0


def test_score_shape_dtype_and_masked_columns() -> None:
    model = tiny_model()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        scores = model(make_batch([9, 3, 2, 6]), task="score")["scores"]
    assert scores.shape == (4, V) and scores.dtype == torch.float32
    assert torch.all(scores[:, :2] == -float("inf")) and torch.isfinite(scores[:, 2:]).all()


def test_scores_are_tied_to_the_item_rows_of_the_fused_table() -> None:
    model = tiny_model(dim=8)  # with projections
    batch = make_batch([9, 4])
    h = model.out_proj(encode(model, batch)[:, -1])
    want = h @ model.embeddings.weight[:V].T
    torch.testing.assert_close(model(batch, task="score")["scores"][:, 2:], want[:, 2:])
    assert isinstance(model.in_proj, nn.Linear) and isinstance(tiny_model(dim=16).in_proj, nn.Identity)


def test_causality_future_items_do_not_change_earlier_states() -> None:
    model = tiny_model()
    batch = make_batch([9, 9])
    before = encode(model, batch)
    changed = {k: v.clone() for k, v in batch.items()}
    changed["item"][:, 5] = torch.tensor([3, 4])
    changed["action"][:, 5] = 4
    changed["ts"][:, 5:] += 100_000
    after = encode(model, changed)
    torch.testing.assert_close(after[:, :5], before[:, :5], rtol=0, atol=0)
    assert not torch.allclose(after[:, 5], before[:, 5])


def test_more_left_padding_and_other_rows_do_not_change_scores() -> None:
    model = tiny_model()
    short = make_batch([4, 2], width=5, seed=3)  # narrower window than the model's max_len + 1
    wide = left_pad(short, MAX_LEN + 1)
    mixed = {k: torch.cat([wide[k], make_batch([9], seed=4)[k]]) for k in wide}  # next to a full row
    want = model(short, task="score")["scores"]
    torch.testing.assert_close(model(wide, task="score")["scores"], want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model(mixed, task="score")["scores"][:2], want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model(wide)["loss"], model(short)["loss"], rtol=1e-5, atol=1e-5)


@settings(max_examples=20, deadline=None)
@given(st.lists(st.integers(1, MAX_LEN + 1), min_size=1, max_size=9), st.integers(1, 5), st.sampled_from(["full", "sampled"]))
def test_length_groups_equal_one_full_width_pass(lengths: list[int], groups: int, loss: str) -> None:
    batch = make_batch(lengths, seed=len(lengths))
    outs = []
    for model in (tiny_model(loss=loss, groups=1), tiny_model(loss=loss, groups=groups)):
        torch.manual_seed(1)  # the sampled loss draws the same negatives
        out = model.train()(batch)
        out["loss"].backward()
        grads = {n: p.grad for n, p in model.named_parameters()}
        outs.append((out["loss"], out["num_tokens"], model.eval()(batch, task="score")["scores"], grads))
    (loss_a, tokens_a, scores_a, grads_a), (loss_b, tokens_b, scores_b, grads_b) = outs
    assert int(tokens_a) == int(tokens_b)
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(scores_b, scores_a, rtol=1e-5, atol=1e-5)
    for name, grad in grads_a.items():
        torch.testing.assert_close(grads_b[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_length_groups_sort_rows_by_span_and_merge_equal_widths() -> None:
    valid = make_batch([3, 9, 1, 9, 5, 2, 9])["item"][:, :-1] != 0  # spans 2, 8, 0, 8, 4, 1, 8 (width 8)
    groups = length_groups(valid, 3)
    assert [(rows.tolist(), width) for rows, width in groups] == [([2, 5, 0], 2), ([4, 1, 3, 6], 8)]
    assert length_groups(valid, 1) is None
    assert length_groups(make_batch([9, 9])["item"][:, :-1] != 0, 4) is None  # nothing to trim


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_dropout_drops_at_rate_p_scales_exactly_and_follows_the_seed(p: float) -> None:
    drop = Dropout(p)
    x = (torch.rand(64, 1001) + 0.5).requires_grad_()  # an odd element count: draws are carved in fours
    torch.manual_seed(3)
    y = drop(x)
    kept = y != 0
    keep = 1 - round(p * 65536) / 65536
    n = x.numel()
    assert abs(float(kept.float().mean()) - keep) < 5 * (keep * (1 - keep) / n) ** 0.5  # 5 sigma
    torch.testing.assert_close(y[kept], x[kept] / keep)
    y.sum().backward()
    torch.testing.assert_close(x.grad, kept.float() / keep)
    torch.manual_seed(3)
    assert torch.equal(drop(x), y)  # the default generator: seeded runs and resumed RNG states repeat it
    assert torch.equal(drop.eval()(x), x) and torch.equal(Dropout(0.0).train()(x), x)
    with pytest.raises(ValueError, match="model.dropout"):
        Dropout(1.0)


def test_padded_positions_do_not_leak() -> None:
    model = tiny_model()
    batch = make_batch([4, 6])
    noisy = {k: v.clone() for k, v in batch.items()}
    pad = noisy["item"] == 0
    noisy["ts"][pad] = 123  # garbage in event columns at padded positions
    noisy["action"][pad] = 3
    torch.testing.assert_close(model(noisy, task="score")["scores"], model(batch, task="score")["scores"])
    assert torch.equal(embed(model, batch)[pad[:, :-1]], torch.zeros(int(pad[:, :-1].sum()), 16))


@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(0, 2**33), min_size=1, max_size=6), st.integers(1, 40), st.integers(0, 6))
def test_time_gap_ids_match_python(deltas: list[int], num_buckets: int, num_pad: int) -> None:
    ts = [0] * num_pad + [1_000 + sum(deltas[: i + 1]) for i in range(len(deltas))]
    ts_BL = torch.tensor([ts])
    got = time_gap_ids(ts_BL, ts_BL != 0, num_buckets)[0].tolist()
    want = [0] * num_pad + [1] + [2 + min((d + 1).bit_length() - 1, num_buckets - 1) for d in deltas[1:]]
    assert got == want
    backwards = time_gap_ids(torch.tensor([[5, 9, 7]]), torch.tensor([[True, True, True]]), num_buckets)
    assert backwards.tolist()[0][2] == 1  # time going backwards: unknown


@pytest.mark.parametrize(
    "flags,tables",
    [
        ({}, ["item", "category", "genre", "action", "time_gap", "position"]),
        ({"use_item_features": False}, ["item", "action", "time_gap", "position"]),
        ({"use_actions": False, "use_time_gaps": False}, ["item", "category", "genre", "position"]),
    ],
)
def test_feature_flags_choose_the_fused_tables(flags: dict, tables: list[str]) -> None:
    model = tiny_model(**flags)
    assert list(model.embeddings.tables) == tables
    assert model.embeddings.offsets["item"] == 0
    batch = make_batch([9, 3])
    if flags.get("use_actions") is False:
        del batch["action"], batch["ts"]  # columns the model no longer needs
    assert torch.isfinite(model(batch)["loss"])


def test_item_side_features_are_looked_up_by_item_id() -> None:
    spec = tiny_spec()
    model = tiny_model(spec, use_actions=False, use_time_gaps=False)
    batch = make_batch([3])
    item = batch["item"][0, -2]  # last input event
    parts = model.embeddings(
        {
            "item": item,
            "category": spec.item_features["category"][item],
            "genre": spec.item_features["genre"][item],
        }
    )
    pos = model.embeddings({"position": torch.tensor(MAX_LEN - 1)})["position"]
    torch.testing.assert_close(embed(model, batch)[0, -1], sum(parts.values()) + pos)


@pytest.mark.parametrize("loss", ["sampled", "in_batch"])
def test_other_losses_run_through_the_model(loss: str) -> None:
    model = tiny_model(loss=loss)
    out = model(make_batch([9, 7, 4]))
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and model.embeddings.weight.grad[2:V].abs().sum() > 0


def test_blocks_are_a_module_list_without_transformer_encoder() -> None:
    model = tiny_model()
    assert isinstance(model.blocks, nn.ModuleList) and len(model.blocks) == 2
    assert not any(isinstance(m, nn.TransformerEncoder | nn.TransformerEncoderLayer) for m in model.modules())
    assert model.num_params() == sum(p.numel() for p in model.parameters())


def test_meta_build_then_init_weights_matches_a_normal_build() -> None:
    spec = tiny_spec()
    cfgs = (
        ModelConfig(d_model=16, num_heads=2, dropout=0.1),
        EmbeddingsConfig(dim=8),
        LossConfig(kind="sampled", sampler="popularity"),
    )
    normal = SeqRecModel(spec, *cfgs)
    with torch.device("meta"):
        meta = SeqRecModel(spec, *cfgs)
    meta.to_empty(device="cpu")
    for model in (normal, meta):
        torch.manual_seed(5)
        model.init_weights()
    for (name, a), b in zip(normal.state_dict().items(), meta.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert torch.equal(meta.loss.proposal(), normal.loss.proposal())
    assert "item_feature_genre" in normal.state_dict()


def test_bad_inputs_are_refused_with_names() -> None:
    model = tiny_model()
    with pytest.raises(ValueError, match="width 11"):
        model(make_batch([3], width=11))
    batch = make_batch([3])
    del batch["action"]
    with pytest.raises(KeyError, match="'action'"):
        model(batch)
    with pytest.raises(ValueError, match="task"):
        model(make_batch([3]), task="predict")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="model.d_model"):
        SeqRecModel(tiny_spec(), ModelConfig(d_model=15, num_heads=2, dropout=0.1), EmbeddingsConfig(), LossConfig())
    with pytest.raises(ValueError, match="model.dropout is unset"):
        SeqRecModel(tiny_spec(), ModelConfig(d_model=16, num_heads=2), EmbeddingsConfig(), LossConfig())
    with pytest.raises(ValueError, match="item_counts"):
        replace(tiny_spec(), item_counts=torch.ones(3))


def test_tiny_model_overfits_32_sequences() -> None:
    torch.manual_seed(0)
    spec = replace(tiny_spec(), item_counts=torch.ones(V, dtype=torch.long))
    model = tiny_model(spec).train()
    batch = make_batch([9] * 32, seed=7)
    batch["item"][:, 0] = torch.arange(2, 34)  # distinct first items: every prefix has one answer
    opt = torch.optim.Adam(model.parameters(), lr=3e-2)
    for _ in range(60):  # about 10 ms a step on one core
        opt.zero_grad()
        loss = model(batch)["loss"]
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        ranks = target_ranks(model(batch, task="score")["scores"], batch["target"], None)
        assert float(model(batch)["loss"]) < 0.1
    assert ranking_sums(ranks, [1])["hr@1"] >= 31


def test_data_spec_from_manifest(tmp_path) -> None:
    features = {
        "item": {"kind": "item", "num_embeddings": 5},
        "category": {"kind": "item_single", "num_embeddings": 4},
        "genre": {"kind": "item_multi", "num_embeddings": 6, "max_values": 3},
        "action": {"kind": "event", "num_embeddings": 7},
    }
    raw = {"schema_version": 1, "max_len": 6, "features": features, "splits": {}}
    (tmp_path / "manifest.json").write_text(json.dumps(raw))
    table = {  # rows out of order: the spec is indexed by item id
        "item": pa.array([3, 0, 1, 4, 2], pa.int32()),
        "train_count": pa.array([7, 0, 0, 2, 5], pa.int64()),
        "category": pa.array([2, 0, 1, 3, 1], pa.int32()),
        "genre": pa.array([[2, 5, 0], [0, 0, 0], [0, 0, 0], [3, 0, 0], [4, 4, 2]], pa.list_(pa.int32())),
    }
    pq.write_table(pa.table(table), tmp_path / "item_features.parquet")
    spec = DataSpec.from_manifest(read_manifest(tmp_path))
    assert (spec.max_len, spec.num_items, spec.event_features) == (6, 5, {"action": 7})
    assert spec.item_feature_sizes == {"category": 4, "genre": 6}
    assert spec.item_counts.tolist() == [0, 0, 5, 7, 2]
    assert spec.item_features["category"].tolist() == [0, 1, 1, 2, 3]
    assert spec.item_features["genre"].tolist() == [[0, 0, 0], [0, 0, 0], [4, 4, 2], [2, 5, 0], [3, 0, 0]]
    assert spec.item_features["genre"].dtype == torch.long

    table["category"] = pa.array([2, 0, 1, 4, 1], pa.int32())  # 4 >= num_embeddings
    pq.write_table(pa.table(table), tmp_path / "item_features.parquet")
    with pytest.raises(SchemaError, match=r"item_features.parquet: column 'category' row 3 holds 4"):
        DataSpec.from_manifest(read_manifest(tmp_path))
    table["category"] = pa.array([2, 0, 1, 3, 1], pa.int32())
    table["item"] = pa.array([3, 0, 1, 4, 4], pa.int32())
    pq.write_table(pa.table(table), tmp_path / "item_features.parquet")
    with pytest.raises(SchemaError, match="every id 0..4 exactly once"):
        DataSpec.from_manifest(read_manifest(tmp_path))


def test_the_padding_batch_of_a_rank_that_ran_out_passes_the_rankers() -> None:
    """A rank with fewer evaluation batches scores a padding row to keep collectives in step; its
    target must pass target_ranks' input check (it once failed: target 0)."""
    from seqrec.evaluate import _padding_batch, by_scores

    model = tiny_model()
    pad = _padding_batch(make_batch([9, 3]))
    assert pad["target"].tolist() == [2] and int(pad["item"][0, -1]) == 2 and int((pad["item"][0, :-1] != 0).sum()) == 0
    ranker = by_scores(lambda batch: model(batch, task="score")["scores"], exclude_seen=True)
    assert ranker(pad).shape == (1,)
