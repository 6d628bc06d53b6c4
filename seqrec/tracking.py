"""Experiment tracking: `metrics.jsonl` always, W&B on rank 0 (online with a key, offline without).

Non-zero ranks get a `NullTracker` (nanochat `DummyWandb`). wandb is imported lazily
(torchtitan `WandBLogger`). W&B identity (entity, project, key) comes from `WANDB_*` environment
variables, set in k8s/ from a Secret, never from TOML. A resumed run continues the same W&B run:
its id is kept in `<run_dir>/wandb_run_id`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import secrets
import time
from pathlib import Path
from typing import Any, Protocol

from seqrec.config import TrackingConfig

log = logging.getLogger(__name__)


class Tracker(Protocol):
    def log(self, metrics: dict[str, float], step: int) -> None: ...
    def summary(self, values: dict[str, Any]) -> None: ...
    def close(self) -> None: ...

    @property
    def location(self) -> str: ...


class NullTracker:
    location = "none"

    def log(self, metrics: dict[str, float], step: int) -> None:
        pass

    def summary(self, values: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


def _clean(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()}


class JsonlTracker:
    """Appends one JSON object per log call to `<run_dir>/metrics.jsonl`."""

    def __init__(self, run_dir: str | Path) -> None:
        self.path = Path(run_dir) / "metrics.jsonl"
        self.file = self.path.open("a", buffering=1)

    @property
    def location(self) -> str:
        return str(self.path)

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.file.write(json.dumps({"step": step, "time": round(time.time(), 3), **_clean(metrics)}) + "\n")

    def summary(self, values: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        self.file.close()


def wandb_mode(cfg: TrackingConfig) -> str:
    if cfg.wandb != "auto":
        return cfg.wandb
    if os.environ.get("WANDB_MODE") in ("online", "offline", "disabled"):
        return os.environ["WANDB_MODE"]
    return "online" if os.environ.get("WANDB_API_KEY") else "offline"


class WandbTracker:
    def __init__(self, cfg: TrackingConfig, run_dir: str | Path, name: str, config: dict[str, Any]) -> None:
        import wandb

        run_dir = Path(run_dir)
        id_file = run_dir / "wandb_run_id"
        run_id = id_file.read_text().strip() if id_file.is_file() else secrets.token_hex(4)
        id_file.write_text(run_id + "\n")
        self.mode = wandb_mode(cfg)
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", cfg.project),
            name=name,
            id=run_id,
            resume="allow",
            dir=str(run_dir),
            mode=self.mode,
            config=config,
            settings=wandb.Settings(silent=True, console="off"),
        )

    @property
    def location(self) -> str:
        if self.mode == "offline":
            return f"{self.run.dir.rsplit('/files', 1)[0]} (offline: `wandb sync` it to upload)"
        return str(getattr(self.run, "url", "") or self.run.dir)

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(_clean(metrics), step=step)

    def summary(self, values: dict[str, Any]) -> None:
        for k, v in values.items():
            self.run.summary[k] = v

    def close(self) -> None:
        self.run.finish()


class Trackers:
    """Fan-out to several trackers."""

    def __init__(self, *trackers: Any) -> None:
        self.trackers = trackers

    @property
    def location(self) -> str:
        return "; ".join(t.location for t in self.trackers)

    @property
    def wandb_location(self) -> str:
        for t in self.trackers:
            if isinstance(t, WandbTracker):
                return t.location
        return "disabled"

    def log(self, metrics: dict[str, float], step: int) -> None:
        for t in self.trackers:
            t.log(metrics, step)

    def summary(self, values: dict[str, Any]) -> None:
        for t in self.trackers:
            t.summary(values)

    def close(self) -> None:
        for t in self.trackers:
            t.close()


def build_tracker(cfg: TrackingConfig, *, run_dir: str | Path, name: str, config: dict[str, Any], is_main: bool) -> Trackers:
    """metrics.jsonl + W&B on rank 0; nothing on other ranks."""
    if not is_main:
        return Trackers(NullTracker())
    trackers: list[Any] = [JsonlTracker(run_dir)]
    if wandb_mode(cfg) != "disabled":
        trackers.append(WandbTracker(cfg, run_dir, name, config))
    return Trackers(*trackers)
