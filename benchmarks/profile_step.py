"""Profile one training step per op (torch.profiler) and report useful FLOP/s against this CPU's ceiling.

Builds the real model and DeepSpeed engine of a config in this process (a world of one), reads real
training batches from the config's shards (prepared first when missing), runs warm-up steps, then
profiles `--steps` steps for each precision. Useful FLOPs count the work a perfect implementation
must do for the counted (non-padding) tokens: 3 x the forward matmul FLOPs (forward + 2 for
backward) of the input/output projections, attention (causal: half of L x L) and the output layer
(the full softmax's [tokens, items] logits); padding and recomputation are not useful.

    .venv/bin/python benchmarks/profile_step.py --config configs/movielens-1m-seq.toml
    .venv/bin/python benchmarks/profile_step.py --config configs/demo.toml --precisions fp32 bf16 --steps 3
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from statistics import median

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import REPO, hardware, matmul_ceiling, prepare, table, write  # noqa: E402


def useful_flops(cfg, batch, num_items: int) -> float:
    """3 x forward matmul FLOPs of the counted tokens of one batch (see the module docstring)."""
    item = batch["item"]
    counted = int(((item[:, 1:] > 1) & (item[:, :-1] != 0)).sum())
    valid = (item[:, :-1] != 0).sum(1).double()
    d, e, layers = cfg.model.d_model, cfg.embeddings.dim, cfg.model.num_layers
    ffn = cfg.model.ffn_mult * d
    per_position = layers * (2 * 4 * d * d + 2 * 2 * d * ffn)  # q, k, v, o and the feed-forward
    attention = layers * 2 * 2 * d * float((valid * (valid + 1) / 2).sum())  # QK^T and AV, causal
    proj = 2 * 2 * e * d if e != d else 0
    if cfg.loss.kind == "full":
        output = 2 * e * num_items * counted
    else:
        output = 2 * e * (cfg.loss.num_negatives + 1) * counted
    forward = (per_position + proj) * float(valid.sum()) + attention + output
    return 3.0 * forward


def profile(cfg_path: str, precision: str, steps: int, warmup: int, threads: int, sets: list[str], top: int) -> dict:
    ceiling = matmul_ceiling("bf16" if precision == "bf16" else "fp32", threads)
    import torch
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from seqrec import recipe
    from seqrec.config import load_config
    from seqrec.data.loader import ShardLoader
    from seqrec.data.schema import read_manifest
    from seqrec.data.spec import DataSpec
    from seqrec.engine import build_engine, init_distributed
    from seqrec.model import SeqRecModel
    from seqrec.optim import build_optimizer

    torch.set_num_threads(threads)
    cfg = load_config(REPO / cfg_path, [f"train.precision='{precision}'", "tracking.wandb='disabled'", *sets])
    info = init_distributed(cfg.dist)
    manifest = read_manifest(REPO / cfg.data.path)
    recipe.resolve(cfg, manifest, world_size=1)  # the run's derived batch, length and dropout
    # One process does the whole global batch (no accumulation): the per-op profile of one step.
    cfg.train.micro_batch_size = cfg.train.global_batch_size
    spec = DataSpec.from_manifest(manifest)
    torch.manual_seed(0)
    model = SeqRecModel(spec, cfg.model, cfg.embeddings, cfg.loss)
    model.init_weights()
    optimizer, scheduler = build_optimizer(model, cfg.optim, cfg.train.max_steps)
    engine = build_engine(model, info, train=cfg.train, optim=cfg.optim, dist=cfg.dist, embeddings=cfg.embeddings, optimizer=optimizer, scheduler=scheduler)
    loader = ShardLoader(manifest, "train", dp_rank=0, dp_world_size=1, batch_size=cfg.train.micro_batch_size, seed=0,
                         global_batch_size=cfg.train.global_batch_size)

    def step(batch):
        out = engine.forward(batch)
        engine.backward(out["loss"])
        engine.step()
        return out

    times, flops = [], []
    with iter(loader) as batches:
        for _ in range(warmup):
            step(next(batches))
        for _ in range(steps):
            batch = next(batches)
            t = time.perf_counter()
            step(batch)
            times.append(time.perf_counter() - t)
            flops.append(useful_flops(cfg, batch, spec.num_items))
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            step(next(batches))
    step_s = median(times)
    gflops = median(f / t for f, t in zip(flops, times, strict=True)) / 1e9
    ops = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in ops) or 1
    top_ops = [
        {"op": e.key, "self_ms": e.self_cpu_time_total / 1e3, "pct": 100 * e.self_cpu_time_total / total, "calls": e.count}
        for e in ops[:top]
    ]
    return {
        "precision": precision, "threads": threads, "step_s": step_s,
        "sequences_per_s": cfg.train.global_batch_size / step_s, "useful_gflops": gflops,
        "ceiling_gflops": ceiling, "pct_of_ceiling": 100 * gflops / ceiling, "ops": top_ops,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/movielens-1m-seq.toml")
    p.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--top", type=int, default=15)
    p.add_argument("--tag", default="", help="suffix of the result file (e.g. before / after)")
    p.add_argument("--set", dest="sets", action="append", default=[])
    args = p.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    from seqrec.config import load_config

    cfg = load_config(REPO / args.config, args.sets)
    if not (REPO / cfg.data.path / "manifest.json").is_file():
        prepare(args.config, args.sets)
    rows = [profile(args.config, prec, args.steps, args.warmup, args.threads, args.sets, args.top) for prec in args.precisions]
    name = "profile_step" + (f"_{args.tag}" if args.tag else "")
    path = write(name, {"config": args.config, "sets": args.sets, "hardware": hardware(), "rows": rows})
    print(table(rows, ["precision", "threads", "step_s", "sequences_per_s", "useful_gflops", "ceiling_gflops", "pct_of_ceiling"]))
    for r in rows:
        print(f"\n{r['precision']}: top ops by self CPU time")
        print(table(r["ops"], ["op", "self_ms", "pct", "calls"]))
    print("->", path)


if __name__ == "__main__":
    main()
