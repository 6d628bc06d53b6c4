"""Per-rank functions for the multi-process tests (module level so the spawn start method can pickle them)."""

from __future__ import annotations

import os
from typing import Any

import torch


def tiny_config(data: str, run_dir: str, **overrides: Any):
    """A tiny RunConfig for tests: 2 layers, d_model 16, no dropout, W&B off."""
    from seqrec.config import load_config

    sets = {
        "data.path": data,
        "run_dir": run_dir,
        "model.d_model": 16,
        "model.num_heads": 2,
        "model.num_layers": 2,
        "model.dropout": 0.0,
        "embeddings.dim": 16,
        "tracking.wandb": "disabled",
        "optim.warmup_steps": 2,
        "optim.lr": 0.01,
        "optim.embedding_lr": 0.01,
        "train.log_every": 2,
        "dist.timeout_s": 300,  # a collective out of step fails the test in minutes, not half an hour
        **overrides,
    }
    return load_config(None, [f"{k}={v!r}" if isinstance(v, str) else f"{k}={_toml(v)}" for k, v in sets.items()])


def _toml(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, list):
        return "[" + ", ".join(_toml(x) for x in v) + "]"
    return str(v)


def _train_rows(data: str, n: int) -> dict[str, torch.Tensor]:
    """The first n training rows, in file order, as a batch."""
    import numpy as np
    import pyarrow.parquet as pq

    from seqrec.data.schema import read_manifest

    m = read_manifest(data)
    table = pq.read_table([m.path(f.path) for f in m.files("train")][0]).slice(0, n)
    return {
        c: torch.from_numpy(np.stack(table.column(c).to_numpy(zero_copy_only=False)).astype(np.int64))
        if c != "length"
        else torch.from_numpy(table.column(c).to_numpy().astype(np.int64))
        for c in table.column_names
        if c != "user"
    }


def full_params(module: torch.nn.Module, zero_stage: int) -> dict[str, torch.Tensor]:
    """Every parameter's full value (gathered under ZeRO-3)."""
    if zero_stage == 3:
        import deepspeed

        params = list(module.parameters())
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            return {n: p.detach().float().cpu().clone() for n, p in module.named_parameters()}
    return {n: p.detach().float().cpu().clone() for n, p in module.named_parameters()}


def equivalence_worker(data: str, run_dir: str, zero_stage: int, micro: int, steps: int) -> dict[str, Any]:
    """Train `steps` optimizer steps on fixed global batches of 2 x micro rows.

    World 2: rank r takes rows [r*micro, (r+1)*micro) of each global batch, no accumulation.
    World 1: the same two halves one after the other with gradient accumulation 2.
    """
    from seqrec.data.schema import read_manifest
    from seqrec.engine import build_engine, init_distributed
    from seqrec.optim import build_optimizer
    from seqrec.data.spec import DataSpec
    from seqrec.model import SeqRecModel

    world = int(os.environ["WORLD_SIZE"])
    cfg = tiny_config(data, run_dir, **{"dist.zero_stage": zero_stage, "train.micro_batch_size": micro,
                                        "train.global_batch_size": 2 * micro, "train.max_steps": steps})
    info = init_distributed(cfg.dist)
    torch.manual_seed(0)
    model = SeqRecModel(DataSpec.from_manifest(read_manifest(data)), cfg.model, cfg.embeddings, cfg.loss)
    model.init_weights()
    optimizer, scheduler = build_optimizer(model, cfg.optim, cfg.train.max_steps)
    engine = build_engine(model, info, train=cfg.train, optim=cfg.optim, dist=cfg.dist, optimizer=optimizer, scheduler=scheduler)
    initial = full_params(engine.module, zero_stage)
    rows = _train_rows(data, 2 * micro * steps)
    losses = []
    for step in range(steps):
        base = step * 2 * micro
        halves = [{k: v[base + h * micro: base + (h + 1) * micro] for k, v in rows.items()} for h in range(2)]
        mine = halves if world == 1 else [halves[info.rank]]
        step_losses = []
        for batch in mine:
            out = engine.forward(batch)
            engine.backward(out["loss"])
            engine.step()
            step_losses.append(out["loss"].detach())
        loss = torch.stack(step_losses).mean()
        if world > 1:
            torch.distributed.all_reduce(loss)
            loss /= world
        losses.append(float(loss))
    return {"losses": losses, "params": full_params(engine.module, zero_stage), "initial": initial}


def equivalence_all_stages(data: str, run_dir: str, stages: list[int], micro: int, steps: int) -> dict[str, Any]:
    """equivalence_worker for several ZeRO stages in one process group (one launch: faster tests),
    plus the ZeRO-3 partition report on 2 ranks."""
    out: dict[str, Any] = {s: equivalence_worker(data, f"{run_dir}/z{s}", s, micro, steps) for s in stages}
    if int(os.environ["WORLD_SIZE"]) == 2:
        out["partition"] = zero3_partition_worker(data, f"{run_dir}/partition")
    return out


