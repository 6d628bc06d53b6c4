"""Sharded id tables (`embeddings.backend = "torchrec"`): TorchRec + FBGEMM, outside the dense model.

Every table of the model (`SeqRecModel.tables`: item ids, item side features, event features,
time-gap buckets, positions) is one `EmbeddingConfig` of ONE `EmbeddingCollection`: FBGEMM's
table-batched kernel looks every feature up in one call per batch. TorchRec's planner shards the
tables across ranks (row-wise for large tables, table-wise for small ones, or what
`embeddings.sharding` pins), and the table optimizer (`embeddings.table_optimizer`, row-wise Adagrad
by default) runs inside backward: no dense gradient of any table ever exists, and optimizer state is
one float per row. The dense transformer stays on DeepSpeed and gets the looked-up rows as input
(`SeqRecModel.forward(..., lookups=...)`), so the model imports nothing distributed.

One lookup per batch: `ShardedTables(ids) -> rows`, `{feature: ids [*] or [*, K]} -> {feature: [*, D]}`
(multi-valued features pooled like `FusedEmbedding`, `embeddings.pool`). Every rank must call it the
same number of times (the lookup is an all-to-all); features without ids this call are sent empty.

Gradients: each rank's loss is the mean over its own tokens, and DeepSpeed averages dense gradients
over ranks and micro batches. TorchRec's all-to-all divides the row gradients it sends back by the
world size (`comm_ops` gradient division, switched on explicitly here), so rows get the mean over
ranks too; DeepSpeed's 1/accumulation is undone on the rows (`grad_scale`), because the fused update
runs once per micro batch. Each table update thus uses the gradient of the micro batch's mean loss
over all ranks: N ranks == 1 rank with the same global micro batch.

Initial rows are Normal(0, 0.02) drawn per block of `INIT_BLOCK_ROWS` global rows from a generator
seeded by (seed, table, block): the same weights for any world size and sharding plan.

Checkpoints: `state_dict()` holds the tables' ShardedTensors and the fused optimizer state, saved and
loaded with torch.distributed.checkpoint (each rank writes its own shards; see seqrec.checkpoint).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from seqrec.config import ConfigError, EmbeddingsConfig
from seqrec.data.schema import NUM_RESERVED_IDS, SchemaError
from seqrec.distributed import gather_rows, row_offset
from seqrec.embeddings import TableSpec, check_ids, feature_tables, pool
from seqrec.metrics import unique_history

log = logging.getLogger(__name__)
# TorchRec's jagged tensors ask torch.fx whether they are traced on every call; torch warns once per
# process that the question is ambiguous. Nothing here is traced.
logging.getLogger("torch.fx._symbolic_trace").setLevel(logging.ERROR)

INIT_STD = 0.02
INIT_BLOCK_ROWS = 1 << 16
SHARDING_TYPES = ("row_wise", "table_wise")
"""Sharding types offered to the planner. data_parallel would need its own gradient all-reduce
(DistributedModelParallel is built with init_data_parallel=False: DeepSpeed owns the dense side), and
column-wise shards would split the item rows' dot products in evaluation."""
SCORE_BLOCK = (512, 512)  # queries x items scored at once in sharded evaluation (1 MiB of fp32)
PLAN_FILE = "plan.json"
DCP_METADATA = ".metadata"  # written last by torch.distributed.checkpoint.save
CPU_OPTIMIZERS = ("rowwise_adagrad", "adagrad", "sgd")
"""Table optimizers the CPU kernels (fbgemm-gpu-cpu) run; adam and lamb need the CUDA kernels."""


class TablePlanError(ConfigError):
    """The tables cannot be placed or trained as configured (names the table and the limit)."""


class TableShapeError(SchemaError):
    """A checkpoint's tables do not have the sizes of this data and config (names the table)."""


def optimizer_class(name: str) -> type[torch.optim.Optimizer]:
    import torchrec.optim as trec_optim

    return {
        "rowwise_adagrad": trec_optim.RowWiseAdagrad,
        "adagrad": trec_optim.Adagrad,
        "sgd": trec_optim.SGD,
        "adam": trec_optim.Adam,
        "lamb": trec_optim.LAMB,
    }[name]


