"""Id tables: every categorical feature of the model, looked up with one call per batch.

The interface the model sees is `tables(ids) -> outputs`: `{feature: ids [*] or [*, K]}` ->
`{feature: [*, D]}`, multi-valued features pooled over their non-pad ids. A feature reads one table;
a table may serve several features (the item table also serves `item_label` and `item_candidate`,
the loss's label and candidate rows: `TableSpec.aliases`). Two implementations:

- `FusedEmbedding` (here, `embeddings.backend = "dense"`): every table owns a contiguous block of
  rows in a single `weight` [R, D]; ids are shifted by their table's row offset, concatenated and
  gathered with ONE `F.embedding` call, then split back per feature. It is a dense parameter of the
  model, trained by DeepSpeed's optimizer (dense gradient and AdamW state for every row).
- `seqrec.tables.ShardedTables` (`embeddings.backend = "torchrec"`): one TorchRec
  `EmbeddingCollection` (table-batched FBGEMM kernels), sharded across ranks by TorchRec's planner,
  updated by a row-wise optimizer fused into backward. It lives outside the model (built and
  injected by the engine side), so this module stays free of torch.distributed.

`pool` is the one pooling rule both share. The first table starts at row 0; the model puts the item
table first, so `weight[:num_items]` are the item rows.

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
        name: table name, also the name of the feature that reads it (the key of its ids in `forward`).
        num_embeddings: rows of this table (ids must be in [0, num_embeddings)).
        multi_valued: ids have a trailing K axis (padded with 0) that is pooled to one vector.
        aliases: more feature names that read this table (single-valued lookups).
    """

    name: str
    num_embeddings: int
    multi_valued: bool = False
    aliases: tuple[str, ...] = ()

    @property
    def features(self) -> tuple[str, ...]:
        return (self.name, *self.aliases)


def _pool_sum(emb_XKD: Tensor, keep_XK: Tensor) -> Tensor:
    return (emb_XKD * keep_XK.unsqueeze(-1)).sum(-2)


def _pool_mean(emb_XKD: Tensor, keep_XK: Tensor) -> Tensor:
    # An all-pad row has no values: clamp the count so it pools to zeros instead of NaN.
    count_X1 = keep_XK.sum(-1, keepdim=True).clamp(min=1)
    return _pool_sum(emb_XKD, keep_XK) / count_X1


POOLING = {"sum": _pool_sum, "mean": _pool_mean}


def pool(emb_XD: Tensor, ids: Tensor, multi_valued: bool, pooling: str) -> Tensor:
    """Per-id vectors [ids.numel(), D] of one feature -> [*ids.shape, D], or [*ids.shape[:-1], D]
    pooled over the non-pad ids of a multi-valued feature."""
    emb = emb_XD.view(*ids.shape, emb_XD.shape[-1])
    return POOLING[pooling](emb, ids != PAD_ID) if multi_valued else emb


def feature_tables(tables: Sequence[TableSpec]) -> dict[str, TableSpec]:
    """feature name -> the table it reads (names and aliases must be unique across tables)."""
    out: dict[str, TableSpec] = {}
    for t in tables:
        for f in t.features:
            if f in out:
                raise ValueError(f"feature '{f}' is read by two tables ('{out[f].name}' and '{t.name}')")
            out[f] = t
    return out


class FusedEmbedding(nn.Module):
    """All categorical features in one weight [sum(num_embeddings), dim] with per-table row offsets.

    `forward` looks every feature up with a single `F.embedding` call; multi-valued features are pooled
    (sum or mean over non-pad ids, pad = 0).

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
        self.feature_tables = feature_tables(tables)
        self.offsets: dict[str, int] = {}
        row = 0
        for t in tables:
            self.offsets[t.name] = row
            row += t.num_embeddings
        self.num_rows = row
        self.dim = dim
        self.multi_pooling = multi_pooling
        self.init_std = init_std
        self.weight = nn.Parameter(torch.empty(row, dim))
        self.init_weights()

    def init_weights(self) -> None:
        """Normal(0, init_std) rows (also after `to_empty` from the meta device)."""
        nn.init.normal_(self.weight, mean=0.0, std=self.init_std)

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
            spec = check_ids(self.feature_tables, name, x)
            flat_ids.append(x.reshape(-1).long() + self.offsets[spec.name])
        emb_RD = F.embedding(torch.cat(flat_ids), self.weight)  # the one lookup for all features
        pieces = emb_RD.split([t.numel() for t in flat_ids])
        return {
            name: pool(emb, x, self._multi(name), self.multi_pooling)
            for (name, x), emb in zip(ids.items(), pieces, strict=True)
        }

    def _multi(self, feature: str) -> bool:
        spec = self.feature_tables[feature]
        return spec.multi_valued and feature == spec.name

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


def check_ids(feature_tables: dict[str, TableSpec], name: str, ids: Tensor) -> TableSpec:
    """The table of feature `name`, after checking the ids' shape and range."""
    if name not in feature_tables:
        raise KeyError(f"no id table serves feature '{name}' (features: {sorted(feature_tables)})")
    spec = feature_tables[name]
    if spec.multi_valued and name == spec.name and ids.dim() < 1:
        raise ValueError(f"feature '{name}' is multi-valued: ids need a trailing K axis, got shape {tuple(ids.shape)}")
    _check_range(name, ids, spec.num_embeddings)
    return spec


def _check_range(name: str, ids: Tensor, num_embeddings: int) -> None:
    """Out-of-range ids would silently read another table's rows (FBGEMM would silently read row 0),
    so they are always checked."""
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
