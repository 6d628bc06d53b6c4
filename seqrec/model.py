"""The sequential recommender (SASRec family): fused embeddings -> causal pre-norm transformer -> item scores.

Per input event, ONE `FusedEmbedding` call looks up the item id, the item's side features (gathered by
item id from buffers), the event features (action, context), a log2 time-gap bucket to the previous
event and a learned position; the vectors are summed, padded positions zeroed, and fed through
`num_layers` pre-norm blocks (attention with `F.scaled_dot_product_attention`, GELU feed-forward).
Scores are tied to the item rows of the fused table: `h @ embeddings.weight[:num_items].T`.

Positions are anchored at the right end of the window (the most recent input event is always
position max_len - 1), so left padding changes nothing: the same history scores the same in any
window width <= max_len + 1 and next to any other rows.

This module is a plain nn.Module: no torch.distributed, deepspeed, pyspark or wandb (engine.py wraps
it). Every submodule initialises itself in its own __init__, so `deepspeed.zero.Init` (which
partitions each module as soon as its __init__ returns) sees the intended initialisation;
`init_weights()` redoes all of it after `to_empty()` from the meta device.

Legend: B batch rows, W row width (max_len + 1), L input length (W - 1), E embedding width,
D d_model, H heads, Dh head width (D / H), V catalogue size (incl. pad 0 and unknown 1),
K values per multi-valued item feature, T counted labels in the batch.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from seqrec.config import EmbeddingsConfig, LossConfig, ModelConfig
from seqrec.data import schema
from seqrec.data.schema import PAD_ID, UNK_ID
from seqrec.data.spec import DataSpec
from seqrec.embeddings import FusedEmbedding, TableSpec
from seqrec.losses import build_loss

ITEM = "item"
TIME_GAP = "time_gap"  # id-table feature names the model adds itself
POSITION = "position"
ITEM_LABEL = "item_label"  # the item table's rows for the loss: labels and candidates
ITEM_CANDIDATE = "item_candidate"
RESERVED_FEATURES = (TIME_GAP, POSITION, ITEM_LABEL, ITEM_CANDIDATE)

Lookups = tuple[dict[str, Tensor], dict[str, Tensor]]  # (ids per feature, their rows per feature)
MAX_TIME_BUCKETS = 62  # bucket boundaries are powers of two in int64


def time_gap_ids(ts_BL: Tensor, valid_BL: Tensor, num_buckets: int) -> Tensor:
    """Time-gap ids [B, L]: 0 pad, 1 no previous event (or time going backwards), else
    2 + min(floor(log2(gap_seconds + 1)), num_buckets - 1), computed exactly in integers."""
    gap_BL = torch.zeros_like(ts_BL)
    gap_BL[:, 1:] = ts_BL[:, 1:] - ts_BL[:, :-1]
    has_prev_BL = torch.zeros_like(valid_BL)
    has_prev_BL[:, 1:] = valid_BL[:, :-1]
    # floor(log2(x)) for x >= 1 = number of powers of two 2^1..2^(n-1) that are <= x (capped at n - 1).
    bounds = 2 ** torch.arange(1, num_buckets, device=ts_BL.device, dtype=torch.long)
    bucket_BL = torch.bucketize(gap_BL.clamp(min=0) + 1, bounds, right=True)
    ids_BL = torch.where(has_prev_BL & (gap_BL >= 0), bucket_BL + schema.NUM_RESERVED_IDS, UNK_ID)
    return torch.where(valid_BL, ids_BL, PAD_ID)


class Linear(nn.Linear):
    """nn.Linear initialised N(0, std), zero bias, from its own __init__ (see the module docstring)."""

    def __init__(self, in_features: int, out_features: int, std: float = 0.02) -> None:
        self.init_std = std  # read by reset_parameters, which nn.Linear.__init__ calls
        super().__init__(in_features, out_features)

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, mean=0.0, std=self.init_std)
        nn.init.zeros_(self.bias)


class Dropout(nn.Module):
    """Inverted dropout; on CPU with 16-bit random draws carved out of 64-bit ones.

    torch's CPU dropout draws one Bernoulli sample per element from mt19937, which took 11% of an
    ML-1M training step (benchmarks/results/profile_step_*.json); four 16-bit draws per 64-bit
    random number are 3.5x faster. An element is dropped with probability round(p x 2^16) / 2^16
    (within 8e-6 of p) and kept ones are scaled by the inverse of the exact keep probability. The
    draws come from the default generator, like torch's dropout, so seeding and the checkpointed
    RNG state reproduce them. Other devices use `F.dropout`.
    """

    def __init__(self, p: float | None) -> None:
        super().__init__()
        if p is None:
            raise ValueError("model.dropout is unset: seqrec.recipe.resolve derives it from the data, or set it")
        if not 0.0 <= p < 1.0:
            raise ValueError(f"model.dropout must be in [0, 1), got {p}")
        self.p = p
        self.threshold = round(p * 65536)  # drop when the 16-bit draw (as 0..65535) is below this

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.threshold == 0:
            return x
        if x.device.type != "cpu":
            return F.dropout(x, self.p, training=True)
        draws = torch.empty((x.numel() + 3) // 4, dtype=torch.int64).random_(-(2**63), 2**63 - 1)
        keep = draws.view(torch.int16)[: x.numel()].view(x.shape) >= self.threshold - 32768
        return x * keep * (65536 / (65536 - self.threshold))

    def extra_repr(self) -> str:
        return f"p={self.p}"


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(LN(x)), then x + FFN(LN(x)); dropout on both branches."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        d, residual_std = cfg.d_model, 0.02 / math.sqrt(2 * cfg.num_layers)  # GPT-2 residual scaling
        self.num_heads = cfg.num_heads
        self.attn_norm = nn.LayerNorm(d)
        self.qkv = Linear(d, 3 * d)
        self.attn_out = Linear(d, d, std=residual_std)
        self.ffn_norm = nn.LayerNorm(d)
        self.ffn_in = Linear(d, cfg.ffn_mult * d)
        self.ffn_out = Linear(cfg.ffn_mult * d, d, std=residual_std)
        self.dropout = Dropout(cfg.dropout)

    def forward(self, x_BLD: Tensor, allowed_B1LL: Tensor | None) -> Tensor:
        """`allowed_B1LL` None: no padding, plain causal attention (flash kernels apply)."""
        x_BLD = x_BLD + self.dropout(self.attn_out(self._attention(self.attn_norm(x_BLD), allowed_B1LL)))
        return x_BLD + self.dropout(self.ffn_out(F.gelu(self.ffn_in(self.ffn_norm(x_BLD)))))

    def _attention(self, x_BLD: Tensor, allowed_B1LL: Tensor | None) -> Tensor:
        B, L, D = x_BLD.shape
        q_BHLDh, k_BHLDh, v_BHLDh = (
            self.qkv(x_BLD).view(B, L, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        )
        out_BHLDh = F.scaled_dot_product_attention(
            q_BHLDh, k_BHLDh, v_BHLDh, attn_mask=allowed_B1LL, is_causal=allowed_B1LL is None
        )
        return out_BHLDh.transpose(1, 2).reshape(B, L, D)


def attention_mask(valid_BL: Tensor) -> Tensor:
    """[B, 1, L, L] True where query i may attend key j: j <= i and j is real, or j == i.

    The diagonal keeps a softmax row non-empty for padded queries (no NaN); real queries never see
    padded keys, so whatever padded rows compute cannot leak into real ones.
    """
    L = valid_BL.shape[1]
    causal_LL = torch.ones(L, L, dtype=torch.bool, device=valid_BL.device).tril()
    eye_LL = torch.eye(L, dtype=torch.bool, device=valid_BL.device)
    return (causal_LL & valid_BL[:, None, None, :]) | eye_LL


class SeqRecModel(nn.Module):
    """Causal transformer recommender over left-padded event windows (see the module docstring).

    Args:
        spec: the data description (`DataSpec.from_manifest`).
        model_cfg: transformer sizes and dropout.
        emb_cfg: fused table width, pooling, and which features to use.
        loss_cfg: the training objective (`losses.build_loss`).

    Example:
        model = SeqRecModel(spec, ModelConfig(d_model=16), EmbeddingsConfig(dim=16), LossConfig())
        model(batch)["loss"].backward()
        model(batch, task="score")["scores"]  # [B, V]
    """

    def __init__(
        self, spec: DataSpec, model_cfg: ModelConfig, emb_cfg: EmbeddingsConfig, loss_cfg: LossConfig
    ) -> None:
        super().__init__()
        _check_configs(model_cfg, emb_cfg)
        self.spec = spec  # plain attribute: the source the buffers are restored from in init_weights
        self.max_len = spec.max_len
        self.num_items = spec.num_items
        self.item_feature_names = list(spec.item_features) if emb_cfg.use_item_features else []
        self.event_feature_names = list(spec.event_features) if emb_cfg.use_actions else []
        self.num_time_buckets = emb_cfg.num_time_buckets if emb_cfg.use_time_gaps else 0
        self.tables = self._tables()
        # The id tables: inside the model (dense, DeepSpeed trains them) or outside it (TorchRec,
        # sharded and updated in backward; built by seqrec.tables and passed in as `lookups`).
        self.embeddings = (
            FusedEmbedding(self.tables, emb_cfg.dim, multi_pooling=emb_cfg.multi_pooling)
            if emb_cfg.backend == "dense"
            else None
        )
        self._scale_index = {t.name: i for i, t in enumerate(self.tables)}
        self.feature_scale = nn.Parameter(torch.ones(len(self.tables)))  # one learned weight per input feature
        for name in self.item_feature_names:
            # Persistent, so a state_dict alone reproduces the scores (export, serving).
            self.register_buffer(_buffer_name(name), spec.item_features[name].detach().clone().long())
        same_width = emb_cfg.dim == model_cfg.d_model
        self.in_proj = nn.Identity() if same_width else Linear(emb_cfg.dim, model_cfg.d_model)
        self.out_proj = nn.Identity() if same_width else Linear(model_cfg.d_model, emb_cfg.dim)
        self.dropout = Dropout(model_cfg.dropout)
        self.length_groups = model_cfg.length_groups
        self.blocks = nn.ModuleList(Block(model_cfg) for _ in range(model_cfg.num_layers))
        self.final_norm = nn.LayerNorm(model_cfg.d_model)
        self.loss = build_loss(loss_cfg, spec.item_counts)

    def _tables(self) -> list[TableSpec]:
        spec = self.spec
        # The item table also serves the loss's label and candidate rows (tied output layer).
        tables = [TableSpec(ITEM, spec.num_items, aliases=(ITEM_LABEL, ITEM_CANDIDATE))]
        tables += [
            TableSpec(n, spec.item_feature_sizes[n], spec.item_features[n].dim() == 2)
            for n in self.item_feature_names
        ]
        tables += [TableSpec(n, spec.event_features[n]) for n in self.event_feature_names]
        if self.num_time_buckets:
            tables.append(TableSpec(TIME_GAP, self.num_time_buckets + schema.NUM_RESERVED_IDS))
        tables.append(TableSpec(POSITION, spec.max_len))
        names = [f for t in tables for f in t.features]
        if len(set(names)) != len(names):
            raise ValueError(
                f"feature names collide in the id tables: {names} "
                f"({', '.join(repr(n) for n in RESERVED_FEATURES)} are reserved)"
            )
        return tables

    def init_weights(self) -> None:
        """(Re)initialise every parameter and data buffer, e.g. after `to_empty()` from the meta device."""
        for module in self.modules():
            if isinstance(module, Linear | nn.LayerNorm):
                module.reset_parameters()
        if self.embeddings is not None:
            self.embeddings.init_weights()
        nn.init.ones_(self.feature_scale)
        for name in self.item_feature_names:
            buf = getattr(self, _buffer_name(name))
            buf.copy_(self.spec.item_features[name].to(buf.device))
        self.loss.init_buffers()

    def num_params(self) -> int:
        """Parameter count (the full count under ZeRO-3 partitioning too, via `ds_numel`)."""
        return sum(int(getattr(p, "ds_numel", p.numel())) for p in self.parameters())

    def forward(
        self,
        batch: dict[str, Tensor],
        task: Literal["train", "score", "query"] = "train",
        lookups: Lookups | None = None,
    ) -> dict[str, Tensor]:
        """train: {"loss", "num_tokens"}; score: {"scores": [B, V] float32, pad/unk = -inf};
        query: {"query": [B, E]} (the user state that scores items by a dot product).

        `lookups` = (ids, rows) from an id table outside the model (`lookup_ids`, then the table);
        without it the model's own table (`embeddings.backend = "dense"`) looks the ids up.
        """
        if task not in TASKS:
            raise ValueError(f"task must be one of {sorted(TASKS)}, got {task!r}")
        if lookups is None:
            if self.embeddings is None:
                raise ValueError("this model's id tables live outside it (embeddings.backend = 'torchrec'): pass lookups")
            ids = self.lookup_ids(batch, task)
            lookups = (ids, self.embeddings(ids))
        return TASKS[task](self, batch, *lookups)

    def lookup_ids(self, batch: dict[str, Tensor], task: str = "train") -> dict[str, Tensor]:
        """Every id this forward reads from the id tables, per feature: the input events' item,
        side-feature, event-feature, time-gap and position ids, and for training the loss's label
        and candidate rows (negatives are drawn here, before the one lookup)."""
        item_BW = batch[ITEM]
        item_BL = item_BW[:, :-1]
        L = item_BL.shape[1]
        if L > self.max_len or L < 1:
            raise ValueError(
                f"batch['item'] has width {L + 1}; this model takes 2..{self.max_len + 1} (max_len + 1)"
            )
        ids: dict[str, Tensor] = {ITEM: item_BL}
        for name in self.item_feature_names:
            ids[name] = getattr(self, _buffer_name(name))[item_BL]
        for name in self.event_feature_names:
            ids[name] = _batch_column(batch, name)[:, :-1]
        valid_BL = item_BL != PAD_ID
        if self.num_time_buckets:
            ids[TIME_GAP] = time_gap_ids(
                _batch_column(batch, schema.COL_TS)[:, :-1], valid_BL, self.num_time_buckets
            )
        # Right-anchored positions: the last input event is always position max_len - 1.
        ids[POSITION] = torch.arange(self.max_len - L, self.max_len, device=item_BL.device)
        if task == "train":
            labels_T = item_BW[:, 1:][counted_labels(item_BW)].long()
            if self.loss.needs_label_rows:
                ids[ITEM_LABEL] = labels_T
            if not self._item_rows_in_place():
                ids[ITEM_CANDIDATE] = self.loss.candidate_ids(labels_T)
        return ids

    def train_loss(self, batch: dict[str, Tensor], ids: dict[str, Tensor], rows: dict[str, Tensor]) -> dict[str, Tensor]:
        """Mean loss over counted labels (label > 1 at a real input position) and their count."""
        counted_BL = counted_labels(batch[ITEM])
        query_TE = self.out_proj(self.encode(batch, rows)[counted_BL])
        labels_T = batch[ITEM][:, 1:][counted_BL].long()
        label_TE = self._dense(rows[ITEM_LABEL]) if self.loss.needs_label_rows else None
        if self._item_rows_in_place():
            # Every item is a candidate: the item rows of the model's own table, read in place (a
            # view, whose gradient is a slice of the table's), not looked up id by id.
            candidates, cand_VE = torch.arange(self.num_items, device=labels_T.device), self.embeddings.weight[: self.num_items]
        else:
            candidates, cand_VE = ids[ITEM_CANDIDATE], rows[ITEM_CANDIDATE]
        loss = self.loss(query_TE, labels_T, label_TE, candidates, self._dense(cand_VE))
        return {"loss": loss, "num_tokens": counted_BL.sum()}

    def query(self, batch: dict[str, Tensor], ids: dict[str, Tensor], rows: dict[str, Tensor]) -> dict[str, Tensor]:
        """The user state [B, E] at the last input position (it predicts item[:, -1])."""
        return {"query": self.out_proj(self.encode(batch, rows)[:, -1])}

    def score(self, batch: dict[str, Tensor], ids: dict[str, Tensor], rows: dict[str, Tensor]) -> dict[str, Tensor]:
        """float32 logits [B, V] against every item of the model's own (dense) item table."""
        if self.embeddings is None:
            raise ValueError("task 'score' needs the model's own item table; with sharded tables score per shard")
        query_BE = self.query(batch, ids, rows)["query"]
        # fp32 matmul even under autocast: bf16 scores would create ties, which rank pessimistically.
        with torch.autocast(device_type=query_BE.device.type, enabled=False):
            scores_BV = query_BE.float() @ self.embeddings.weight[: self.num_items].float().T
        scores_BV[:, : schema.NUM_RESERVED_IDS] = -float("inf")
        return {"scores": scores_BV}

    def encode(self, batch: dict[str, Tensor], rows: dict[str, Tensor]) -> Tensor:
        """Final-normed hidden states h_BLD of the input events item[:, :-1] (position t sees events <= t).

        Rows go through the transformer in groups of similar history length (`length_groups`), each
        trimmed on the left to its longest history; the trimmed (padding) positions of h are 0.
        """
        valid_BL = batch[ITEM][:, :-1] != PAD_ID
        emb_BLE = self.embed(valid_BL, rows)
        groups = length_groups(valid_BL, self.length_groups)
        if groups is None:
            return self.tower(emb_BLE, valid_BL)
        B, L = valid_BL.shape
        h_BLD = emb_BLE.new_zeros(B, L, self.final_norm.normalized_shape[0])
        for rows_G, width in groups:
            h_BLD[rows_G, L - width :] = self.tower(emb_BLE[rows_G, L - width :], valid_BL[rows_G, L - width :])
        return h_BLD

    def tower(self, emb_BLE: Tensor, valid_BL: Tensor) -> Tensor:
        """The transformer over summed embeddings: final-normed h_BLD."""
        x_BLD = self.dropout(self.in_proj(emb_BLE))
        # Rows without padding (a length group of full histories) need no mask: plain causal attention.
        allowed_B1LL = None if bool(valid_BL.all()) else attention_mask(valid_BL)  # host sync
        for block in self.blocks:
            x_BLD = block(x_BLD, allowed_B1LL)
        return self.final_norm(x_BLD)

    def embed(self, valid_BL: Tensor, rows: dict[str, Tensor]) -> Tensor:
        """Sum of the input features' rows, each times its learned scale, emb_BLE; zero at padding."""
        scale = self.feature_scale
        emb_BLE = sum(self._dense(rows[name]) * scale[i] for name, i in self._scale_index.items())
        return emb_BLE * valid_BL.unsqueeze(-1).to(emb_BLE.dtype)

    def _item_rows_in_place(self) -> bool:
        return self.embeddings is not None and getattr(self.loss, "all_items", False)

    def _dense(self, rows: Tensor) -> Tensor:
        # Rows from a table outside the model arrive in fp32; the dense tower may run in bf16.
        return rows.to(self.feature_scale.dtype)


