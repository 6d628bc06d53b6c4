"""The trainer: build from config, then resume -> loop {step, log?, eval?, save?} -> test once.

Reads top to bottom like nanoGPT's train.py. Side effects (config dump, metrics, W&B, results) are
rank 0's; checkpoint saves and evaluation are collective and run on every rank. Model selection
uses the validation split only; the test split is scored once, with the best checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import platform
import resource
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from seqrec import checkpoint as ckpt
from seqrec import faults, recipe
from seqrec.config import RunConfig, TrainConfig, save_json, to_dict
from seqrec.data.loader import Batch, ShardLoader
from seqrec.data.schema import SCHEMA_VERSION, SPLITS, Manifest, SchemaError, read_manifest, verify_split
from seqrec.data.spec import DataSpec
from seqrec.distributed import all_reduce_, barrier
from seqrec.engine import Engine, build_engine, init_distributed
from seqrec.evaluate import by_scores, evaluate, named, popularity_scorer, protocol
from seqrec.model import SeqRecModel
from seqrec.optim import build_optimizer
from seqrec.tracking import build_tracker

log = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    """Loss or gradient norm became NaN/Inf; the last good checkpoint is kept."""


# ---------------------------------------------------------------------------------------------- cadence
def should_log(step: int, cfg: TrainConfig) -> bool:
    return step % cfg.log_every == 0 or step == cfg.max_steps


def should_eval(step: int, cfg: TrainConfig) -> bool:
    return step % cfg.eval_every == 0 or step == cfg.max_steps


def should_save(step: int, cfg: TrainConfig) -> bool:
    return step % cfg.save_every == 0 or step == cfg.max_steps


def vocab_sizes(manifest: Manifest) -> dict[str, int]:
    return {name: f.num_embeddings for name, f in manifest.features.items()}


def memory_metrics(device: torch.device) -> dict[str, float]:
    if device.type == "cuda":
        return {
            "mem/max_allocated_gib": torch.cuda.max_memory_allocated(device) / 2**30,
            "mem/max_reserved_gib": torch.cuda.max_memory_reserved(device) / 2**30,
        }
    return {"mem/max_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def hardware(device: torch.device, world_size: int) -> dict[str, Any]:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or platform.machine())
    return {"device": device.type, "name": name, "world_size": world_size, "torch": torch.__version__}


class Trainer:
    """Owns the engine, the loaders and the loop state (`step`, best validation metric)."""

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        self.info = init_distributed(cfg.dist)
        self.run_dir = Path(cfg.run_dir)
        self.ckpt_root = ckpt.checkpoint_root(self.run_dir)
        self.manifest = read_manifest(cfg.data.path)
        self.derived = recipe.resolve(cfg, self.manifest, self.info.world_size)  # unset fields, from the data
        for split in SPLITS:
            verify_split(self.manifest, split)
        self.spec = DataSpec.from_manifest(self.manifest)
        torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
        model = SeqRecModel(self.spec, cfg.model, cfg.embeddings, cfg.loss)
        model.init_weights()
        self.num_params = model.num_params()
        optimizer, scheduler = build_optimizer(model, cfg.optim, cfg.train.max_steps)
        self.engine: Engine = build_engine(
            model, self.info, train=cfg.train, optim=cfg.optim, dist=cfg.dist, embeddings=cfg.embeddings,
            optimizer=optimizer, scheduler=scheduler,
        )
        torch.manual_seed(cfg.train.seed + 1 + self.info.rank)  # per-rank dropout and negative sampling
        self.loader = ShardLoader(
            self.manifest,
            "train",
            dp_rank=self.info.rank,
            dp_world_size=self.info.world_size,
            batch_size=cfg.train.micro_batch_size,
            seed=cfg.train.seed,
            shuffle=cfg.data.shuffle,
            prefetch_batches=cfg.data.prefetch_batches,
            global_batch_size=cfg.train.global_batch_size,
            virtual_shards=cfg.data.virtual_shards,
        )
        self.step = 0
        self.best: dict[str, Any] = {"step": None, "value": -math.inf, "metrics": {}}
        self.evals_since_best = 0
        self.last_saved_step = -1
        self.window = _Window()
        self.train_seconds = 0.0
        self.samples_seen = 0
        self.tokens_seen = 0
        if self.info.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_json(cfg, self.run_dir / "config.json")
        self.trace = _SampleTrace(self.run_dir, self.info.rank) if cfg.train.trace_samples else None
        self.tracker = build_tracker(
            cfg.tracking, run_dir=self.run_dir, name=cfg.name, config=to_dict(cfg), is_main=self.info.is_main
        )

    # ------------------------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Loop state only (torchtitan): everything else is in the engine or derivable."""
        return {
            "step": self.step,
            "best": self.best,
            "evals_since_best": self.evals_since_best,
            "train_seconds": self.train_seconds,
            "samples_seen": self.samples_seen,
            "tokens_seen": self.tokens_seen,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.best = state["best"]
        self.evals_since_best = int(state["evals_since_best"])
        self.train_seconds = float(state["train_seconds"])
        self.samples_seen = int(state["samples_seen"])
        self.tokens_seen = int(state["tokens_seen"])

    def save(self) -> Path:
        """Collective save; COMPLETE is written last by rank 0, after every rank finished."""
        tag = ckpt.tag_for(self.step)
        self.flush_window()
        client = {
            "loop": self.state_dict(),
            "loader": self.loader.state_dict(),
            "config": to_dict(self.cfg),
            "schema_version": SCHEMA_VERSION,
            "vocab_sizes": vocab_sizes(self.manifest),
            "world_size": self.info.world_size,
            "precision": self.engine.precision,
        }
        self.engine.save(self.ckpt_root, tag, client)
        self.last_saved_step = self.step
        folder = self.ckpt_root / tag
        ckpt.write_rank_state(folder, self.info.rank, {"rng": ckpt.rng_state(), "loader": self.loader.state_dict()})
        faults.point("checkpoint", self.step)
        barrier()
        if self.info.is_main:
            ckpt.mark_complete(folder, self.step)
            ckpt.prune(self.ckpt_root, self.cfg.checkpoint.keep_last_k)
        barrier()
        log.info("saved checkpoint %s", folder)
        return folder

    def check_compatible(self, folder: Path, client: dict[str, Any]) -> None:
        if client.get("schema_version") != SCHEMA_VERSION:
            raise SchemaError(f"{folder}: checkpoint schema_version {client.get('schema_version')} != {SCHEMA_VERSION}")
        saved, now = client.get("vocab_sizes", {}), vocab_sizes(self.manifest)
        if saved != now:
            diff = {k: (saved.get(k), now.get(k)) for k in set(saved) | set(now) if saved.get(k) != now.get(k)}
            raise SchemaError(
                f"{folder}: checkpoint vocabulary sizes differ from {self.manifest.manifest_path} "
                f"(feature: (checkpoint, data)) {diff}; reuse the vocabulary with prepare.reuse_vocab"
            )

    def resume(self) -> None:
        which = self.cfg.checkpoint.resume
        if which == "never":
            return
        folder = ckpt.latest(self.ckpt_root) if which == "auto" else Path(which)
        if folder is None:
            return
        if not (folder / ckpt.COMPLETE).is_file():
            raise FileNotFoundError(f"{folder}: not a complete checkpoint (no {ckpt.COMPLETE} marker)")
        saved_world = int(ckpt.client_state(folder).get("world_size", self.info.world_size))
        if saved_world != self.info.world_size and self.cfg.dist.zero_stage > 0:
            raise SchemaError(
                f"{folder}: written by {saved_world} ranks under ZeRO-{self.cfg.dist.zero_stage}, resumed with "
                f"{self.info.world_size}: ZeRO partitions of the optimizer state reshard only from ZeRO-0 runs"
            )
        client = self.engine.load(folder.parent, folder.name, with_optimizer=True)
        self.check_compatible(folder, client)
        self.load_state_dict(client["loop"])
        self.loader.load_state_dict(client["loader"])  # the global sample offset: the same on every rank
        if saved_world == self.info.world_size:
            ckpt.set_rng_state(ckpt.read_rank_state(folder, self.info.rank)["rng"])
            log.info("resumed from %s (step %d)", folder, self.step)
        else:
            # Per-rank random streams (dropout, negatives) cannot be carried over to other ranks.
            torch.manual_seed(self.cfg.train.seed + 1 + self.info.rank + 1_000_003 * self.step)
            log.info(
                "resumed from %s (step %d), written by %d ranks, on %d ranks: same weights and data position, "
                "new per-rank random streams", folder, self.step, saved_world, self.info.world_size,
            )

    def load_weights(self, folder: Path) -> dict[str, Any]:
        client = self.engine.load(folder.parent, folder.name, with_optimizer=False)
        self.check_compatible(folder, client)
        return client

    # ------------------------------------------------------------------------------------ steps
    def train_step(self, batches: Iterator[Batch]) -> dict[str, Any]:
        """One optimizer step over `gradient_accumulation_steps` micro batches."""
        gas = self.engine.ds_config["gradient_accumulation_steps"]
        loss_sum = torch.zeros((), dtype=torch.float32)
        tokens = torch.zeros((), dtype=torch.long)
        clock = _Clock(self.info.device, enabled=self.cfg.train.time_breakdown)
        for _ in range(gas):
            batch = next(batches)
            clock.lap("data_wait")
            if self.trace is not None:
                self.trace.write(self.step + 1, batch)
            out = self.engine.forward(batch, task="train")
            clock.lap("forward")
            self.engine.backward(out["loss"])
            clock.lap("backward")
            self.engine.step()
            clock.lap("optimizer")
            loss_sum += out["loss"].detach().float().cpu()
            tokens += out["num_tokens"].detach().cpu()
        return {"loss": loss_sum / gas, "tokens": tokens, "sequences": gas * self.cfg.train.micro_batch_size, **clock.times}

    def check_finite(self, loss: torch.Tensor) -> float:
        """All-reduced mean loss; raises TrainingDiverged on NaN/Inf (a sync point: log/save steps only)."""
        value = all_reduce_(loss.detach().clone().float().to(self._reduce_device())) / self.info.world_size
        grad_norm = self.engine.grad_norm()
        loss_value = float(value.item())  # CPU-GPU sync point
        if not math.isfinite(loss_value) or (grad_norm is not None and not math.isfinite(grad_norm)):
            last = ckpt.latest(self.ckpt_root)
            raise TrainingDiverged(
                f"non-finite training loss ({loss_value}) or grad norm ({grad_norm}) at step {self.step}; "
                f"stopping. Last good checkpoint: {last or 'none'} (lower optim.lr or check the data)"
            )
        return loss_value

    def _reduce_device(self) -> torch.device:
        return self.info.device

    def validate(self) -> dict[str, float]:
        self.engine.eval()
        metrics = evaluate(
            self.rank, self.manifest, "valid", self.cfg.eval, self.info, max_users=self.cfg.eval.max_valid_users
        )
        self.engine.train()
        return metrics

    def rank(self, batch: Batch) -> torch.Tensor:
        return self.engine.rank(batch, self.cfg.eval.exclude_seen)

    def popularity(self, split: str) -> dict[str, float]:
        ranker = by_scores(popularity_scorer(self.spec.item_counts), self.cfg.eval.exclude_seen)
        return evaluate(ranker, self.manifest, split, self.cfg.eval, self.info)

    # ------------------------------------------------------------------------------------ loop
    def train(self) -> dict[str, Any]:
        cfg = self.cfg.train
        self.resume()
        self.engine.train()
        progress = _progress(cfg, self.step, self.info.is_main)
        stop = self.step >= cfg.max_steps
        steps_this_run = 0
        # The prefetch thread is joined when the block ends, however it ends (see loader.Batches).
        with iter(self.loader) as batches:
            while not stop:
                t0 = time.perf_counter()
                out = self.train_step(batches)
                self.step += 1
                self.window.add(out, time.perf_counter() - t0)
                progress.update(1)
                if should_log(self.step, cfg) or should_save(self.step, cfg):
                    loss = self.check_finite(out["loss"])
                if should_log(self.step, cfg):
                    self.log_train(loss)
                if should_eval(self.step, cfg):
                    stop = self.after_validation(self.validate())
                if should_save(self.step, cfg) and self.last_saved_step != self.step:
                    self.save()
                stop = stop or self.step >= cfg.max_steps
                steps_this_run += 1
                if cfg.stop_after and steps_this_run >= cfg.stop_after and not stop:
                    return self.leave_early(out["loss"])
        progress.close()
        return self.finish()

    def leave_early(self, loss: torch.Tensor) -> None:
        """train.stop_after: checkpoint and leave; the same command resumes from here."""
        if self.last_saved_step != self.step:
            self.check_finite(loss)
            self.save()
        log.info("leaving after step %d as configured (train.stop_after); run the same command to resume", self.step)
        self.tracker.close()
        return None

    def flush_window(self) -> tuple[_Window, int, int]:
        """Move the counts since the last flush into the run totals (collective: log and save steps).
        Returns the window with its global sequence and token counts."""
        window, self.window = self.window, _Window()
        if not window.steps:
            return window, 0, 0
        tokens = int(all_reduce_(window.tokens.clone().to(self._reduce_device())).item())
        sequences = window.sequences * self.info.world_size
        self.samples_seen += sequences
        self.tokens_seen += tokens
        self.train_seconds += window.seconds
        return window, sequences, tokens

    def log_train(self, loss: float) -> None:
        window, sequences, tokens = self.flush_window()
        metrics = {
            "train/loss": loss,
            "train/epoch": self.loader.state.epoch,
            "perf/sequences_per_s": sequences / window.seconds,
            "perf/tokens_per_s": tokens / window.seconds,
            "perf/step_s": window.seconds / max(1, window.steps),
            **{f"perf/{k}_pct": 100.0 * v / window.seconds for k, v in window.times.items()},
            **memory_metrics(self.info.device),
        }
        for group, lr in zip(self.engine.ds.optimizer.param_groups, self.engine.lrs(), strict=True):
            metrics[f"train/lr_{group.get('name', 'group')}"] = lr
        if (norm := self.engine.grad_norm()) is not None:
            metrics["train/grad_norm"] = norm
        self.tracker.log(metrics, self.step)
        log.info(
            "step %d loss %.4f | %.0f seq/s %.0f tok/s | data wait %.1f%%",
            self.step, loss, metrics["perf/sequences_per_s"], metrics["perf/tokens_per_s"], metrics["perf/data_wait_pct"],
        )

    def after_validation(self, metrics: dict[str, float]) -> bool:
        """Track the best checkpoint; True when early stopping says stop."""
        key = self.cfg.eval.select_metric
        if key not in metrics:
            raise ValueError(f"eval.select_metric '{key}' is not one of {sorted(metrics)}")
        self.tracker.log(named(metrics, "valid"), self.step)
        log.info("step %d valid %s", self.step, _fmt(metrics))
        if metrics[key] > self.best["value"]:
            self.best = {"step": self.step, "value": metrics[key], "metrics": metrics}
            self.evals_since_best = 0
            folder = self.save()
            if self.info.is_main:
                ckpt.mark_best(self.ckpt_root, folder, key, metrics[key])
            barrier()
            return False
        self.evals_since_best += 1
        patience = self.cfg.train.early_stopping_patience
        if patience and self.evals_since_best >= patience:
            log.info("early stopping at step %d: no %s improvement in %d validations", self.step, key, patience)
            return True
        return False

    # ------------------------------------------------------------------------------------ end
    def finish(self) -> dict[str, Any]:
        """Score the test split once with the best checkpoint; write results.json."""
        if self.best["step"] is None:
            self.after_validation(self.validate())
        # The best step comes from memory (restored on resume), not from best.json: every rank must
        # take the same decision, and rank 0 may still be writing that file.
        if self.best["step"] != self.step:
            self.load_weights(self.ckpt_root / ckpt.tag_for(self.best["step"]))
        self.engine.eval()
        test = evaluate(self.rank, self.manifest, "test", self.cfg.eval, self.info)
        results = self.results(test)
        if self.info.is_main:
            self.tracker.log(named(test, "test") | named(results["popularity"]["test"], "popularity/test"), self.step)
            self.tracker.summary({f"test/{k}_full": v for k, v in test.items()})
            tmp = self.run_dir / "results.json.tmp"
            tmp.write_text(json.dumps(results, indent=2) + "\n")
            tmp.replace(self.run_dir / "results.json")
            log.info("test %s | popularity %s", _fmt(test), _fmt(results["popularity"]["test"]))
        self.tracker.close()
        barrier()
        return results

    def results(self, test: dict[str, float]) -> dict[str, Any]:
        seconds = max(self.train_seconds, 1e-9)
        return {
            "dataset": self.manifest.dataset,
            "protocol": protocol(self.manifest, self.cfg.eval),
            "metric_suffix": "_full",
            "data": str(self.cfg.data.path),
            "test": test,
            "valid": self.best["metrics"],
            "best_step": self.best["step"],
            "popularity": {"test": self.popularity("test"), "valid": self.popularity("valid")},
            "train": {
                "steps": self.step,
                "seconds": self.train_seconds,
                "sequences_per_s": self.samples_seen / seconds,
                "tokens_per_s": self.tokens_seen / seconds,
                "sequences": self.samples_seen,
                "tokens": self.tokens_seen,
            },
            "model": {"params": self.num_params, "precision": self.engine.precision, "zero_stage": self.cfg.dist.zero_stage},
            "hardware": hardware(self.info.device, self.info.world_size),
            "run_dir": str(self.run_dir),
            "wandb": self.tracker.wandb_location,
        }


class _Window:
    """Accumulates step outputs between two log steps."""

    def __init__(self) -> None:
        self.steps, self.seconds, self.sequences = 0, 0.0, 0
        self.times: dict[str, float] = {}
        self.tokens = torch.zeros((), dtype=torch.long)

    def add(self, out: dict[str, Any], seconds: float) -> None:
        self.steps += 1
        self.seconds += seconds
        self.sequences += out["sequences"]
        self.tokens += out["tokens"]
        for k in _Clock.PHASES:
            if k in out:
                self.times[k] = self.times.get(k, 0.0) + out[k]

    @property
    def data_wait(self) -> float:
        return self.times.get("data_wait", 0.0)


class _Clock:
    """Per-phase wall time of a step. Data wait is always measured (host side, no sync needed); the
    compute phases on GPU only with train.time_breakdown, which synchronizes the device at each lap."""

    PHASES = ("data_wait", "forward", "backward", "optimizer")

    def __init__(self, device: torch.device, enabled: bool) -> None:
        self.sync = enabled and device.type == "cuda"
        self.compute = enabled or device.type != "cuda"
        self.device = device
        self.times: dict[str, float] = {}
        self.t = time.perf_counter()

    def lap(self, phase: str) -> None:
        if phase != "data_wait" and not self.compute:
            self.t = time.perf_counter()
            return
        if self.sync:
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.times[phase] = self.times.get(phase, 0.0) + now - self.t
        self.t = now


class _SampleTrace:
    """train.trace_samples: one line per training row consumed, `step fingerprint` (item and ts lists)."""

    def __init__(self, run_dir: Path, rank: int) -> None:
        folder = run_dir / "trace"
        folder.mkdir(parents=True, exist_ok=True)
        self.file = (folder / f"rank_{rank:05d}.txt").open("a", buffering=1)

    def write(self, step: int, batch: Batch) -> None:
        rows = torch.cat([batch["item"], batch["ts"]], dim=1).numpy()
        self.file.write("".join(f"{step} {hashlib.blake2b(r.tobytes(), digest_size=8).hexdigest()}\n" for r in rows))


class _NoProgress:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(cfg: TrainConfig, start: int, is_main: bool) -> Any:
    """A tqdm bar with ETA on rank 0 attached to a terminal; plain log lines otherwise."""
    want_bar = cfg.progress == "bar" or (cfg.progress == "auto" and sys.stderr.isatty())
    if not (is_main and want_bar):
        return _NoProgress()
    from tqdm import tqdm

    return tqdm(total=cfg.max_steps, initial=start, desc="train", unit="step", dynamic_ncols=True)


def _fmt(metrics: dict[str, float]) -> str:
    return " ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k != "count")


def train(cfg: RunConfig, *, dry_run: bool = False) -> dict[str, Any] | None:
    trainer = Trainer(cfg)
    if dry_run:
        return trainer_dry_run(trainer)
    return trainer.train()


def trainer_dry_run(trainer: Trainer) -> dict[str, Any]:
    """One forward on one batch: checks config, data and shapes without training."""
    with iter(trainer.loader) as batches:
        batch = next(batches)
    out = trainer.engine.forward(batch, task="train")
    report = {
        "params": trainer.num_params,
        "batch": {k: list(v.shape) for k, v in batch.items()},
        "loss": float(out["loss"].item()),
        "steps_per_epoch": trainer.loader.steps_per_epoch,
        "world_size": trainer.info.world_size,
    }
    log.info("dry run ok: %s", report)
    trainer.tracker.close()
    return report
