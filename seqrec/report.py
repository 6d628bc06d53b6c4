"""The results table printed at the end of a run (`seqrec summary`, `make demo`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from seqrec.data.errors import SchemaError

ROWS = ("ndcg@10", "hr@10", "hr@50", "mrr")


def load_results(run_dir: str | Path) -> dict[str, Any]:
    path = Path(run_dir) / "results.json"
    if not path.is_file():
        raise SchemaError(f"{path}: no results yet (has `seqrec train` finished for this run folder?)")
    return json.loads(path.read_text())


def format_summary(r: dict[str, Any]) -> str:
    model, pop = r["test"], r["popularity"]["test"]
    lines = [
        f"dataset {r['dataset']}: {r['protocol']} ({int(model.get('count', 0))} test users)",
        f"{'test metric':<14}{'model':>10}{'popularity':>12}{'ratio':>8}",
    ]
    for key in ROWS:
        if key in model and key in pop:
            ratio = model[key] / pop[key] if pop[key] else float("inf")
            lines.append(f"{key + '_full':<14}{model[key]:>10.4f}{pop[key]:>12.4f}{ratio:>7.1f}x")
    t = r["train"]
    lines += [
        f"best validation step {r['best_step']} ({r['model']['params']:,} params, {r['model']['precision']}, "
        f"ZeRO-{r['model']['zero_stage']}, {r['hardware']['world_size']} x {r['hardware']['device']})",
        f"training: {t['steps']} steps in {t['seconds']:.0f} s, {t['sequences_per_s']:,.0f} sequences/s, "
        f"{t['tokens_per_s']:,.0f} tokens/s",
        f"run folder: {r['run_dir']}",
        f"W&B: {r['wandb']}",
    ]
    return "\n".join(lines)


def print_summary(run_dir: str | Path) -> None:
    print(format_summary(load_results(run_dir)))
