"""DeepSpeed behind one small module: process group, ds_config from the run config, the engine.

The DeepSpeed config is generated here from `TrainConfig`/`OptimConfig`/`DistConfig`, so batch
sizes have one source. The same code runs on CPU (gloo, `DS_ACCELERATOR=cpu`) and on GPUs (NCCL).
Model code never imports this module or deepspeed.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from seqrec.config import ConfigError, DistConfig, EmbeddingsConfig, OptimConfig, TrainConfig
from seqrec.data.schema import COL_ITEM, COL_TARGET
from seqrec.distributed import DistInfo, init_process_group
from seqrec.metrics import target_ranks

TABLES_DIR = "tables"  # the sharded tables inside a checkpoint folder (torch.distributed.checkpoint)

log = logging.getLogger(__name__)


def _deepspeed() -> Any:
    """Import deepspeed with the accelerator chosen explicitly (no probing warning on CPU), and
    with no op that would be compiled at run time (see `_no_runtime_op_builds`)."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    _no_runtime_op_builds(deepspeed)
    return deepspeed


# DeepSpeed ops the training path would otherwise JIT-compile inside a run.
NO_RUNTIME_OPS = ("deepspeed_shm_comm", "deepspeed_ccl_comm")


def _no_runtime_op_builds(deepspeed: Any) -> None:
    """Keep DeepSpeed from compiling its CPU shared-memory all-reduce op at `init_distributed`.

    On CPU, DeepSpeed's comm backend JIT-builds `deepspeed_shm_comm` with ninja the first time a
    process group starts (66 to 170 s here), under a lock file in the torch extensions cache; a
    process killed during that build leaves the lock and every later run waits on it forever. The
    op serves only `inference_all_reduce`, which training never calls: marking it incompatible
    (DeepSpeed keeps the probe result in `deepspeed.ops.__compatible_ops__`, read by
    `comm.torch.build_shm_op` only) makes DeepSpeed use the process group, with nothing to build.
    Our optimizer is torch's AdamW, so no other op is built either.
    """
    ops = vars(deepspeed.ops)
    compatible = ops.setdefault("__compatible_ops__", {})  # pre-seeding also skips the slow probe
    for name in NO_RUNTIME_OPS:
        compatible[name] = False


def init_distributed(cfg: DistConfig) -> DistInfo:
    """The process group for a DeepSpeed run: who this process is, then the bounded rendezvous
    (seqrec.distributed), with DeepSpeed imported so that it builds no op at run time."""
    info = DistInfo.from_env()
    if not DistInfo.launched():
        # DeepSpeed asserts LOCAL_RANK (and reads RANK/WORLD_SIZE) even in a world of one; a plain
        # `seqrec train` has no launcher to set them.
        for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1"}.items():
            os.environ.setdefault(key, value)
    _deepspeed()
    init_process_group(cfg, info)
    return info


def resolve_precision(train: TrainConfig, device: torch.device) -> str:
    if train.precision != "auto":
        return train.precision
    return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"


def grad_accumulation_steps(train: TrainConfig, world_size: int) -> int:
    per_step = train.micro_batch_size * world_size
    if train.global_batch_size % per_step:
        raise ConfigError(
            f"train.global_batch_size ({train.global_batch_size}) must be a multiple of "
            f"train.micro_batch_size x world size ({train.micro_batch_size} x {world_size})"
        )
    return train.global_batch_size // per_step


def build_ds_config(train: TrainConfig, optim: OptimConfig, dist: DistConfig, world_size: int, precision: str) -> dict:
    """The DeepSpeed config, derived from the run config (the only place batch sizes are set)."""
    zero: dict[str, Any] = {"stage": dist.zero_stage}
    if dist.offload_optimizer and dist.zero_stage > 0:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": False}
    if dist.zero_stage == 3:
        # Gather parameters every forward; keep nothing persistent so the shards really are shards.
        zero.update(stage3_param_persistence_threshold=0, stage3_max_live_parameters=int(1e9))
    return {
        "train_batch_size": train.global_batch_size,
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": grad_accumulation_steps(train, world_size),
        "gradient_clipping": optim.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16"},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**12,
        "wall_clock_breakdown": False,
    }