def parse_sharding(pins: Sequence[str], tables: Sequence[TableSpec]) -> dict[str, str]:
    """["item=row_wise", ...] -> {table: sharding type}; names the bad entry."""
    names = {t.name for t in tables}
    out: dict[str, str] = {}
    for entry in pins:
        table, sep, kind = entry.partition("=")
        table, kind = table.strip(), kind.strip()
        if not sep or table not in names:
            raise TablePlanError(
                f"embeddings.sharding entry '{entry}': expected '<table>=<type>' with a table of "
                f"{sorted(names)}"
            )
        if kind not in SHARDING_TYPES:
            raise TablePlanError(
                f"embeddings.sharding: table '{table}' pinned to '{kind}', which the sharded lookup does "
                f"not support here (supported: {', '.join(SHARDING_TYPES)})"
            )
        out[table] = kind
    return out


@dataclass(frozen=True, slots=True)
class Shard:
    """This rank's rows [start, start + rows.shape[0]) of one table (a view of the kernel's weights)."""

    start: int
    rows: Tensor


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, scale: float) -> Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return grad * ctx.scale, None


class ShardedTables:
    """The model's id tables as one sharded TorchRec EmbeddingCollection with a fused optimizer.

    Collective: build it, call it, save and load it on every rank, in the same order.
    """

    def __init__(
        self,
        tables: Sequence[TableSpec],
        cfg: EmbeddingsConfig,
        *,
        device: torch.device,
        world_size: int,
        seed: int,
        grad_scale: float,
        multi_pooling: str,
    ) -> None:
        import torch.distributed as dist
        from torchrec import EmbeddingCollection, EmbeddingConfig
        from torchrec.distributed import DistributedModelParallel
        from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
        from torchrec.distributed.planner.types import ParameterConstraints, PlannerError
        from torchrec.distributed.sharding_plan import get_default_sharders
        from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward

        if device.type == "cpu" and cfg.table_optimizer not in CPU_OPTIMIZERS:
            raise TablePlanError(
                f"embeddings.table_optimizer = '{cfg.table_optimizer}': the CPU kernel (fbgemm-gpu-cpu) "
                f"runs only {', '.join(CPU_OPTIMIZERS)}; '{cfg.table_optimizer}' needs the CUDA kernels"
            )
        self.specs = list(tables)
        self.features = [f for t in self.specs for f in t.features]  # the KJT's key order, fixed
        self.feature_tables = feature_tables(self.specs)
        self.dim = cfg.dim
        self.multi_pooling = multi_pooling
        self.grad_scale = grad_scale
        if cfg.dim % 4:
            raise TablePlanError(f"embeddings.dim = {cfg.dim}: FBGEMM's table kernels need a multiple of 4")
        from torchrec.distributed.comm_ops import set_gradient_division

        set_gradient_division(True)  # row gradients averaged over ranks, like DeepSpeed's dense ones
        pins = parse_sharding(cfg.sharding, self.specs)
        configs = [
            EmbeddingConfig(name=t.name, num_embeddings=t.num_embeddings, embedding_dim=cfg.dim, feature_names=list(t.features))
            for t in self.specs
        ]
        collection = EmbeddingCollection(tables=configs, device=torch.device("meta"))
        kwargs: dict[str, Any] = {"lr": cfg.table_lr}
        if cfg.table_optimizer in ("rowwise_adagrad", "adagrad"):
            kwargs["eps"] = cfg.table_eps
        apply_optimizer_in_backward(optimizer_class(cfg.table_optimizer), collection.parameters(), kwargs)
        constraints = {t.name: ParameterConstraints(sharding_types=self._allowed(t, pins, cfg)) for t in self.specs}
        budget = int(cfg.memory_budget_gib * 2**30) if cfg.memory_budget_gib else None
        try:
            with _quiet_torchrec():
                topology = Topology(
                    world_size=world_size,
                    compute_device=device.type,
                    local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", world_size)),
                    **({"hbm_cap": budget} if device.type == "cuda" and budget else {}),
                    **({"ddr_cap": budget} if device.type == "cpu" and budget else {}),
                )
                planner = EmbeddingShardingPlanner(topology=topology, constraints=constraints, debug=False)
                # Every rank plans for itself (the planner is deterministic) rather than through
                # collective_plan, whose other ranks would wait forever on a rank 0 that failed.
                plan = planner.plan(collection, get_default_sharders())
        except PlannerError as e:
            sizes = ", ".join(f"{t.name} {t.num_embeddings} x {cfg.dim}" for t in self.specs)
            limit = f"{cfg.memory_budget_gib} GiB per rank (embeddings.memory_budget_gib)" if budget else "the planner's memory per rank"
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise TablePlanError(f"the id tables ({sizes}) do not fit {limit} on {world_size} ranks: {first}") from None
        self.plan = _plan_summary(plan)
        if dist.is_initialized() and dist.get_world_size() > 1:
            plans: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(plans, self.plan)
            if any(p != self.plan for p in plans):
                raise TablePlanError(f"the ranks planned the id tables differently: {plans}")
        with _quiet_torchrec():
            self.module = DistributedModelParallel(collection, device=device, plan=plan, init_data_parallel=False)
        self.init_weights(seed)

    @staticmethod
    def _allowed(spec: TableSpec, pins: dict[str, str], cfg: EmbeddingsConfig) -> list[str]:
        """Sharding types the planner may use for a table: the pin, row-wise for large tables (the
        planner's cost model would put a whole large table on one rank), else either."""
        if spec.name in pins:
            return [pins[spec.name]]
        if spec.num_embeddings >= cfg.row_wise_min_rows:
            return ["row_wise"]
        return list(SHARDING_TYPES)

    # ---------------------------------------------------------------------------------- lookup
    def __call__(self, ids: dict[str, Tensor]) -> dict[str, Tensor]:
        from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

        flat = {}
        for name, x in ids.items():
            check_ids(self.feature_tables, name, x)  # FBGEMM would map out-of-range ids to row 0
            flat[name] = x.reshape(-1).long()
        device = next(iter(flat.values())).device if flat else torch.device("cpu")
        empty = torch.zeros(0, dtype=torch.long, device=device)
        values = [flat.get(f, empty) for f in self.features]
        kjt = KeyedJaggedTensor(
            keys=self.features,
            values=torch.cat(values),
            lengths=torch.tensor([len(v) for v in values], dtype=torch.long, device=device),
        )
        out = self.module(kjt)
        rows = {}
        for name, x in ids.items():
            emb = out[name].values()
            if self.grad_scale != 1.0:
                emb = _ScaleGrad.apply(emb, self.grad_scale)
            spec = self.feature_tables[name]
            rows[name] = pool(emb, x, spec.multi_valued and name == spec.name, self.multi_pooling)
        return rows

    # ---------------------------------------------------------------------------------- state
    def weights(self) -> dict[str, Any]:
        """{table: ShardedTensor} (views of the kernel's weights)."""
        return {t.name: self.module.state_dict()[_weight_key(t.name)] for t in self.specs}

    def local_shards(self, table: str) -> list[Shard]:
        sharded = self.module.state_dict()[_weight_key(table)]
        return [Shard(int(s.metadata.shard_offsets[0]), s.tensor) for s in sharded.local_shards()]

    @torch.no_grad()
    def init_weights(self, seed: int) -> None:
        """Normal(0, INIT_STD) rows, block by block from (seed, table, block): plan independent."""
        for index, spec in enumerate(self.specs):
            for shard in self.local_shards(spec.name):
                init_rows(shard.rows, shard.start, seed, index)

    def state_dict(self) -> dict[str, Any]:
        """Tables and the fused optimizer state, for torch.distributed.checkpoint."""
        return {"tables": self.module.state_dict(), "optimizer": self.module.fused_optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["tables"], strict=True)
        self.module.fused_optimizer.load_state_dict(state["optimizer"])

    def set_lr(self, lr: float) -> None:
        """The learning rate of the fused table updates from now on (the LR schedule, every step)."""
        optimizer = self.module.fused_optimizer
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.step()  # the updates run inside backward; step() only hands the kernels the new rate

    def describe(self) -> str:
        return json.dumps(self.plan, sort_keys=True)

    def save(self, folder: Path) -> None:
        """Collective: every rank writes its own shards (torch.distributed.checkpoint) + the plan."""
        import torch.distributed.checkpoint as dcp

        with _quiet_dcp():
            dcp.save(self.state_dict(), checkpoint_id=str(folder))
        if _rank() == 0:
            (folder / PLAN_FILE).write_text(json.dumps(self.plan, indent=2, sort_keys=True) + "\n")

    def load(self, folder: Path, *, with_optimizer: bool = True) -> None:
        """Collective: read this rank's shards (any plan and world size the checkpoint was written with)."""
        import torch.distributed.checkpoint as dcp

        if not (folder / DCP_METADATA).is_file():
            raise FileNotFoundError(f"{folder}: no sharded tables in this checkpoint (written by embeddings.backend = 'dense'?)")
        state = self.state_dict()
        if not with_optimizer:
            del state["optimizer"]
        check_table_sizes(folder, self.specs, self.dim)
        with _quiet_dcp():
            dcp.load(state, checkpoint_id=str(folder))
        self.module.load_state_dict(state["tables"], strict=True)
        if with_optimizer:
            self.module.fused_optimizer.load_state_dict(state["optimizer"])


