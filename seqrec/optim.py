"""Optimizer policy, owned by the trainer: parameter groups, AdamW, and the learning-rate schedule.

The dense parameters are trained by DeepSpeed with a torch AdamW client optimizer (no op to compile
at run time) in three groups: the model's own id table (`optim.embedding_lr`, its own weight decay),
dense matrices (`optim.lr`, `optim.weight_decay`) and norms/biases/scales (no decay). One schedule
shape, linear warmup then cosine/linear/constant decay to `optim.min_lr_ratio` at the last step,
scales every group's peak rate; sharded TorchRec tables (seqrec.tables) follow the same shape from
their own peak `embeddings.table_lr` (the engine hands it to their fused optimizer every step).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from seqrec.config import OptimConfig


def lr_lambda(optim: OptimConfig, max_steps: int) -> Callable[[int], float]:
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


def build_optimizer(
    model: torch.nn.Module, optim: OptimConfig, max_steps: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over `param_groups` and the LambdaLR of `lr_lambda` (handed to the engine)."""
    optimizer = torch.optim.AdamW(param_groups(model, optim), betas=(optim.beta1, optim.beta2), eps=1e-8)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(optim, max_steps))
