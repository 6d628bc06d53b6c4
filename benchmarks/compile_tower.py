"""Does torch.compile pay for the transformer tower? Eager against `torch.compile(dynamic=True)` on the
blocks of the ML-1M model (d_model 64, 2 blocks, 2 heads, dropout 0.1), forward + backward over the
widths that length groups produce (40, 92, 150, 200 positions x 32 rows, padded rows masked).
Reports the first pass (compilation included) and the best of `--repeats` steady passes, both in the
same run; writes results/compile_tower.json.

    .venv/bin/python benchmarks/compile_tower.py
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import hardware, table, write  # noqa: E402

WIDTHS = (40, 92, 150, 200)


def measure(fn, inputs, repeats: int) -> tuple[float, float]:
    t0 = time.perf_counter()
    for x, mask in inputs:
        fn(x, mask).sum().backward()
    first = time.perf_counter() - t0
    steady = []
    for _ in range(repeats):
        t = time.perf_counter()
        for x, mask in inputs:
            fn(x, mask).sum().backward()
        steady.append(time.perf_counter() - t)
    return first, min(steady)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=6)
    args = p.parse_args()
    import torch

    from seqrec.config import ModelConfig
    from seqrec.model import Block, attention_mask

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = ModelConfig(d_model=64, num_layers=2, num_heads=2, dropout=0.1)
    blocks = torch.nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))

    def tower(x, mask):
        for block in blocks:
            x = block(x, mask)
        return x

    inputs = []
    for w in WIDTHS:
        lengths = torch.randint(1, w + 1, (32,))
        valid = torch.arange(w).unsqueeze(0) >= w - lengths.unsqueeze(1)
        inputs.append((torch.randn(32, w, cfg.d_model, requires_grad=True), attention_mask(valid)))
    rows = []
    for name, fn in (("eager", tower), ("compiled", torch.compile(tower, dynamic=True))):
        first, steady = measure(fn, inputs, args.repeats)
        rows.append({"mode": name, "first_pass_s": first, "steady_ms": 1000 * steady})
    path = write("compile_tower", {"widths": WIDTHS, "threads": args.threads, "hardware": hardware(), "rows": rows})
    print(table(rows, ["mode", "first_pass_s", "steady_ms"]))
    print("->", path)


if __name__ == "__main__":
    main()
