"""DeepSpeed behind one small module: process group, ds_config from the run config, the engine.

The DeepSpeed config is generated here from `TrainConfig`/`OptimConfig`/`DistConfig`, so batch
sizes have one source. The same code runs on CPU (gloo, `DS_ACCELERATOR=cpu`) and on GPUs (NCCL).
Model code never imports this module or deepspeed.
"""

from __future__ import annotations

import logging
import math
import os
import socket
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

from seqrec.config import ConfigError, DistConfig, EmbeddingsConfig, OptimConfig, TrainConfig
from seqrec.data.schema import COL_ITEM, COL_TARGET
from seqrec.metrics import target_ranks

TABLES_DIR = "tables"  # the sharded tables inside a checkpoint folder (torch.distributed.checkpoint)

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class DistInfo:
    """Who this process is, read once from the launcher's environment (nanochat compute_init)."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @staticmethod
    def launched() -> bool:
        """True under a launcher (torchrun, the deepspeed launcher, a PyTorchJob) with world > 1."""
        return int(os.environ.get("WORLD_SIZE", "1")) > 1

    @classmethod
    def single(cls) -> DistInfo:
        """A world of one on this host, without a process group."""
        device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
        return cls(rank=0, world_size=1, local_rank=0, device=device)

    @classmethod
    def from_env(cls) -> DistInfo:
        if "WORLD_SIZE" not in os.environ:
            # A plain `seqrec train` without a launcher: a world of one on this host.
            os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(free_port()))
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
        return cls(rank=rank, world_size=world, local_rank=local_rank, device=device)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


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
    """Create the process group (gloo on CPU, nccl on CUDA unless cfg.backend says otherwise).

    Waiting for the other ranks is bounded by `cfg.timeout_s` and announced on one line, so a
    missing rank is an error naming the rendezvous address, not a silent hang.
    """
    info = DistInfo.from_env()
    backend = cfg.backend if cfg.backend != "auto" else ("nccl" if info.device.type == "cuda" else "gloo")
    if info.device.type == "cuda":
        torch.cuda.set_device(info.device)
    ds = _deepspeed()
    import torch.distributed as dist

    if not dist.is_initialized():
        where = f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}"
        log.info("rank %d: waiting for %d ranks at %s (%s, up to %d s)", info.rank, info.world_size, where, backend, cfg.timeout_s)
        try:
            ds.init_distributed(
                dist_backend=backend, auto_mpi_discovery=False, verbose=False, timeout=timedelta(seconds=cfg.timeout_s)
            )
        except Exception as e:  # torch raises DistStoreError/RuntimeError subclasses on a time-out
            raise RendezvousError(
                f"rank {info.rank}: the process group of {info.world_size} ranks at {where} did not form "
                f"within dist.timeout_s={cfg.timeout_s} s: {e}"
            ) from e
    return info


class RendezvousError(RuntimeError):
    """The ranks did not all join the process group in time."""


def shutdown() -> None:
    """Tear the process group down before exit (avoids aborts in gloo/NCCL destructors at exit)."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()


def all_reduce_(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}[op])
    return tensor


def all_gather_1d(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate a 1-D tensor of any length from every rank, in rank order."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return tensor
    sizes = [torch.zeros(1, dtype=torch.long, device=tensor.device) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, torch.tensor([tensor.numel()], device=tensor.device))
    max_size = int(max(s.item() for s in sizes))
    padded = torch.zeros(max_size, dtype=tensor.dtype, device=tensor.device)
    padded[: tensor.numel()] = tensor
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([p[: int(s.item())] for p, s in zip(parts, sizes, strict=True)])


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


def lr_lambda(optim: OptimConfig, max_steps: int):
    """Multiplier of the peak LR at optimizer step s: linear warmup, then cosine/linear/constant decay."""
    warmup, floor = optim.warmup_steps, optim.min_lr_ratio

    def fn(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if optim.decay == "constant" or max_steps <= warmup:
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
        shape = 0.5 * (1 + math.cos(math.pi * progress)) if optim.decay == "cosine" else 1 - progress
        return floor + (1 - floor) * shape

    return fn


class Engine:
    """The DeepSpeed engine with the few verbs the trainer uses."""

    def __init__(self, ds_engine: Any, info: DistInfo, precision: str, ds_config: dict, tables: Any = None) -> None:
        self.ds = ds_engine
        self.info = info
        self.precision = precision
        self.ds_config = ds_config
        self.tables = tables  # seqrec.tables.ShardedTables, or None when the model owns its tables

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
        self.ds.step()

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
        return client or {}


def param_groups(model: torch.nn.Module, optim: OptimConfig) -> list[dict[str, Any]]:
    """Embedding table, dense matrices (decayed) and norms/biases/scales (not decayed), each its own group."""
    emb, dense, no_decay = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name.startswith("embeddings.") and p.dim() == 2:
            emb.append(p)
        elif p.dim() >= 2:
            dense.append(p)
        else:
            no_decay.append(p)
    groups = [
        {"params": emb, "lr": optim.embedding_lr, "weight_decay": optim.embedding_weight_decay, "name": "embedding"},
        {"params": dense, "lr": optim.lr, "weight_decay": optim.weight_decay, "name": "dense"},
        {"params": no_decay, "lr": optim.lr, "weight_decay": 0.0, "name": "no_decay"},
    ]
    return [g for g in groups if g["params"]]


def build_engine(
    model: torch.nn.Module,
    info: DistInfo,
    *,
    train: TrainConfig,
    optim: OptimConfig,
    dist: DistConfig,
    embeddings: EmbeddingsConfig | None = None,
) -> Engine:
    """Wrap `model` in a DeepSpeed engine with an AdamW client optimizer and the LR schedule.

    A model whose id tables live outside it (`model.embeddings is None`: embeddings.backend =
    "torchrec") gets them here, as sharded TorchRec tables (seqrec.tables) fed to its forward.
    """
    ds = _deepspeed()
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
    optimizer = torch.optim.AdamW(param_groups(model, optim), betas=(optim.beta1, optim.beta2), eps=1e-8)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(optim, train.max_steps))
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
    return Engine(ds_engine, info, precision, ds_config, tables)