def init_rows(rows: Tensor, start: int, seed: int, table_index: int) -> None:
    """Fill global rows [start, start + len(rows)) of table `table_index` deterministically."""
    end = start + rows.shape[0]
    block = start // INIT_BLOCK_ROWS
    while block * INIT_BLOCK_ROWS < end:
        lo = block * INIT_BLOCK_ROWS
        gen = torch.Generator().manual_seed(hash((seed, table_index, block)) & 0x7FFF_FFFF_FFFF_FFFF)
        values = torch.randn(INIT_BLOCK_ROWS, rows.shape[1], generator=gen) * INIT_STD
        a, b = max(lo, start), min(lo + INIT_BLOCK_ROWS, end)
        rows[a - start : b - start].copy_(values[a - lo : b - lo])
        block += 1


def check_table_sizes(folder: Path, specs: Sequence[TableSpec], dim: int) -> None:
    """The saved tables have the shapes of `specs` (else one line naming the table)."""
    import torch.distributed.checkpoint as dcp

    meta = dcp.FileSystemReader(str(folder)).read_metadata().state_dict_metadata
    for spec in specs:
        key = f"tables.{_weight_key(spec.name)}"
        if key not in meta:
            raise TableShapeError(f"{folder}: checkpoint has no table '{spec.name}' (has {sorted(k for k in meta if k.startswith('tables.'))})")
        saved = tuple(meta[key].size)
        if saved != (spec.num_embeddings, dim):
            raise TableShapeError(
                f"{folder}: table '{spec.name}' is {saved[0]} x {saved[1]} in the checkpoint but "
                f"{spec.num_embeddings} x {dim} for this data and config"
            )


