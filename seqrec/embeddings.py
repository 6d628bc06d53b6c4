"""FusedEmbedding: many categorical features in one weight table, looked up with one call.

Every feature (item id, item side features, event features, time-gap buckets, positions) owns a
contiguous block of rows in a single `weight` [R, D]; a feature's ids are shifted by its row offset,
all shifted ids are concatenated and gathered with ONE `F.embedding` call, then split back per
feature. One parameter instead of a dozen keeps optimizer groups, ZeRO partitioning and checkpoint
layout simple, and one gather kernel replaces one per feature.

The first table starts at row 0; the model puts the item table first, so `weight[:num_items]` are the
item rows and double as the tied output layer.

Shapes: R total rows, D embedding width, K values per row of a multi-valued feature; `*` is any batch
shape (e.g. [B, L]).

Example:
    emb = FusedEmbedding([TableSpec("item", 100), TableSpec("genre", 20, multi_valued=True)], dim=8)
    out = emb({"item": torch.tensor([[2, 3]]), "genre": torch.tensor([[[2, 4, 0], [5, 0, 0]]])})
    out["item"].shape, out["genre"].shape  # [1, 2, 8], [1, 2, 8]
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from seqrec.data.schema import PAD_ID


@dataclass(frozen=True)
class TableSpec:
    """One categorical feature of a FusedEmbedding.

    Args:
        name: feature name (the key of its ids in `forward`).
        num_embeddings: rows of this feature (ids must be in [0, num_embeddings)).
        multi_valued: ids have a trailing K axis (padded with 0) that is pooled to one vector.
    """

    name: str
    num_embeddings: int
    multi_valued: bool = False


def _pool_sum(emb_XKD: Tensor, keep_XK: Tensor) -> Tensor:
    return (emb_XKD * keep_XK.unsqueeze(-1)).sum(-2)


def _pool_mean(emb_XKD: Tensor, keep_XK: Tensor) -> Tensor:
    # An all-pad row has no values: clamp the count so it pools to zeros instead of NaN.
    count_X1 = keep_XK.sum(-1, keepdim=True).clamp(min=1)
    return _pool_sum(emb_XKD, keep_XK) / count_X1


POOLING = {"sum": _pool_sum, "mean": _pool_mean}


class FusedEmbedding(nn.Module):
    """All categorical features in one weight [sum(num_embeddings), dim] with per-feature row offsets.

    `forward` looks every feature up with a single `F.embedding` call; multi-valued features are pooled
    (sum or mean over non-pad ids, pad = 0); each feature's output is multiplied by a learnable scalar
    `scale[feature]` (initialised to 1) so the model can weigh features against each other.

    Single-valued features do not treat id 0 specially: the pad row is an ordinary row, exactly like
    `nn.Embedding` without `padding_idx` (the model masks padded positions itself).

    Args:
        tables: the features, in row order (the first one starts at row 0).
        dim: embedding width D.
        multi_pooling: "sum" or "mean" over the non-pad ids of multi-valued features.
        init_std: standard deviation of the normal initialisation of `weight`.
    """

    def __init__(
        self,
        tables: Sequence[TableSpec],
        dim: int,
        *,
        multi_pooling: Literal["sum", "mean"] = "mean",
        init_std: float = 0.02,
    ) -> None:
        super().__init__()
        _check_tables(tables, dim, multi_pooling)
        self.tables: dict[str, TableSpec] = {t.name: t for t in tables}
        self.offsets: dict[str, int] = {}
        row = 0
        for t in tables:
            self.offsets[t.name] = row
            row += t.num_embeddings
        self.num_rows = row
        self.dim = dim
        self.multi_pooling = multi_pooling
        self.init_std = init_std
        self._scale_index = {t.name: i for i, t in enumerate(tables)}
        self.weight = nn.Parameter(torch.empty(row, dim))
        self.scale = nn.Parameter(torch.empty(len(tables)))
        self.init_weights()

    def init_weights(self) -> None:
        """Normal(0, init_std) rows, unit scales (also after `to_empty` from the meta device)."""
        nn.init.normal_(self.weight, mean=0.0, std=self.init_std)
        nn.init.ones_(self.scale)

    def rows(self, name: str) -> slice:
        """The rows of `weight` that belong to feature `name`."""
        start = self.offsets[name]
        return slice(start, start + self.tables[name].num_embeddings)

    def forward(self, ids: dict[str, Tensor]) -> dict[str, Tensor]:
        """Look up a subset of the features: {name: ids [*] or [*, K]} -> {name: [*, D]}."""
        if not ids:
            return {}
        flat_ids: list[Tensor] = []
        for name, x in ids.items():
            spec = self._spec(name, x)
            _check_range(name, x, spec.num_embeddings)
            flat_ids.append(x.reshape(-1).long() + self.offsets[name])
        emb_RD = F.embedding(torch.cat(flat_ids), self.weight)  # the one lookup for all features
        pieces = emb_RD.split([t.numel() for t in flat_ids])
        out: dict[str, Tensor] = {}
        for (name, x), emb in zip(ids.items(), pieces, strict=True):
            emb = emb.view(*x.shape, self.dim)
            if self.tables[name].multi_valued:
                emb = POOLING[self.multi_pooling](emb, x != PAD_ID)
            out[name] = emb * self.scale[self._scale_index[name]]
        return out

    def _spec(self, name: str, x: Tensor) -> TableSpec:
        if name not in self.tables:
            raise KeyError(f"FusedEmbedding has no feature '{name}' (has {sorted(self.tables)})")
        spec = self.tables[name]
        if spec.multi_valued and x.dim() < 1:
            raise ValueError(
                f"feature '{name}' is multi-valued: ids need a trailing K axis, got shape {tuple(x.shape)}"
            )
        return spec

    def extra_repr(self) -> str:
        feats = ", ".join(
            f"{t.name}={t.num_embeddings}{'[multi]' if t.multi_valued else ''}" for t in self.tables.values()
        )
        return f"rows={self.num_rows}, dim={self.dim}, pooling={self.multi_pooling}, tables=({feats})"


def _check_tables(tables: Sequence[TableSpec], dim: int, multi_pooling: str) -> None:
    if not tables:
        raise ValueError("FusedEmbedding needs at least one table")
    names = [t.name for t in tables]
    if len(set(names)) != len(names):
        raise ValueError(f"FusedEmbedding table names must be unique, got {names}")
    for t in tables:
        if t.num_embeddings <= 0:
            raise ValueError(f"table '{t.name}': num_embeddings must be > 0, got {t.num_embeddings}")
    if dim <= 0:
        raise ValueError(f"FusedEmbedding dim must be > 0, got {dim}")
    if multi_pooling not in POOLING:
        raise ValueError(f"multi_pooling must be one of {sorted(POOLING)}, got {multi_pooling!r}")


def _check_range(name: str, ids: Tensor, num_embeddings: int) -> None:
    """Out-of-range ids would silently read another feature's rows, so they are always checked."""
    if ids.numel() == 0:
        return
    if ids.device.type == "cpu":
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= num_embeddings:
            raise ValueError(
                f"feature '{name}': ids must be in [0, {num_embeddings}), got min {lo}, max {hi}"
            )
    else:
        # No host sync on accelerators: the assert fires asynchronously on the device.
        torch._assert_async(((ids >= 0) & (ids < num_embeddings)).all())