def zero3_partition_worker(data: str, run_dir: str) -> dict[str, int]:
    """Build the engine under ZeRO-3 and report how much of the fused table this rank holds."""
    from seqrec.data.schema import read_manifest
    from seqrec.engine import build_engine, init_distributed
    from seqrec.optim import build_optimizer
    from seqrec.data.spec import DataSpec
    from seqrec.model import SeqRecModel

    cfg = tiny_config(data, run_dir, **{"dist.zero_stage": 3, "train.micro_batch_size": 4, "train.global_batch_size": 8})
    info = init_distributed(cfg.dist)
    model = SeqRecModel(DataSpec.from_manifest(read_manifest(data)), cfg.model, cfg.embeddings, cfg.loss)
    model.init_weights()
    full = model.embeddings.weight.numel()
    optimizer, scheduler = build_optimizer(model, cfg.optim, cfg.train.max_steps)
    engine = build_engine(model, info, train=cfg.train, optim=cfg.optim, dist=cfg.dist, optimizer=optimizer, scheduler=scheduler)
    weight = engine.module.embeddings.weight
    out = engine.forward(_train_rows(data, 4))  # a forward still works on the partitioned table
    return {"full": full, "ds_numel": int(weight.ds_numel), "local": int(weight.ds_tensor.numel()),
            "visible": int(weight.numel()), "loss_finite": bool(torch.isfinite(out["loss"]))}


def train_worker(cfg_sets: dict[str, Any]) -> dict[str, Any] | None:
    """The real `seqrec train` entry point on this rank."""
    from seqrec.data.loader import live_threads
    from seqrec.train import train

    cfg = tiny_config(**cfg_sets)
    result = train(cfg)
    # A prefetch thread alive past the run is what aborted finished runs at exit (loader.Batches).
    assert not live_threads(), f"loader threads outlived train(): {live_threads()}"
    return result


def diverging_train_worker(cfg_sets: dict[str, Any], nan_from_step: int) -> str:
    """Train with the loss turned into NaN from `nan_from_step` on; return the error message."""
    from seqrec import train as train_mod

    original = train_mod.Trainer.train_step

    def poisoned(self, batches):
        out = original(self, batches)
        if self.step + 1 >= nan_from_step:
            out["loss"] = out["loss"] * float("nan")
        return out

    train_mod.Trainer.train_step = poisoned
    try:
        train_mod.train(tiny_config(**cfg_sets))
    except train_mod.TrainingDiverged as e:
        return str(e)
    return "no error"


# ------------------------------------------------------------------------------ sharded TorchRec tables
def full_length_sequences(num_users: int, num_items: int, length: int) -> list[list[int]]:
    """Histories long enough that every training row is a full window (the same number of counted
    labels in every row, so a mean over 2m rows equals the mean of two halves' means)."""
    return [[2 + (7 * u + 3 * k + (k * k) % 5) % (num_items - 2) for k in range(length)] for u in range(num_users)]


def local_table_shards(tables) -> dict[str, list[tuple[int, torch.Tensor]]]:
    return {t.name: [(s.start, s.rows.detach().float().cpu().clone()) for s in tables.local_shards(t.name)] for t in tables.specs}


