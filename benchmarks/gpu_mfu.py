"""Model FLOP/s and MFU of a large model on one GPU: the real model and DeepSpeed engine, bf16.

Builds `configs/gpu-large.toml` (d_model 512, 8 blocks, max_len 512, sampled softmax with 8,192
negatives) over a synthetic catalogue, feeds synthetic left-padded batches (history lengths drawn
uniformly from 1..max_len, or all full with --full-rows), runs warm-up steps, then times `--steps`
steps. Model FLOPs are those of the real (non-padding) tokens: 3 x the forward matmul FLOPs of
benchmarks/profile_step.py (projections, causal attention, the output layer); MFU divides the
achieved rate by the device's dense bf16 peak. Runs in well under 5 minutes; without a CUDA device
it prints why and exits 0, writing nothing.

    .venv/bin/python benchmarks/gpu_mfu.py
    .venv/bin/python benchmarks/gpu_mfu.py --full-rows --steps 20 --peak-tflops 989
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from statistics import median

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import REPO, hardware, table, write  # noqa: E402
from benchmarks.profile_step import useful_flops  # noqa: E402

# Dense bf16 peak TFLOP/s by device name fragment (vendor data sheets, without sparsity).
PEAK_BF16_TFLOPS = {"H200": 989.4, "H100 SXM": 989.4, "H100 NVL": 835.0, "H100 PCIe": 756.0, "H100": 989.4,
                    "A100": 312.0, "L40S": 362.1, "L4": 121.0, "A10G": 70.0}


def peak_tflops(name: str, override: float) -> float | None:
    if override:
        return override
    for fragment, peak in PEAK_BF16_TFLOPS.items():
        if fragment in name:
            return peak
    return None


def synthetic_batch(batch: int, max_len: int, num_items: int, full_rows: bool, gen) -> dict:
    import torch

    width = max_len + 1
    lengths = torch.full((batch,), width) if full_rows else torch.randint(2, width + 1, (batch,), generator=gen)
    real = torch.arange(width).unsqueeze(0) >= width - lengths.unsqueeze(1)
    item = torch.randint(2, num_items, (batch, width), generator=gen) * real
    ts = (1_700_000_000 + torch.randint(1, 3600, (batch, width), generator=gen).cumsum(1)) * real
    return {"item": item, "ts": ts, "length": lengths, "target": item[:, -1]}


def run(args: argparse.Namespace) -> dict:
    import torch

    from seqrec.config import load_config
    from seqrec.data.spec import DataSpec
    from seqrec.engine import build_engine, init_distributed
    from seqrec.model import SeqRecModel
    from seqrec.optim import build_optimizer

    cfg = load_config(REPO / args.config, ["tracking.wandb='disabled'", *args.sets])
    cfg.train.max_steps = args.warmup + args.steps
    info = init_distributed(cfg.dist)
    max_len = cfg.prepare.split.max_len
    spec = DataSpec(
        max_len=max_len, num_items=args.items, event_features={}, item_features={}, item_feature_sizes={},
        item_counts=torch.ones(args.items, dtype=torch.long),
    )
    torch.manual_seed(0)
    model = SeqRecModel(spec, cfg.model, cfg.embeddings, cfg.loss)
    model.init_weights()
    optimizer, scheduler = build_optimizer(model, cfg.optim, cfg.train.max_steps)
    engine = build_engine(model, info, train=cfg.train, optim=cfg.optim, dist=cfg.dist, embeddings=cfg.embeddings, optimizer=optimizer, scheduler=scheduler)
    gen = torch.Generator().manual_seed(1)
    batches = [synthetic_batch(cfg.train.micro_batch_size, max_len, args.items, args.full_rows, gen) for _ in range(4)]

    def step(batch: dict) -> None:
        out = engine.forward(batch)
        engine.backward(out["loss"])
        engine.step()

    cuda = info.device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    for i in range(args.warmup):
        step(batches[i % len(batches)])
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times, flops, tokens = [], [], []
    for i in range(args.steps):
        batch = batches[i % len(batches)]
        t = time.perf_counter()
        step(batch)
        sync()
        times.append(time.perf_counter() - t)
        flops.append(useful_flops(cfg, batch, args.items))
        tokens.append(int((batch["item"][:, :-1] != 0).sum()))
    name = torch.cuda.get_device_name(0) if cuda else "cpu"
    peak = peak_tflops(name, args.peak_tflops) if cuda else None
    tflops = median(f / t for f, t in zip(flops, times, strict=True)) / 1e12
    return {
        "device": name, "precision": engine.precision, "config": args.config, "items": args.items,
        "full_rows": args.full_rows, "micro_batch": cfg.train.micro_batch_size, "max_len": max_len,
        "params": model.num_params(), "step_s": median(times),
        "tokens_per_s": median(n / t for n, t in zip(tokens, times, strict=True)),
        "model_tflops": tflops, "peak_tflops": peak, "mfu_pct": 100 * tflops / peak if peak else None,
        "max_allocated_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/gpu-large.toml")
    p.add_argument("--items", type=int, default=1_000_000, help="catalogue size of the synthetic data")
    p.add_argument("--full-rows", action="store_true", help="every history max_len long (no padding)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--peak-tflops", type=float, default=0.0, help="the device's dense bf16 peak (default: by name)")
    p.add_argument("--tag", default="")
    p.add_argument("--output", default="", help="write the JSON here instead of benchmarks/results/gpu_mfu<tag>.json")
    p.add_argument("--cpu", action="store_true", help="run on the CPU anyway: a smoke test of the script, no MFU")
    p.add_argument("--set", dest="sets", action="append", default=[])
    args = p.parse_args()
    import torch

    if not torch.cuda.is_available() and not args.cpu:
        print("gpu_mfu: skipped, no CUDA device on this machine (nothing written)")
        return
    os.environ.setdefault("OMP_NUM_THREADS", "4")
    row = run(args)
    payload = {"hardware": hardware(), **row}
    if args.output:
        path = Path(args.output)
        path.write_text(json.dumps(payload, indent=2) + "\n")
    else:
        path = write("gpu_mfu" + args.tag, payload)
    print(table([row], ["device", "precision", "full_rows", "step_s", "tokens_per_s", "model_tflops", "peak_tflops",
                        "mfu_pct", "max_allocated_gib"]))
    print("->", path)


if __name__ == "__main__":
    main()
