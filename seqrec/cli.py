"""`seqrec` command line: one console script, subcommands mapped to plain functions.

Every subcommand takes `--config FILE.toml` and any number of `--set section.key=value`. User errors
(bad config, missing input, unwritable output) print one line and exit with code 2, no traceback.
Heavy modules (torch, pyspark, deepspeed) are imported inside the subcommand that needs them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

from seqrec.config import ConfigError, RunConfig, field_docs, load_config
from seqrec.data.schema import SchemaError

log = logging.getLogger("seqrec")


class UserError(Exception):
    """Bad input from the user: reported as one line, exit code 2."""


# Errors caused by the user's input (config, data, paths): one line on stderr and exit code 2.
USER_ERRORS: tuple[type[BaseException], ...] = (ConfigError, UserError, SchemaError)


def ensure_writable_dir(path: str | Path, what: str) -> Path:
    """Create `path` if needed and check we can write there; raise UserError naming it otherwise."""
    p = Path(path)
    try:
        p.mkdir(parents=True, exist_ok=True)
        probe = p / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise UserError(f"{what} {p} is not writable: {e.strerror or e}") from None
    return p


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", help="TOML run config (defaults < file < --set)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one config value (repeatable), e.g. --set train.max_steps=100",
    )


def _config(args: argparse.Namespace, extra: list[str] | None = None) -> RunConfig:
    return load_config(args.config, [*(extra or []), *args.overrides])


# --------------------------------------------------------------------------------------------------
# Subcommands
# --------------------------------------------------------------------------------------------------


def cmd_generate(args: argparse.Namespace) -> int:
    extra = []
    if args.events is not None:
        extra.append(f"generate.num_events={args.events}")
    if args.seed is not None:
        extra.append(f"generate.seed={args.seed}")
    if args.output is not None:
        extra.append(f"generate.output={args.output!r}")
    cfg = _config(args, extra)
    ensure_writable_dir(Path(cfg.generate.output).parent, "output folder")
    from seqrec.data.synthetic import generate

    result = generate(cfg.generate)
    print(result.summary())
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    extra = []
    if args.input is not None:
        extra.append(f"prepare.input.path={args.input!r}")
    if args.output is not None:
        extra.append(f"prepare.output={args.output!r}")
    cfg = _config(args, extra)
    ensure_writable_dir(Path(cfg.prepare.output).parent, "output folder")
    if not args.force and _prepared_already(cfg):
        print(f"{cfg.prepare.output}: already prepared with this config (--force rebuilds it)")
        return 0
    from spark_jobs.build_sequences import InputDataError, run_prepare

    try:
        run_prepare(cfg.prepare)
    except InputDataError as e:  # unusable input (missing path or column): one line, exit 2
        raise UserError(str(e)) from None
    return 0


def _prepared_already(cfg: RunConfig) -> bool:
    """True when the output holds a finished manifest built from exactly this prepare config."""
    from seqrec.config import to_dict

    manifest = Path(cfg.prepare.output) / "manifest.json"
    try:
        return json.loads(manifest.read_text()).get("config") == to_dict(cfg.prepare)
    except (OSError, ValueError):
        return False


def cmd_train(args: argparse.Namespace) -> int:
    extra = [f"run_dir={args.run_dir!r}"] if args.run_dir else []
    if args.resume:
        extra.append(f"checkpoint.resume={args.resume!r}")
    cfg = _config(args, extra)
    ensure_writable_dir(cfg.run_dir, "run folder")
    from seqrec.train import train

    with _teardown():
        train(cfg, dry_run=args.dry_run)
    return 0


@contextlib.contextmanager
def _teardown() -> Iterator[None]:
    """Join our threads, then destroy the process group, however the command ends.

    Order matters: a loader thread still alive when the interpreter finalizes aborts the process
    (SIGABRT after a finished run, see seqrec.data.loader.Batches).
    """
    from seqrec.data.loader import close_all
    from seqrec.distributed import shutdown

    try:
        yield
    finally:
        close_all()
        shutdown()


def _run_config(args: argparse.Namespace, extra: list[str]) -> RunConfig:
    """The run's own resolved config (`<run_dir>/config.json`) when no --config is given, else the
    given config; --set overrides apply on top either way."""
    from seqrec.config import apply_overrides, from_dict

    cfg = _config(args, extra)
    saved = Path(cfg.run_dir) / "config.json"
    if args.config or not saved.is_file():
        return cfg
    return from_dict(apply_overrides(json.loads(saved.read_text()), [*extra, *args.overrides]), f"{saved} + --set")


def cmd_evaluate(args: argparse.Namespace) -> int:
    extra = [f"run_dir={args.run_dir!r}"] if args.run_dir else []
    cfg = _run_config(args, extra)
    from seqrec.evaluate import evaluate_checkpoint

    with _teardown():
        result = evaluate_checkpoint(cfg, checkpoint=args.checkpoint, split=args.split, output=args.output)
    if "output" in result:  # rank 0
        print(json.dumps(result, indent=2))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    extra = [f"run_dir={args.run_dir!r}"] if args.run_dir else []
    cfg = _config(args, extra)
    ensure_writable_dir(args.output, "export folder")
    from seqrec.export import export_model

    export_model(cfg, checkpoint=args.checkpoint, output=args.output)
    return 0


def cmd_recommend(args: argparse.Namespace) -> int:
    ensure_writable_dir(Path(args.output).parent, "output folder")
    from seqrec.export import recommend

    recommend(model_dir=args.model, histories=args.input, output=args.output, k=args.k, batch_size=args.batch_size)
    return 0


def cmd_fetch(args: argparse.Namespace) -> int:
    ensure_writable_dir(args.output, "output folder")
    from seqrec.data.movielens import FetchError, fetch

    try:
        path = fetch(args.name, args.output, url=args.url, force=args.force)
    except FetchError as e:
        raise UserError(str(e)) from None
    print(f"{args.name}: {path}")
    return 0


def cmd_summary(args: argparse.Namespace) -> int:
    from seqrec.report import print_summary

    print_summary(args.run_dir)
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    from seqrec.config import to_dict

    if args.docs:
        for key, (tp, default, doc) in field_docs().items():
            print(f"{key} ({tp}, default {default!r})\n    {doc}")
        return 0
    print(json.dumps(to_dict(_config(args)), indent=2, sort_keys=True))
    return 0


def cmd_launch(args: argparse.Namespace) -> int:
    from seqrec.launch import main as launch_main

    return launch_main(args)


# --------------------------------------------------------------------------------------------------
# Parser
# --------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="seqrec", description=__doc__.splitlines()[0])
    parser.add_argument("--log-level", default=os.environ.get("SEQREC_LOG_LEVEL", "INFO"))
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, fn: Callable[[argparse.Namespace], int], help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        _add_common(p)
        p.set_defaults(fn=fn)
        return p

    p = add("generate", cmd_generate, "write the built-in synthetic behaviour log as Parquet")
    p.add_argument("--events", type=int, help="number of events (generate.num_events)")
    p.add_argument("--seed", type=int, help="random seed (generate.seed)")
    p.add_argument("--output", help="output folder (generate.output)")

    p = add("prepare", cmd_prepare, "validate events and build sequence shards with Spark")
    p.add_argument("--input", help="events path (prepare.input.path)")
    p.add_argument("--output", help="output folder (prepare.output)")
    p.add_argument("--force", action="store_true", help="rebuild even when the output was built with this config")

    p = add("train", cmd_train, "train with DeepSpeed (run under torchrun for several processes)")
    p.add_argument("--run-dir", help="run folder (run_dir)")
    p.add_argument("--resume", help="auto (default), never, or a checkpoint folder")
    p.add_argument("--dry-run", action="store_true", help="check config, data and shapes; do not train")

    p = add("evaluate", cmd_evaluate, "score a checkpoint with full ranking")
    p.add_argument("--run-dir", help="run folder (run_dir)")
    p.add_argument("--checkpoint", default="best", help="best (default), last, or a checkpoint folder")
    p.add_argument("--split", default="test", choices=["valid", "test"])
    p.add_argument("--output", help="result JSON (default <run_dir>/eval/<split>_<checkpoint>.json)")

    p = add("export", cmd_export, "export a checkpoint to a self-contained folder (no DeepSpeed needed)")
    p.add_argument("--run-dir", help="run folder (run_dir)")
    p.add_argument("--checkpoint", default="best", help="best (default), last, or a checkpoint folder")
    p.add_argument("--output", required=True, help="export folder")

    p = add("recommend", cmd_recommend, "top-K items per user for a Parquet of histories")
    p.add_argument("--model", required=True, help="folder written by `seqrec export`")
    p.add_argument("--input", required=True, help="Parquet shard folder or file with the shard layout")
    p.add_argument("--output", required=True, help="output Parquet file")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=512)

    p = sub.add_parser("fetch", help="download a public MovieLens archive (needs network access)")
    p.add_argument("name", choices=["movielens-100k", "movielens-latest-small", "movielens-1m"])
    p.add_argument("--output", default="data/raw", help="folder; the files land in OUTPUT/NAME/")
    p.add_argument("--url", help="another location of the same archive (e.g. a file:// mirror)")
    p.add_argument("--force", action="store_true", help="download again even if the folder verifies")
    p.set_defaults(fn=cmd_fetch)

    p = add("summary", cmd_summary, "print the results table of a run folder")
    p.add_argument("--run-dir", default="runs/demo")

    p = add("config", cmd_config, "print the resolved config (or --docs: every key with its help)")
    p.add_argument("--docs", action="store_true")

    p = sub.add_parser("launch", help="render or submit cluster jobs (see `seqrec launch -h`)")
    p.set_defaults(fn=cmd_launch)
    try:
        from seqrec.launch import add_arguments
    except ImportError:  # pragma: no cover - launch module not built yet
        pass
    else:
        add_arguments(p)
    return parser


def setup_logging(level: str) -> None:
    """One line per event: rank 0 logs at `level`; other ranks log only warnings and errors, prefixed
    with their rank."""
    rank = os.environ.get("RANK")
    prefix = f"[rank{rank}] " if rank is not None else ""
    chosen = getattr(logging, level.upper(), logging.INFO)
    if rank not in (None, "0"):
        chosen = max(chosen, logging.WARNING)
    logging.basicConfig(
        level=chosen,
        format=f"%(asctime)s {prefix}%(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )


def main(argv: list[str] | None = None) -> int:
    # Compiled torch/DeepSpeed extensions, if any are ever built, live inside this environment, not in
    # a per-user cache that every checkout and venv on the machine shares.
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.log_level)
    try:
        return int(args.fn(args) or 0)
    except USER_ERRORS as e:
        print(f"seqrec {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"seqrec {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