def consolidate(folder: Path, specs: Sequence[TableSpec], dim: int) -> Tensor:
    """The saved tables as one dense weight [sum rows, dim] in `specs` order (FusedEmbedding's
    layout), read in one process without a process group (export, seqrec evaluate)."""
    import torch.distributed.checkpoint as dcp

    if not (folder / DCP_METADATA).is_file():
        raise FileNotFoundError(f"{folder}: no sharded tables in this checkpoint")
    check_table_sizes(folder, specs, dim)
    state = {"tables": {_weight_key(t.name): torch.empty(t.num_embeddings, dim) for t in specs}}
    with _quiet_dcp():
        dcp.load(state, checkpoint_id=str(folder), no_dist=True)
    return torch.cat([state["tables"][_weight_key(t.name)] for t in specs])


@torch.no_grad()
def sharded_target_ranks(
    query_BE: Tensor, targets_B: Tensor, history_BL: Tensor | None, shards: Sequence[Shard], num_items: int
) -> Tensor:
    """Full-ranking ranks [B] of this rank's targets, each rank holding only its rows of the item table.

    Collective. The queries, targets and histories of all ranks are all-gathered (G rows); every
    rank scores its own item rows against all G queries, block by block, and counts per query the
    real items other than the target (and, with a history, other than the history's items) that
    score >= the target; the counts are summed over ranks. The target score is computed by the rank
    owning the target row and summed over ranks (it is 0 elsewhere). Same result as
    `metrics.target_ranks` on the whole table; memory per rank is the shard, the gathered queries
    and one SCORE_BLOCK of scores.
    """
    import torch.distributed as dist

    multi = dist.is_initialized() and dist.get_world_size() > 1
    B = query_BE.shape[0]
    q_GE = gather_rows(query_BE.float(), multi)
    t_G = gather_rows(targets_B.long(), multi)
    h_GL = gather_rows(history_BL.long().to(q_GE.device), multi) if history_BL is not None else None
    G = q_GE.shape[0]
    target_score_G = torch.zeros(G, device=q_GE.device)
    for shard in shards:
        owned_G = (t_G >= shard.start) & (t_G < shard.start + shard.rows.shape[0])
        if bool(owned_G.any()):
            rows = shard.rows[t_G[owned_G] - shard.start].float()
            target_score_G[owned_G] = (q_GE[owned_G] * rows).sum(-1)
    if multi:
        dist.all_reduce(target_score_G)
    # Ids that are never counted, per row, each once: pad, unknown, the target, the history.
    extra = [h_GL] if h_GL is not None else []
    reserved_G2 = torch.arange(NUM_RESERVED_IDS, device=q_GE.device).expand(G, NUM_RESERVED_IDS)
    excluded_GX = torch.cat([t_G.unsqueeze(1), reserved_G2, *extra], dim=1).sort(dim=1).values
    unique_GX = torch.ones_like(excluded_GX, dtype=torch.bool)
    unique_GX[:, 1:] = excluded_GX[:, 1:] != excluded_GX[:, :-1]
    count_G = torch.zeros(G, dtype=torch.long, device=q_GE.device)
    # Blocks of SCORE_BLOCK queries x items: the [block] scores stay in cache between the matmul and
    # the compare-and-count (3x faster here than [G, chunk] passes through memory).
    rows_b, cols_b = SCORE_BLOCK
    scores = torch.empty(rows_b, cols_b, device=q_GE.device)
    for g0 in range(0, G, rows_b):
        q_bE = q_GE[g0 : g0 + rows_b]
        threshold_b1 = target_score_G[g0 : g0 + rows_b].unsqueeze(1)
        excluded_bX, unique_bX = excluded_GX[g0 : g0 + rows_b], unique_GX[g0 : g0 + rows_b]
        count_b = count_G[g0 : g0 + rows_b]
        for shard in shards:
            for lo in range(0, shard.rows.shape[0], cols_b):
                block = shard.rows[lo : lo + cols_b]
                first, width = shard.start + lo, block.shape[0]
                scores_bC = torch.mm(q_bE, block.float().T, out=scores[: q_bE.shape[0], :width])
                count_b += (scores_bC >= threshold_b1).sum(1, dtype=torch.int32)
                # minus the excluded ids of this block that were counted (a gather, not a mask)
                rel_bX = excluded_bX - first
                inside_bX = unique_bX & (rel_bX >= 0) & (rel_bX < width)
                hit_bX = scores_bC.gather(1, rel_bX.clamp(0, width - 1)) >= threshold_b1
                count_b -= (inside_bX & hit_bX).sum(1)
    if multi:
        dist.all_reduce(count_G)
    num_candidates_G = torch.full_like(count_G, num_items - NUM_RESERVED_IDS - 1)
    if h_GL is not None:
        num_candidates_G -= unique_history(h_GL, t_G)[1].sum(1)  # distinct real history items, not the target
    ranks_G = torch.where(target_score_G.isnan(), num_candidates_G, count_G)
    start = row_offset(B, multi, q_GE.device)
    return ranks_G[start : start + B].cpu()


