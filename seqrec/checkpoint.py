"""Checkpoint folders: `<run_dir>/checkpoints/step_{step:08d}/`, valid only once `COMPLETE` exists.

A checkpoint holds the DeepSpeed engine state (every rank's shard), the loop's client state (step,
epoch, loader position, config, schema version, vocabulary sizes, best metric), and one
`rank_NNNNN.pt` per rank with that rank's RNG states and loader position. `COMPLETE` is written by
rank 0 after a barrier, last; resume discovery only considers complete folders (torchtitan
`_find_load_step`). Keep-last-k never deletes the best checkpoint (`best.json` points at it).
"""

from __future__ import annotations

import json
import logging
import random
import re
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)

COMPLETE = "COMPLETE"
BEST = "best.json"
_TAG = re.compile(r"^step_(\d{8})$")


def checkpoint_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def step_of(path: Path) -> int:
    m = _TAG.match(path.name)
    if not m:
        raise ValueError(f"{path}: not a checkpoint folder (expected step_NNNNNNNN)")
    return int(m.group(1))


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoint folders, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _TAG.match(p.name) and (p / COMPLETE).is_file()]
    return sorted(found, key=step_of)


def latest(root: Path) -> Path | None:
    done = complete_checkpoints(root)
    return done[-1] if done else None


def best(root: Path) -> Path | None:
    marker = root / BEST
    if not marker.is_file():
        return None
    path = root / json.loads(marker.read_text())["tag"]
    return path if (path / COMPLETE).is_file() else None


def resolve(root: Path, which: str) -> Path:
    """'best', 'last'/'latest', or a folder path -> a complete checkpoint folder (FileNotFoundError otherwise)."""
    if which == "best":
        path = best(root) or latest(root)
    elif which in ("last", "latest"):
        path = latest(root)
    else:
        path = Path(which)
    if path is None or not (path / COMPLETE).is_file():
        raise FileNotFoundError(f"no complete checkpoint for '{which}' under {root}")
    return path


def client_state(folder: Path) -> dict[str, Any]:
    """The trainer's client state saved with a DeepSpeed checkpoint (config, loop, vocab sizes, ...)."""
    files = sorted(folder.glob("*mp_rank_00_model_states.pt"))
    if not files:
        raise FileNotFoundError(f"{folder}: no DeepSpeed model states file (*mp_rank_00_model_states.pt)")
    state = torch.load(files[0], map_location="cpu", weights_only=False)
    state.pop("module", None)
    return state


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def write_rank_state(folder: Path, rank: int, state: dict[str, Any]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(state, folder / f"rank_{rank:05d}.pt")


def read_rank_state(folder: Path, rank: int) -> dict[str, Any]:
    path = folder / f"rank_{rank:05d}.pt"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; was this checkpoint written with a different world size?")
    return torch.load(path, weights_only=False)


def mark_complete(folder: Path, step: int, extra: dict[str, Any] | None = None) -> None:
    """Rank 0, after every rank finished writing: the marker that makes the folder valid."""
    (folder / COMPLETE).write_text(json.dumps({"step": step, "time": time.time(), **(extra or {})}) + "\n")


def mark_best(root: Path, folder: Path, metric: str, value: float) -> None:
    tmp = root / (BEST + ".tmp")
    tmp.write_text(json.dumps({"tag": folder.name, "metric": metric, "value": value}) + "\n")
    tmp.replace(root / BEST)


def prune(root: Path, keep_last_k: int) -> list[Path]:
    """Delete complete checkpoints beyond the newest k (never the best) and stale incomplete ones."""
    done = complete_checkpoints(root)
    keep = set(done[-keep_last_k:])
    if (b := best(root)) is not None:
        keep.add(b)
    removed = [p for p in done if p not in keep]
    newest = step_of(done[-1]) if done else -1
    # An incomplete folder older than the newest complete one is a crash leftover.
    removed += [
        p for p in root.iterdir() if p.is_dir() and _TAG.match(p.name) and not (p / COMPLETE).exists() and step_of(p) < newest
    ]
    for p in removed:
        shutil.rmtree(p, ignore_errors=True)
    return removed