def tables_equivalence_worker(data: str, run_dir: str, micro: int, steps: int, optimizer: str) -> dict[str, Any]:
    """Train `steps` steps with sharded tables on fixed global batches of 2 x micro rows.

    World 2: rank r takes rows [r*micro, (r+1)*micro) of each global batch. World 1: all 2 x micro
    rows in one micro batch (the fused table update runs once per micro batch, so no accumulation).
    """
    from seqrec.data.schema import read_manifest
    from seqrec.engine import build_engine, init_distributed
    from seqrec.optim import build_optimizer
    from seqrec.data.spec import DataSpec
    from seqrec.model import SeqRecModel

    world = int(os.environ["WORLD_SIZE"])
    cfg = tiny_config(data, run_dir, **{
        "embeddings.backend": "torchrec", "embeddings.table_optimizer": optimizer, "embeddings.table_lr": 0.05,
        "train.micro_batch_size": 2 * micro // world, "train.global_batch_size": 2 * micro, "train.max_steps": steps,
    })
    info = init_distributed(cfg.dist)
    torch.manual_seed(0)
    model = SeqRecModel(DataSpec.from_manifest(read_manifest(data)), cfg.model, cfg.embeddings, cfg.loss)
    model.init_weights()
    optimizer, scheduler = build_optimizer(model, cfg.optim, cfg.train.max_steps)
    engine = build_engine(model, info, train=cfg.train, optim=cfg.optim, dist=cfg.dist, embeddings=cfg.embeddings, optimizer=optimizer, scheduler=scheduler)
    initial = local_table_shards(engine.tables)
    rows = _train_rows(data, 2 * micro * steps)
    losses = []
    for step in range(steps):
        base = step * 2 * micro
        mine = slice(base + info.rank * (2 * micro // world), base + (info.rank + 1) * (2 * micro // world))
        out = engine.forward({k: v[mine] for k, v in rows.items()})
        engine.backward(out["loss"])
        engine.step()
        loss = out["loss"].detach().clone()
        if world > 1:
            torch.distributed.all_reduce(loss)
            loss /= world
        losses.append(float(loss))
    return {"losses": losses, "params": full_params(engine.module, 0), "tables": local_table_shards(engine.tables),
            "initial": initial, "plan": engine.tables.plan}


def table_update_worker(optimizer: str, lrs: list[float]) -> dict[str, Any]:
    """Look ids up in sharded tables, backward sum(rows * R), once per learning rate in `lrs` (set
    with `set_lr` before the step, as the engine's schedule does); return the shards.

    Every rank draws all ranks' ids and R from one seeded generator and uses its own slice, so the
    test can replay the whole computation."""
    import torch.distributed as dist

    from seqrec.config import EmbeddingsConfig
    from seqrec.engine import init_distributed
    from seqrec.tables import ShardedTables

    cfg = tiny_config("unused", "unused")
    info = init_distributed(cfg.dist)
    world = info.world_size
    specs = update_specs()
    emb = EmbeddingsConfig(backend="torchrec", dim=4, table_optimizer=optimizer, table_lr=lrs[0], table_eps=1e-8)
    tables = ShardedTables(specs, emb, device=info.device, world_size=world, seed=11, grad_scale=1.0,
                           multi_pooling="sum")
    for step, lr in enumerate(lrs):
        tables.set_lr(lr)
        ids, weights = update_inputs(step, world)
        mine = {k: v[info.rank] for k, v in ids.items()}
        rows = tables(mine)
        loss = sum((rows[k] * weights[k][info.rank]).sum() for k in rows)
        loss.backward()
    dist.barrier()
    return {"tables": local_table_shards(tables), "plan": tables.plan}


def update_specs():
    from seqrec.embeddings import TableSpec

    return [TableSpec("item", 23, aliases=("item_label",)), TableSpec("genre", 9, multi_valued=True), TableSpec("position", 5)]


def update_inputs(step: int, world: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """ids [world, ...] per feature (repeated ids on purpose) and the loss weights of their rows."""
    gen = torch.Generator().manual_seed(100 + step)
    ids = {
        "item": torch.randint(0, 23, (world, 6), generator=gen),
        "item_label": torch.randint(0, 23, (world, 3), generator=gen),
        "genre": torch.randint(0, 9, (world, 2, 3), generator=gen),
        "position": torch.arange(5).repeat(world, 1),
    }
    out_shape = {"item": (6,), "item_label": (3,), "genre": (2,), "position": (5,)}
    weights = {k: torch.randn(world, *out_shape[k], 4, generator=gen) for k in ids}
    return ids, weights


def sharded_ranks_worker(num_items: int, dim: int, per_rank: list[int], exclude_seen: bool) -> dict[str, Any]:
    """Freshly initialised sharded item table; rank r ranks per_rank[r] random queries and targets."""
    from seqrec.config import EmbeddingsConfig
    from seqrec.embeddings import TableSpec
    from seqrec.engine import init_distributed
    from seqrec.tables import ShardedTables, sharded_target_ranks, sharded_top_k

    info = init_distributed(tiny_config("unused", "unused").dist)
    emb = EmbeddingsConfig(backend="torchrec", dim=dim, sharding=["item=row_wise"])
    tables = ShardedTables([TableSpec("item", num_items)], emb, device=info.device, world_size=info.world_size,
                           seed=5, grad_scale=1.0, multi_pooling="sum")
    query, targets, history = ranking_inputs(info.rank, per_rank[info.rank], num_items, dim)
    ranks = sharded_target_ranks(query, targets, history if exclude_seen else None, tables.local_shards("item"), num_items)
    top = sharded_top_k(query, history if exclude_seen else None, tables.local_shards("item"), k=10)
    return {"ranks": ranks, "top": top, "shards": [(s.start, s.rows.shape[0]) for s in tables.local_shards("item")]}


def ranking_inputs(rank: int, n: int, num_items: int, dim: int):
    gen = torch.Generator().manual_seed(1000 + rank)
    query = torch.randn(n, dim, generator=gen)
    targets = torch.randint(2, num_items, (n,), generator=gen)
    history = torch.randint(0, num_items, (n, 7), generator=gen)
    history[:, 0] = targets  # the target in its own history stays a candidate
    return query, targets, history


def resumed_weights_worker(cfg_sets: dict[str, Any]) -> dict[str, Any]:
    """Build the trainer and resume (possibly on another world size); return what it loaded."""
    from seqrec.train import Trainer

    trainer = Trainer(tiny_config(**cfg_sets))
    trainer.resume()
    out = {"step": trainer.step, "loader": trainer.loader.state_dict(), "dense": full_params(trainer.engine.module, 0)}
    out["tables"] = local_table_shards(trainer.engine.tables) if trainer.engine.tables is not None else {}
    trainer.tracker.close()
    return out


def failing_train_worker(cfg_sets: dict[str, Any]) -> str:
    """Run `seqrec train` and return the message of the error it stops with."""
    from seqrec.train import train

    try:
        train(tiny_config(**cfg_sets))
    except Exception as e:  # the test asserts on the message
        return f"{type(e).__name__}: {e}"
    return "no error"
