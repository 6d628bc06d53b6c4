"""Process group and collectives: who this process is, the bounded rendezvous, and the few
collectives the trainer, the evaluation and the sharded tables use (gloo on CPU, NCCL on GPUs).

Nothing here imports DeepSpeed or writes the environment: the launcher (torchrun, the DeepSpeed
launcher, a PyTorchJob) provides RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT; a process
started without one is a world of one, joined over a free local port.
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch

from seqrec.config import DistConfig

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
        """From the launcher's RANK/WORLD_SIZE/LOCAL_RANK; a world of one when they are absent."""
        rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
        return cls(rank=rank, world_size=world, local_rank=local_rank, device=device)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


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


def init_process_group(cfg: DistConfig, info: DistInfo) -> None:
    """Create the process group (gloo on CPU, nccl on CUDA unless cfg.backend says otherwise).

    Waiting for the other ranks is bounded by `cfg.timeout_s` and announced on one line, so a
    missing rank is an error naming the rendezvous address, not a silent hang.
    """
    import torch.distributed as dist

    if dist.is_initialized():
        return
    backend = cfg.backend if cfg.backend != "auto" else ("nccl" if info.device.type == "cuda" else "gloo")
    if info.device.type == "cuda":
        torch.cuda.set_device(info.device)
    if "MASTER_ADDR" in os.environ:
        where, init_method = f"{os.environ['MASTER_ADDR']}:{os.environ.get('MASTER_PORT')}", "env://"
    else:  # no launcher: a world of one on a free local port
        where = f"127.0.0.1:{free_port()}"
        init_method = f"tcp://{where}"
    log.info("rank %d: waiting for %d ranks at %s (%s, up to %d s)", info.rank, info.world_size, where, backend, cfg.timeout_s)
    try:
        dist.init_process_group(
            backend=backend,
            init_method=init_method,
            rank=info.rank,
            world_size=info.world_size,
            timeout=timedelta(seconds=cfg.timeout_s),
        )
    except Exception as e:  # torch raises DistStoreError/RuntimeError subclasses on a time-out
        raise RendezvousError(
            f"rank {info.rank}: the process group of {info.world_size} ranks at {where} did not form "
            f"within dist.timeout_s={cfg.timeout_s} s: {e}"
        ) from e


def gather_rows(x: torch.Tensor, multi: bool) -> torch.Tensor:
    """Concatenate the rows of `x` [B, ...] of every rank in rank order (B and trailing widths may
    differ per rank: padded with 0 to the largest)."""
    if not multi:
        return x
    import torch.distributed as dist

    world = dist.get_world_size()
    shape = torch.tensor([x.shape[0], *(x.shape[1:])], dtype=torch.long, device=x.device)
    shapes = [torch.zeros_like(shape) for _ in range(world)]
    dist.all_gather(shapes, shape)
    top = torch.stack(shapes).max(0).values.tolist()
    padded = torch.zeros(top, dtype=x.dtype, device=x.device)
    padded[tuple(slice(0, n) for n in x.shape)] = x
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([p[tuple(slice(0, int(n)) for n in s.tolist())] for p, s in zip(parts, shapes, strict=True)])


def row_offset(rows: int, multi: bool, device: torch.device) -> int:
    """Index of this rank's first row in a rank-ordered concatenation of every rank's `rows`."""
    if not multi:
        return 0
    import torch.distributed as dist

    sizes = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, torch.tensor([rows], device=device))
    return int(sum(int(s) for s in sizes[: dist.get_rank()]))