def length_groups(valid_BL: Tensor, num_groups: int) -> list[tuple[Tensor, int]] | None:
    """Rows in up to `num_groups` groups of similar span (from a row's first real event to the end),
    as (row indices, the group's widest span); groups of equal width are merged. None when one
    full-width pass is all there is to do. Reads the spans on the host (one sync per forward)."""
    B, L = valid_BL.shape
    if num_groups <= 1 or B <= 1:
        return None
    span_B = (valid_BL.cumsum(1) > 0).sum(1)
    order_B = torch.argsort(span_B, stable=True)
    spans = span_B[order_B].tolist()  # host sync: the widths decide the shapes
    if spans[0] >= L:
        return None
    size = -(-B // num_groups)
    groups: list[tuple[int, int, int]] = []  # (start, end, width) in sorted order
    for start in range(0, B, size):
        end = min(start + size, B)
        width = max(1, spans[end - 1])
        if groups and groups[-1][2] == width:
            groups[-1] = (groups[-1][0], end, width)
        else:
            groups.append((start, end, width))
    return [(order_B[start:end], width) for start, end, width in groups]


def counted_labels(item_BW: Tensor) -> Tensor:
    """[B, L] True where the next-item label is a real item (> unknown) after a real input event."""
    return (item_BW[:, 1:] > UNK_ID) & (item_BW[:, :-1] != PAD_ID)


TASKS = {"train": SeqRecModel.train_loss, "score": SeqRecModel.score, "query": SeqRecModel.query}


def _buffer_name(feature: str) -> str:
    return f"item_feature_{feature}"


def _batch_column(batch: dict[str, Tensor], name: str) -> Tensor:
    if name not in batch:
        raise KeyError(
            f"batch has no column '{name}' (has {sorted(batch)}); does the data match the model's DataSpec?"
        )
    return batch[name]


def _check_configs(model_cfg: ModelConfig, emb_cfg: EmbeddingsConfig) -> None:
    if model_cfg.d_model <= 0 or model_cfg.num_heads <= 0 or model_cfg.d_model % model_cfg.num_heads:
        raise ValueError(
            f"model.d_model ({model_cfg.d_model}) must be a positive multiple of model.num_heads ({model_cfg.num_heads})"
        )
    if model_cfg.length_groups < 1:
        raise ValueError(f"model.length_groups must be >= 1, got {model_cfg.length_groups}")
    if model_cfg.num_layers <= 0 or model_cfg.ffn_mult <= 0:
        raise ValueError(
            f"model.num_layers and model.ffn_mult must be > 0, got {model_cfg.num_layers}, {model_cfg.ffn_mult}"
        )
    if emb_cfg.dim <= 0:
        raise ValueError(f"embeddings.dim must be > 0, got {emb_cfg.dim}")
    if emb_cfg.use_time_gaps and not 1 <= emb_cfg.num_time_buckets <= MAX_TIME_BUCKETS:
        raise ValueError(
            f"embeddings.num_time_buckets must be in [1, {MAX_TIME_BUCKETS}], got {emb_cfg.num_time_buckets}"
        )