class Engine:
    """The DeepSpeed engine with the few verbs the trainer uses."""

    def __init__(
        self,
        ds_engine: Any,
        info: DistInfo,
        precision: str,
        ds_config: dict,
        tables: Any = None,
        table_lr: Callable[[int], float] | None = None,
    ) -> None:
        self.ds = ds_engine
        self.info = info
        self.precision = precision
        self.ds_config = ds_config
        self.tables = tables  # seqrec.tables.ShardedTables, or None when the model owns its tables
        self.table_lr = table_lr  # optimizer step -> the tables' learning rate (given with the tables)
        self._set_table_lr()

    @property
    def module(self) -> torch.nn.Module:
        return self.ds.module

    def to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.info.device.type == "cpu":
            return batch
        return {k: v.to(self.info.device, non_blocking=True) for k, v in batch.items()}

    def forward(self, batch: dict[str, torch.Tensor], task: str = "train") -> dict[str, torch.Tensor]:
        batch = self.to_device(batch)
        if self.tables is None:
            return self.ds(batch, task=task)
        ids = self.module.lookup_ids(batch, task)  # every id of this forward: one sharded lookup
        return self.ds(batch, task=task, lookups=(ids, self.tables(ids)))

    def rank(self, batch: dict[str, torch.Tensor], exclude_seen: bool) -> torch.Tensor:
        """0-based full-ranking ranks [B] of the batch's targets (collective with sharded tables:
        every rank scores its own item rows against all ranks' queries)."""
        history = batch[COL_ITEM][:, :-1] if exclude_seen else None
        if self.tables is None:
            scores = self.forward(batch, task="score")["scores"]
            return target_ranks(scores.float().cpu(), batch[COL_TARGET], history)
        from seqrec.tables import sharded_target_ranks

        query = self.forward(batch, task="query")["query"]
        shards = self.tables.local_shards(self.tables.specs[0].name)  # the item table comes first
        return sharded_target_ranks(query, batch[COL_TARGET].to(query.device), history, shards, self.tables.specs[0].num_embeddings)

    def backward(self, loss: torch.Tensor) -> None:
        self.ds.backward(loss)

    def step(self) -> None:
        boundary = self.at_step_boundary
        self.ds.step()
        if boundary:
            self._set_table_lr()  # for the table updates of the next optimizer step

    def _set_table_lr(self) -> None:
        if self.tables is not None and self.table_lr is not None:
            self.tables.set_lr(self.table_lr(self.optimizer_steps))

    @property
    def optimizer_steps(self) -> int:
        """Optimizer steps taken (restored by `load`)."""
        return int(self.ds.global_steps)

    def train(self) -> None:
        self.ds.train()

    def eval(self) -> None:
        self.ds.eval()

    @property
    def at_step_boundary(self) -> bool:
        return bool(self.ds.is_gradient_accumulation_boundary())

    def lrs(self) -> list[float]:
        return [float(g["lr"]) for g in self.ds.optimizer.param_groups]

    def grad_norm(self) -> float | None:
        norm = self.ds.get_global_grad_norm()
        return None if norm is None else float(norm)

    def save(self, root: Path, tag: str, client_state: dict[str, Any]) -> None:
        """Collective: every rank writes its shard of the DeepSpeed checkpoint (and of the tables)."""
        self.ds.save_checkpoint(str(root), tag=tag, client_state=client_state, save_latest=False)
        if self.tables is not None:
            self.tables.save(root / tag / TABLES_DIR)

    def load(self, root: Path, tag: str, *, with_optimizer: bool = True) -> dict[str, Any]:
        """Collective. Returns the client state saved with the checkpoint."""
        # Under ZeRO-3 a weights-only load goes through zero_to_fp32, which ignores `tag` and wants a
        # `latest` file; loading the optimizer partitions too restores the same weights.
        zero3 = self.ds_config["zero_optimization"]["stage"] == 3
        path, client = self.ds.load_checkpoint(
            str(root),
            tag=tag,
            load_optimizer_states=with_optimizer or zero3,
            load_lr_scheduler_states=with_optimizer,
        )
        if path is None:
            raise FileNotFoundError(f"{root}/{tag}: DeepSpeed could not load this checkpoint")
        if self.tables is not None:
            self.tables.load(root / tag / TABLES_DIR, with_optimizer=with_optimizer)
            self._set_table_lr()
        return client or {}


def build_engine(
    model: torch.nn.Module,
    info: DistInfo,
    *,
    train: TrainConfig,
    optim: OptimConfig,
    dist: DistConfig,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LambdaLR,
    embeddings: EmbeddingsConfig | None = None,
) -> Engine:
    """Wrap `model` in a DeepSpeed engine with the trainer's optimizer and LR schedule
    (seqrec.optim.build_optimizer). Sharded tables follow the schedule's shape from their own peak
    rate: `embeddings.table_lr x scheduler.lr_lambdas[0](step)`.

    A model whose id tables live outside it (`model.embeddings is None`: embeddings.backend =
    "torchrec") gets them here, as sharded TorchRec tables (seqrec.tables) fed to its forward.
    """
    ds = _deepspeed()
    if dist.zero_stage == 3 and getattr(model, "length_groups", 1) > 1:
        # ZeRO-3 gathers a block's parameters at every call: all ranks must call the blocks equally
        # often, and the number of length groups depends on each rank's rows.
        log.info("ZeRO-3: the transformer runs each batch at full width (model.length_groups = 1)")
        model.length_groups = 1
    precision = resolve_precision(train, info.device)
    ds_config = build_ds_config(train, optim, dist, info.world_size, precision)
    tables = None
    if getattr(model, "embeddings", "absent") is None:
        from seqrec.tables import ShardedTables

        if embeddings is None:
            raise ValueError("a model without its own id tables needs the embeddings config to build them")
        gas = ds_config["gradient_accumulation_steps"]
        tables = ShardedTables(
            model.tables,
            embeddings,
            device=info.device,
            world_size=info.world_size,
            seed=train.seed,
            grad_scale=float(gas),  # undo DeepSpeed's 1/accumulation: tables update once per micro batch
            multi_pooling=embeddings.multi_pooling,
        )
        log.info("id tables (TorchRec, %s at lr %g): %s", embeddings.table_optimizer, embeddings.table_lr, tables.describe())
    ds_engine, _, _, _ = ds.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config, dist_init_required=False
    )
    if dist.zero_stage == 3 and getattr(model, "embeddings", None) is not None:
        # The output layer reads the fused table's item rows outside the table's own forward
        # (tied weights), so ZeRO-3 must gather it for the whole model's forward too.
        ds.zero.register_external_parameter(ds_engine.module, ds_engine.module.embeddings.weight)
    log.info(
        "engine: world %d, ZeRO-%d, %s, micro %d x accumulation %d x world = %d per step",
        info.world_size,
        dist.zero_stage,
        precision,
        train.micro_batch_size,
        ds_config["gradient_accumulation_steps"],
        train.global_batch_size,
    )
    table_lr = None
    if tables is not None:
        peak, shape = embeddings.table_lr, scheduler.lr_lambdas[0]

        def table_lr(step: int) -> float:
            return peak * shape(step)

    return Engine(ds_engine, info, precision, ds_config, tables, table_lr)
