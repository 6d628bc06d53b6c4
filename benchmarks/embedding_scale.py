"""Embedding scale: training step time, sequences/s and peak RSS per rank against the catalogue size,
for the sharded TorchRec tables (embeddings.backend = "torchrec") and the dense fused table
("dense", where it fits), plus the FLOP rate of sharded full-ranking evaluation.

Every row is a fresh 2-rank torchrun launch of this file's worker on synthetic batches (uniform
item ids: the most distinct rows per step), the real model and engine (DeepSpeed ZeRO-0, fp32),
sampled softmax with shared negatives, fixed batch and width across rows. The first steps (warm-up)
are dropped; step time is the median of the rest. RSS is the peak resident set of each rank.

    .venv/bin/python benchmarks/embedding_scale.py                          # 10k, 1M, 10M (+ dense)
    .venv/bin/python benchmarks/embedding_scale.py --items 10000 50000000 --dense-max 1000000
    .venv/bin/python benchmarks/embedding_scale.py --eval-users 100000 --eval-items 1000000
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from statistics import median

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import env, hardware, table, write  # noqa: E402

FP32_CEILING_GFLOPS = 175.0  # this CPU's fp32 matmul ceiling, 2 threads (DEPENDENCIES.md)


def _sets(args: argparse.Namespace, backend: str) -> list[str]:
    micro = args.batch // 2
    return [
        f"embeddings.backend='{backend}'",
        f"embeddings.dim={args.dim}",
        "embeddings.use_item_features=false",
        "embeddings.use_actions=false",
        "embeddings.use_time_gaps=false",
        f"model.d_model={args.dim}",
        "model.num_layers=2",
        "model.num_heads=2",
        "model.dropout=0.1",
        "loss.kind='sampled'",
        f"loss.num_negatives={args.negatives}",
        f"train.micro_batch_size={micro}",
        f"train.global_batch_size={args.batch}",
        "dist.zero_stage=0",
        "train.precision='fp32'",
        "tracking.wandb='disabled'",
    ]


# ------------------------------------------------------------------------------------------- worker
def worker(args: argparse.Namespace) -> None:
    import torch

    from seqrec.config import load_config
    from seqrec.data.spec import DataSpec
    from seqrec.engine import build_engine, init_distributed
    from seqrec.model import SeqRecModel
    from seqrec.optim import build_optimizer

    cfg = load_config(None, _sets(args, args.backend))
    info = init_distributed(cfg.dist)
    torch.manual_seed(0)
    V, L = args.num_items, args.max_len
    spec = DataSpec(max_len=L, num_items=V, event_features={}, item_features={}, item_feature_sizes={},
                    item_counts=torch.ones(V, dtype=torch.long))
    t0 = time.perf_counter()
    model = SeqRecModel(spec, cfg.model, cfg.embeddings, cfg.loss)
    model.init_weights()
    optimizer, scheduler = build_optimizer(model, cfg.optim, cfg.train.max_steps)
    engine = build_engine(model, info, train=cfg.train, optim=cfg.optim, dist=cfg.dist, embeddings=cfg.embeddings, optimizer=optimizer, scheduler=scheduler)
    build_s = time.perf_counter() - t0
    gen = torch.Generator().manual_seed(1 + info.rank)
    micro = cfg.train.micro_batch_size
    times = []
    for _ in range(args.steps):
        item = torch.randint(2, V, (micro, L + 1), generator=gen)
        batch = {"item": item, "ts": torch.zeros_like(item), "length": torch.full((micro,), L + 1)}
        t = time.perf_counter()
        out = engine.forward(batch)
        engine.backward(out["loss"])
        engine.step()
        times.append(time.perf_counter() - t)
    step_s = median(times[args.warmup:])
    _report(args, info.rank, {
        "backend": args.backend, "num_items": V, "step_s": step_s, "sequences_per_s": args.batch / step_s,
        "build_s": build_s, "loss": float(out["loss"]),
        "plan": engine.tables.plan["item"]["sharding"] if engine.tables is not None else "dense",
    })


def eval_worker(args: argparse.Namespace) -> None:
    import torch

    from seqrec.config import EmbeddingsConfig, load_config
    from seqrec.embeddings import TableSpec
    from seqrec.engine import init_distributed
    from seqrec.tables import ShardedTables, sharded_target_ranks

    info = init_distributed(load_config(None, []).dist)
    V, D = args.num_items, args.dim
    tables = ShardedTables([TableSpec("item", V)], EmbeddingsConfig(backend="torchrec", dim=D, sharding=["item=row_wise"]),
                           device=info.device, world_size=info.world_size, seed=0, grad_scale=1.0, multi_pooling="sum")
    shards = tables.local_shards("item")
    gen = torch.Generator().manual_seed(1 + info.rank)
    mine = args.eval_users // info.world_size
    t = time.perf_counter()
    done = 0
    while done < mine:
        n = min(args.eval_batch, mine - done)
        query = torch.randn(n, D, generator=gen)
        targets = torch.randint(2, V, (n,), generator=gen)
        history = torch.randint(2, V, (n, args.max_len), generator=gen)
        sharded_target_ranks(query, targets, history, shards, V)
        done += n
    seconds = time.perf_counter() - t
    flops = 2.0 * args.eval_users * V * D
    _report(args, info.rank, {"users": args.eval_users, "num_items": V, "seconds": seconds, "gflops": flops / seconds / 1e9})


def _report(args: argparse.Namespace, rank: int, row: dict) -> None:
    row["rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    Path(args.out).with_suffix(f".rank{rank}.json").write_text(json.dumps(row))


# ------------------------------------------------------------------------------------------- driver
def launch(args: argparse.Namespace, mode: str, backend: str, num_items: int) -> dict | None:
    out = Path(tempfile.mkdtemp(prefix="seqrec-embscale-")) / "row"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", __file__,
           "--worker", mode, "--backend", backend, "--num-items", str(num_items), "--out", str(out),
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--batch", str(args.batch),
           "--max-len", str(args.max_len), "--dim", str(args.dim), "--negatives", str(args.negatives),
           "--eval-users", str(args.eval_users), "--eval-batch", str(args.eval_batch)]
    t = time.perf_counter()
    proc = subprocess.run(cmd, env=env(1), capture_output=True, text=True, timeout=args.timeout)
    wall = time.perf_counter() - t
    ranks = [out.with_suffix(f".rank{r}.json") for r in range(2)]
    if proc.returncode != 0 or not all(p.is_file() for p in ranks):
        tail = (proc.stdout + proc.stderr)[-1500:]
        print(f"{mode} {backend} {num_items}: failed (rc {proc.returncode})\n{tail}", file=sys.stderr)
        return {"mode": mode, "backend": backend, "num_items": num_items, "error": tail[-300:], "rc": proc.returncode}
    rows = [json.loads(p.read_text()) for p in ranks]
    row = {"mode": mode, **rows[0], "rss_gib": max(r["rss_gib"] for r in rows), "wall_s": wall}
    if mode == "train":
        row["table_gib_per_rank"] = table_bytes(backend, num_items, args.dim) / 2 / 2**30
    return row


def table_bytes(backend: str, num_items: int, dim: int) -> float:
    """Table + optimizer state over all ranks: row-wise Adagrad 1 float per row; dense AdamW: weight,
    gradient and 2 moments per value, replicated on each of the 2 ranks (ZeRO-0)."""
    if backend == "torchrec":
        return 4.0 * num_items * (dim + 1)
    return 2 * 4.0 * num_items * dim * 4


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--items", type=int, nargs="+", default=[10_000, 1_000_000, 10_000_000])
    p.add_argument("--dense-max", type=int, default=1_000_000, help="largest catalogue for the dense path")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--batch", type=int, default=256, help="global batch (2 ranks x batch/2)")
    p.add_argument("--max-len", type=int, default=50)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--negatives", type=int, default=512)
    p.add_argument("--eval-users", type=int, default=100_000)
    p.add_argument("--eval-items", type=int, default=1_000_000, help="0: skip the evaluation row")
    p.add_argument("--eval-batch", type=int, default=2048, help="queries per rank per ranking call")
    p.add_argument("--timeout", type=int, default=1800)
    p.add_argument("--worker", choices=["train", "eval"], help=argparse.SUPPRESS)
    p.add_argument("--backend", default="torchrec", help=argparse.SUPPRESS)
    p.add_argument("--num-items", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--out", default="", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        (worker if args.worker == "train" else eval_worker)(args)
        return

    rows = []
    for n in args.items:
        for backend in ("torchrec", "dense"):
            if backend == "dense" and n > args.dense_max:
                continue
            rows.append(launch(args, "train", backend, n))
            print(table([r for r in rows if "error" not in r], ["backend", "num_items", "plan", "step_s", "sequences_per_s", "rss_gib", "table_gib_per_rank"]), flush=True)
    evals = []
    if args.eval_items:
        evals.append(launch(args, "eval", "torchrec", args.eval_items))
        for r in evals:
            if "gflops" in r:
                r["pct_of_fp32_ceiling"] = 100 * r["gflops"] / FP32_CEILING_GFLOPS
    sharded = {r["num_items"]: r for r in rows if r.get("backend") == "torchrec" and "step_s" in r}
    summary = {}
    if sharded:
        small, large = min(sharded), max(sharded)
        summary["step_time_ratio_largest_vs_smallest"] = sharded[large]["step_s"] / sharded[small]["step_s"]
    path = write("embedding_scale", {
        "config": {k: getattr(args, k) for k in ("steps", "warmup", "batch", "max_len", "dim", "negatives")},
        "hardware": hardware(), "train": rows, "eval": evals, "summary": summary,
    })
    print(table([r for r in rows if "error" not in r], ["backend", "num_items", "plan", "step_s", "sequences_per_s", "rss_gib", "table_gib_per_rank"]))
    if evals:
        print(table([r for r in evals if "error" not in r], ["users", "num_items", "seconds", "gflops", "pct_of_fp32_ceiling", "rss_gib"]))
    print(json.dumps(summary), "->", path)


if __name__ == "__main__":
    main()