@torch.no_grad()
def sharded_top_k(query_BE: Tensor, history_BL: Tensor | None, shards: Sequence[Shard], k: int) -> tuple[Tensor, Tensor]:
    """The k best items [B, k] (scores, ids) over the whole sharded item table for this rank's queries,
    pad, unknown and (with a history) the history's items excluded; best first.

    Collective, like `sharded_target_ranks`: the queries and histories of all ranks are all-gathered,
    every rank keeps a running top-k of its own item rows block by block (memory: its shard, the
    queries and one SCORE_BLOCK), then the ranks' top-k lists are all-gathered and merged. Entries
    past the number of candidates have score -inf and id -1. Equal to `torch.topk` over the scores
    against the whole table (up to the order of exactly tied scores).
    """
    import torch.distributed as dist

    multi = dist.is_initialized() and dist.get_world_size() > 1
    B = query_BE.shape[0]
    q_GE = gather_rows(query_BE.float(), multi)
    h_GL = gather_rows(history_BL.long().to(q_GE.device), multi) if history_BL is not None else None
    G, device = q_GE.shape[0], q_GE.device
    best_s = torch.full((G, k), -float("inf"), device=device)
    best_i = torch.full((G, k), -1, dtype=torch.long, device=device)
    rows_b, cols_b = SCORE_BLOCK
    for g0 in range(0, G, rows_b):
        q_bE = q_GE[g0 : g0 + rows_b]
        b = q_bE.shape[0]
        for shard in shards:
            for lo in range(0, shard.rows.shape[0], cols_b):
                block = shard.rows[lo : lo + cols_b]
                first, width = shard.start + lo, block.shape[0]
                s_bC = q_bE @ block.float().T
                if first < NUM_RESERVED_IDS:
                    s_bC[:, : NUM_RESERVED_IDS - first] = -float("inf")
                if h_GL is not None:
                    rel_bL = h_GL[g0 : g0 + b] - first
                    r, c = torch.nonzero((rel_bL >= 0) & (rel_bL < width), as_tuple=True)
                    s_bC[r, rel_bL[r, c]] = -float("inf")
                ids_bC = torch.arange(first, first + width, device=device).expand(b, width)
                cand_s = torch.cat([best_s[g0 : g0 + b], s_bC], dim=1)
                cand_i = torch.cat([best_i[g0 : g0 + b], ids_bC], dim=1)
                top = cand_s.topk(k, dim=1)
                best_s[g0 : g0 + b], best_i[g0 : g0 + b] = top.values, cand_i.gather(1, top.indices)
    if multi:
        world = dist.get_world_size()
        all_s, all_i = [torch.empty_like(best_s) for _ in range(world)], [torch.empty_like(best_i) for _ in range(world)]
        dist.all_gather(all_s, best_s)
        dist.all_gather(all_i, best_i)
        top = torch.cat(all_s, dim=1).topk(k, dim=1)
        best_s, best_i = top.values, torch.cat(all_i, dim=1).gather(1, top.indices)
    best_i = torch.where(torch.isinf(best_s), -1, best_i)
    start = row_offset(B, multi, device)
    return best_s[start : start + B].cpu(), best_i[start : start + B].cpu()


@contextlib.contextmanager
def _quiet_torchrec() -> Iterator[None]:
    """TorchRec's planner warns on every CPU build (a Topology built directly, a dense-size
    estimate it cannot make on the meta device, deprecations); its errors still surface."""
    logger = logging.getLogger("torchrec")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


@contextlib.contextmanager
def _quiet_dcp() -> Iterator[None]:
    """TorchRec's tables are ShardedTensors, which torch.distributed.checkpoint warns about on every
    tensor (deprecated in favour of DTensor); a process-group-free load warns that it is one."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*ShardedTensor.*", category=FutureWarning)
        warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process.*")
        yield


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_initialized() else 0


def _weight_key(table: str) -> str:
    return f"embeddings.{table}.weight"


def _plan_summary(plan: Any) -> dict[str, Any]:
    """{table: {"sharding": ..., "kernel": ..., "ranks": [...], "shards": [[row offset, rows], ...]}}."""
    out: dict[str, Any] = {}
    for module_plan in plan.plan.values():
        for table, p in module_plan.items():
            shards = p.sharding_spec.shards if p.sharding_spec is not None else []
            out[table] = {
                "sharding": p.sharding_type,
                "kernel": p.compute_kernel,
                "ranks": list(p.ranks or []),
                "shards": [[int(s.shard_offsets[0]), int(s.shard_sizes[0])] for s in shards],
            }
    return out
