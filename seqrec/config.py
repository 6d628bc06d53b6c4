"""The run configuration: one typed dataclass tree, TOML files, `--set a.b=c` overrides.

Precedence is defaults < `--config file.toml` < `--set section.key=value`. Unknown keys and values of
the wrong type raise `ConfigError` naming the dotted key and the file; the CLI turns that into one
line and exit code 2. Every field's attribute docstring is its help text (`seqrec config --docs`).

This module imports nothing heavy (no torch, no pyspark): Spark jobs and the CLI both use it.

Example:
    cfg = load_config("configs/demo.toml", ["train.max_steps=100"])
    cfg.train.max_steps  # 100
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import tomllib


class ConfigError(ValueError):
    """A user error in a config file or override; the message names the key and the source."""


# --------------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------------


@dataclass(kw_only=True, slots=True)
class GenerateConfig:
    """The built-in synthetic behaviour log (`seqrec generate`)."""

    num_events: int = 1_000_000
    """Total number of events to write (exact)."""
    num_items: int = 5_000
    """Catalogue size."""
    num_categories: int = 50
    """Number of item categories; each user likes a few of them."""
    mean_events_per_user: float = 40.0
    """Mean events per user: lengths are log-normal, clipped to [min, max], calibrated to this mean."""
    min_events_per_user: int = 5
    """Shortest user history."""
    max_events_per_user: int = 2_000
    """Longest user history."""
    clusters_per_user: int = 3
    """How many taste clusters (categories) each user draws from."""
    zipf_exponent: float = 1.1
    """Exponent of the Zipf item popularity within the catalogue."""
    transition_prob: float = 0.6
    """Probability that the next item is a planted successor of the previous item (else a fresh draw
    from the user's taste clusters by popularity)."""
    num_successors: int = 3
    """Planted successors per item (the sequential signal), mostly in the item's own category."""
    seed: int = 0
    """Random seed; the same config gives byte-identical output."""
    output: str = "data/demo/log"
    """Folder for `events/part-*.parquet` (user_id, item_id, ts, action), `items.parquet` (item_id,
    category) and `_SUCCESS` (written last). A folder already holding this config is left as is."""
    events_per_file: int = 1_000_000
    """Events per Parquet file, about (whole users per file; memory stays bounded by ~1M-event blocks)."""
    start_time: int = 1_700_000_000
    """Unix seconds of the first session."""


@dataclass(kw_only=True, slots=True)
class ColumnsConfig:
    """Which input columns hold what. Optional columns are empty strings when absent."""

    user: str = "user_id"
    """User id column."""
    item: str = "item_id"
    """Item id column."""
    timestamp: str = "ts"
    """Event time column."""
    action: str = "action"
    """Action type column (view, click, ...); empty when the log has none."""
    rating: str = ""
    """Rating column used by `filters.min_rating`; empty when the log has none."""
    context: list[str] = field(default_factory=list)
    """Extra per-event categorical columns (device, surface, ...), each becomes a feature."""


@dataclass(kw_only=True, slots=True)
class InputConfig:
    """Where the raw events are and how to read them."""

    path: str = "data/demo/log/events"
    """Events path (file, folder or glob) on any filesystem Spark can read (local, s3a://, gs://, hdfs://).
    For the adapter formats it may be the dataset folder (its standard file, e.g. u.data or the one
    *.inter, is read; user-sequences reads every file of a folder)."""
    format: Literal[
        "parquet",
        "csv",
        "json",
        "movielens-100k",
        "movielens-latest-small",
        "movielens-1m",
        "sequence-lines",
        "user-sequences",
        "recbole",
    ] = "parquet"
    """Input format: generic tables, or an adapter that exposes fixed columns user_id, item_id, ts
    (+ rating for MovieLens and RecBole). sequence-lines (`user item` lines) and user-sequences
    (`user item1 item2 ...` lines; a line without items is quarantined as empty_sequence) have no
    ts and need timestamp_format = "order"; recbole reads RecBole atomic `.inter` files (typed
    header `name:type`; its `timestamp` field becomes ts). See spark_jobs/adapters.py."""
    columns: ColumnsConfig = field(default_factory=ColumnsConfig)
    """Column mapping."""
    timestamp_format: Literal["unix_s", "unix_ms", "iso", "order"] = "unix_s"
    """How to parse the timestamp column (`order`: the input position is the time; no column read)."""
    min_timestamp: int = 0
    """Parsed times before this unix second are impossible (quarantined as `impossible_timestamp`)."""
    max_timestamp: int = 4_102_444_800
    """Parsed times at or after this unix second (default 2100-01-01) are impossible."""
    csv_delimiter: str = ","
    """Field separator for CSV input."""
    csv_header: bool = True
    """Whether CSV input has a header line."""
    item_features_path: str = "data/demo/log/items.parquet"
    """Optional item table with side features (empty: none); for the MovieLens formats it may be the
    dataset folder (u.item + u.genre, movies.csv, movies.dat)."""
    item_features_format: Literal["parquet", "csv", "json", "movielens-100k", "movielens-latest-small", "movielens-1m"] = "parquet"
    """Format of the item table; the MovieLens adapters expose item_id and genres (multi-valued)."""
    item_key: str = "item_id"
    """Item id column in the item table."""
    item_single_features: list[str] = field(default_factory=lambda: ["category"])
    """Single-valued categorical item features (e.g. category)."""
    item_multi_features: list[str] = field(default_factory=list)
    """Multi-valued categorical item features (e.g. genres); values separated by `multi_value_separator`."""
    multi_value_separator: str = "|"
    """Separator inside multi-valued item feature strings."""
    max_values_per_item: int = 8
    """Multi-valued features keep at most this many values per item."""
    valid_actions: list[str] = field(default_factory=lambda: ["view", "click", "like", "purchase"])
    """Known action types; other values are quarantined as `unknown_action` (empty: accept all)."""


@dataclass(kw_only=True, slots=True)
class FilterConfig:
    """Optional event filters (filtered rows are counted, never silently dropped)."""

    min_user_events: int = 3
    """Drop users with fewer events (after the other filters)."""
    min_item_events: int = 1
    """Drop items with fewer events."""
    k_core: int = 0
    """Iterative k-core on users and items (0: off)."""
    min_rating: float | None = None
    """Keep events with rating >= this (None: off)."""
    actions: list[str] = field(default_factory=list)
    """Keep only these action types (empty: all)."""
    start_time: int | None = None
    """Keep events at or after this unix second (None: no lower bound)."""
    end_time: int | None = None
    """Keep events before this unix second (None: no upper bound)."""


@dataclass(kw_only=True, slots=True)
class SplitConfig:
    """How sequences are built and split."""

    kind: Literal["leave_one_out", "time"] = "leave_one_out"
    """leave_one_out: last event = test target, second-to-last = validation; time: global time cuts."""
    valid_time: int | None = None
    """For kind=time: each user's first event at or after this unix second (and before test_time) is the
    validation target, the events before it its history; train rows hold the events before it."""
    test_time: int | None = None
    """For kind=time: each user's first event at or after this unix second is the test target, every
    earlier event its history."""
    max_len: int = 50
    """Maximum history length fed to the model (rows hold max_len + 1 events)."""
    sliding_window: bool = False
    """Emit several training rows per long history (stride `window_stride`) instead of only the latest."""
    window_stride: int = 0
    """Stride of the training windows (0: max_len)."""


@dataclass(kw_only=True, slots=True)
class ShardConfig:
    """How shards are laid out on disk."""

    files_per_split: int = 4
    """Parquet files per split."""
    max_world_size: int = 8
    """Largest planned data-parallel world size: every split gets at least this many row groups."""
    row_group_rows: int = 2048
    """Target rows per row group (smaller when needed to reach max_world_size row groups)."""


@dataclass(kw_only=True, slots=True)
class PrepareConfig:
    """The Spark sequence builder (`seqrec prepare`, `spark_jobs/build_sequences.py`)."""

    input: InputConfig = field(default_factory=InputConfig)
    """Raw events."""
    filters: FilterConfig = field(default_factory=FilterConfig)
    """Event filters."""
    split: SplitConfig = field(default_factory=SplitConfig)
    """Sequence building and split."""
    shards: ShardConfig = field(default_factory=ShardConfig)
    """Shard layout."""
    output: str = "data/demo/shards"
    """Output folder (manifest.json, vocab/, train/, valid/, test/, quarantine/)."""
    dataset_name: str = "synthetic"
    """Name recorded in the manifest and reported next to every metric."""
    vocab_min_count: int = 1
    """Values seen fewer times map to the unknown id (1)."""
    reuse_vocab: str = ""
    """Folder of an earlier output whose vocabularies are reused (continued training); empty: build new."""
    spark_master: str = "local[*]"
    """Spark master for `seqrec prepare` (spark-submit passes its own)."""
    spark_driver_memory: str = "4g"
    """Driver heap for embedded local Spark."""
    shuffle_partitions: int = 8
    """spark.sql.shuffle.partitions."""


@dataclass(kw_only=True, slots=True)
class DataConfig:
    """Where the trainer reads shards and how."""

    path: str = "data/demo/shards"
    """Shard folder written by `seqrec prepare` (must hold manifest.json)."""
    shuffle: bool = True
    """Shuffle row-group order and rows within row groups every epoch (seeded)."""
    prefetch_batches: int = 8
    """Batches prepared ahead by the loader's background thread."""
    virtual_shards: int = 0
    """Virtual shards C of the training order (row group g belongs to shard g mod C; see
    seqrec/data/loader.py). The order, and so the position in a checkpoint, does not depend on the
    number of ranks: a run resumes on any world size that divides C. 0: the largest C <= max(8,
    world size) that the row groups, the world size and train.global_batch_size allow; kept in the
    checkpoint."""


@dataclass(kw_only=True, slots=True)
class EmbeddingsConfig:
    """The id tables: every categorical feature (item ids, item side features, event features,
    time-gap buckets, positions)."""

    backend: Literal["dense", "torchrec"] = "dense"
    """dense: one fused weight inside the model, trained by DeepSpeed's AdamW like any dense
    parameter (every row gets a gradient and AdamW state every step; for catalogues up to ~10^5
    items). torchrec: one TorchRec EmbeddingCollection outside the dense model, sharded across ranks
    by TorchRec's planner and updated row by row inside backward (embeddings.table_optimizer, at
    optim.embedding_lr); for large catalogues."""
    table_optimizer: Literal["rowwise_adagrad", "adagrad", "sgd", "adam", "lamb"] = "rowwise_adagrad"
    """Optimizer of the TorchRec tables, fused into backward. The CPU kernels take rowwise_adagrad,
    adagrad and sgd; adam and lamb need the GPU kernels."""
    table_lr: float = 0.05
    """Learning rate of the TorchRec table optimizer (constant; row-wise Adagrad adapts per row).
    The dense backend's tables use optim.embedding_lr instead."""
    table_eps: float = 1e-8
    """Epsilon of the (row-wise) Adagrad table optimizer."""
    sharding: list[str] = field(default_factory=list)
    """Pinned sharding per table, e.g. ["item=row_wise", "category=table_wise"]; the planner chooses
    for the others (row_wise or table_wise)."""
    row_wise_min_rows: int = 100_000
    """Tables with at least this many rows are sharded row-wise (rows, lookups and optimizer state
    spread evenly over the ranks); the planner places smaller ones (row-wise or table-wise) unless
    embeddings.sharding pins them."""
    memory_budget_gib: float = 0.0
    """Memory per rank the planner may give the tables and their optimizer state (0: the planner's
    default for the device). A plan that does not fit stops the run naming the tables."""
    dim: int = 64
    """Width of the fused table (item rows included: they are also the output layer); when it differs
    from model.d_model, linear projections map into and out of the transformer."""
    multi_pooling: Literal["sum", "mean"] = "mean"
    """Pooling of multi-valued features."""
    use_item_features: bool = True
    """Add the item side features from the manifest to the item representation."""
    use_actions: bool = True
    """Add the per-event features of each input event: the action type and any context columns."""
    use_time_gaps: bool = True
    """Add a log2-bucketed time gap (seconds) to the previous event in the window."""
    num_time_buckets: int = 32
    """Number of log2 time-gap buckets (1..62); gaps of 2^(n-1) - 1 seconds or more share the last."""


@dataclass(kw_only=True, slots=True)
class ModelConfig:
    """The causal transformer (SASRec family, pre-norm)."""

    d_model: int = 64
    """Hidden size."""
    num_layers: int = 2
    """Transformer blocks."""
    num_heads: int = 2
    """Attention heads."""
    ffn_mult: int = 4
    """Feed-forward width as a multiple of d_model."""
    dropout: float | None = None
    """Dropout on the summed embeddings and on the attention and feed-forward outputs. Unset: derived
    from the mean training history length (seqrec/recipe.py: 0.5 for sparse logs, 0.1 for dense)."""
    length_groups: int = 4
    """Run each batch's rows through the transformer in up to this many groups of similar history
    length, each trimmed to its longest history (left padding is not computed); 1 = the whole batch
    at full width. The result is the same up to float rounding (positions are right-anchored).
    ZeRO-3 runs at full width (its per-call parameter gathers need the same calls on every rank)."""


@dataclass(kw_only=True, slots=True)
class LossConfig:
    """Training objective."""

    kind: Literal["full", "sampled", "in_batch"] = "full"
    """full softmax, sampled softmax with logQ correction, or in-batch negatives."""
    num_negatives: int = 256
    """Negatives shared across the batch (sampled)."""
    sampler: Literal["uniform", "popularity"] = "uniform"
    """Negative distribution for sampled softmax."""
    popularity_alpha: float = 0.75
    """q(item) proportional to count^alpha for the popularity sampler."""
    logq_correction: bool = True
    """Subtract log q(item) from sampled logits."""
    temperature: float = 1.0
    """Logits are divided by this."""


@dataclass(kw_only=True, slots=True)
class OptimConfig:
    """AdamW with separate embedding and dense groups, warmup then decay."""

    lr: float = 1e-3
    """Peak learning rate of dense weights."""
    embedding_lr: float = 1e-3
    """Peak learning rate of the fused embedding table."""
    weight_decay: float = 0.01
    """Weight decay of dense matrices (norms and biases get none)."""
    embedding_weight_decay: float = 0.0
    """Weight decay of the embedding table."""
    beta1: float = 0.9
    """Adam beta1."""
    beta2: float = 0.98
    """Adam beta2."""
    grad_clip: float = 1.0
    """Gradient clipping by global norm (0: off)."""
    warmup_steps: int = 100
    """Linear warmup steps."""
    decay: Literal["cosine", "linear", "constant"] = "cosine"
    """Decay after warmup down to `min_lr_ratio` x peak at the last step."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of the peak."""


@dataclass(kw_only=True, slots=True)
class TrainConfig:
    """The training loop."""

    micro_batch_size: int = 0
    """Sequences per rank per forward/backward (0: global batch / ranks, at most 256; the rest is
    gradient accumulation)."""
    global_batch_size: int = 0
    """Sequences per optimizer step over all ranks (= micro x grad accumulation x world). 0: derived
    from the number of training rows (seqrec/recipe.py; 128 up to 128k rows)."""
    max_steps: int = 0
    """Optimizer steps, the run's length (0: train.epochs x steps per epoch)."""
    epochs: float = 0.0
    """Passes over the training rows when max_steps is 0 (0: derived, about 3,000 steps within 1 to
    200 epochs; validation-based early stopping may end the run sooner)."""
    precision: Literal["fp32", "bf16", "auto"] = "auto"
    """bf16 where the hardware has it (auto: bf16 on CUDA with bf16 support, else fp32)."""
    log_every: int = 10
    """Log train metrics every N steps (also where non-finite losses are detected)."""
    eval_every: int = 0
    """Validate every N steps (and on the last step); 0: about 25 validations per run."""
    save_every: int = 0
    """Checkpoint every N steps (and on the last step); 0: with every validation."""
    early_stopping_patience: int | None = None
    """Stop after this many validations without improvement (0: never; unset: 5)."""
    seed: int = 0
    """Seed for weights, dropout and data order."""
    progress: Literal["auto", "bar", "lines"] = "auto"
    """Progress display on rank 0: a bar with ETA on a terminal, log lines otherwise."""
    stop_after: int = 0
    """Leave after this many optimizer steps in this invocation, with a checkpoint; the same command
    resumes (time-boxed or preemptible jobs). 0: run to max_steps."""
    trace_samples: bool = False
    """Record a fingerprint of every training row consumed in `<run_dir>/trace/rank_NNNNN.txt` (audits
    that a resumed run neither repeats nor skips samples)."""
    time_breakdown: bool = False
    """Time forward, backward and optimizer step separately (adds device syncs on GPU)."""


@dataclass(kw_only=True, slots=True)
class DistConfig:
    """Distributed settings (world size comes from the launcher's environment)."""

    zero_stage: int = 0
    """DeepSpeed ZeRO stage 0-3."""
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    """auto: nccl on CUDA, gloo on CPU."""
    offload_optimizer: bool = False
    """ZeRO optimizer state offload to CPU (stages 1-3)."""
    timeout_s: int = 1800
    """Seconds a rank waits for the others (process-group start-up and every collective) before it
    fails with an error instead of hanging."""


@dataclass(kw_only=True, slots=True)
class CheckpointConfig:
    """Checkpoints under `<run_dir>/checkpoints/`."""

    keep_last_k: int = 2
    """Keep this many most recent complete checkpoints (the best one is always kept)."""
    resume: str = "auto"
    """auto: resume from the last complete checkpoint if any; never; or a checkpoint folder."""


@dataclass(kw_only=True, slots=True)
class EvalConfig:
    """Full-ranking evaluation."""

    ks: list[int] = field(default_factory=lambda: [1, 10, 50])
    """Cut-offs for HR@K and NDCG@K."""
    exclude_seen: bool = True
    """Items already in the history do not compete with the target."""
    batch_size: int = 256
    """Users scored per batch per rank."""
    select_metric: str = "ndcg@10"
    """Validation metric that selects the best checkpoint."""
    max_valid_users: int = 0
    """Validate on the first N validation users only (0: all). The test split is always scored whole."""


@dataclass(kw_only=True, slots=True)
class TrackingConfig:
    """Experiment tracking (W&B identity comes from WANDB_* environment variables)."""

    wandb: Literal["auto", "online", "offline", "disabled"] = "auto"
    """auto: online when WANDB_API_KEY is set, offline otherwise."""
    project: str = "seqrec"
    """W&B project (WANDB_PROJECT overrides)."""


@dataclass(kw_only=True, slots=True)
class RunConfig:
    """The whole run."""

    name: str = "demo"
    """Run name (W&B run name, results)."""
    run_dir: str = "runs/demo"
    """Run folder: config.json, metrics.jsonl, results.json, checkpoints/."""
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    """Built-in synthetic log."""
    prepare: PrepareConfig = field(default_factory=PrepareConfig)
    """Spark sequence building."""
    data: DataConfig = field(default_factory=DataConfig)
    """Training data."""
    embeddings: EmbeddingsConfig = field(default_factory=EmbeddingsConfig)
    """Fused embedding table."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """Transformer."""
    loss: LossConfig = field(default_factory=LossConfig)
    """Objective."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer and schedule."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Training loop."""
    dist: DistConfig = field(default_factory=DistConfig)
    """Distributed settings."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpointing."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Evaluation."""
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    """Tracking."""


# --------------------------------------------------------------------------------------------------
# Validation (cross-field rules; type checks happen while loading)
# --------------------------------------------------------------------------------------------------


def validate(cfg: RunConfig) -> RunConfig:
    """Raise ConfigError for impossible combinations; return cfg."""
    positive = {
        "generate.num_events": cfg.generate.num_events,
        "generate.num_items": cfg.generate.num_items,
        "generate.num_categories": cfg.generate.num_categories,
        "generate.events_per_file": cfg.generate.events_per_file,
        "prepare.split.max_len": cfg.prepare.split.max_len,
        "prepare.shards.files_per_split": cfg.prepare.shards.files_per_split,
        "prepare.shards.max_world_size": cfg.prepare.shards.max_world_size,
        "prepare.shards.row_group_rows": cfg.prepare.shards.row_group_rows,
        "model.d_model": cfg.model.d_model,
        "model.num_layers": cfg.model.num_layers,
        "model.num_heads": cfg.model.num_heads,
        "train.log_every": cfg.train.log_every,
        "eval.batch_size": cfg.eval.batch_size,
        "checkpoint.keep_last_k": cfg.checkpoint.keep_last_k,
    }
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{key} must be > 0, got {value}")
    _validate_generate(cfg.generate)
    if cfg.model.d_model % cfg.model.num_heads:
        raise ConfigError(f"model.d_model ({cfg.model.d_model}) must be divisible by model.num_heads ({cfg.model.num_heads})")
    if cfg.dist.zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"dist.zero_stage must be 0, 1, 2 or 3, got {cfg.dist.zero_stage}")
    derived = {  # 0 = derived from the data (seqrec/recipe.py)
        "train.micro_batch_size": cfg.train.micro_batch_size,
        "train.global_batch_size": cfg.train.global_batch_size,
        "train.max_steps": cfg.train.max_steps,
        "train.epochs": cfg.train.epochs,
        "train.eval_every": cfg.train.eval_every,
        "train.save_every": cfg.train.save_every,
        "train.early_stopping_patience": cfg.train.early_stopping_patience or 0,
    }
    for key, value in derived.items():
        if value < 0:
            raise ConfigError(f"{key} must be >= 0 (0: derived from the data), got {value}")
    micro, total = cfg.train.micro_batch_size, cfg.train.global_batch_size
    if micro and total and total % micro:
        raise ConfigError("train.global_batch_size must be a multiple of train.micro_batch_size")
    if cfg.model.dropout is not None and not 0.0 <= cfg.model.dropout < 1.0:
        raise ConfigError("model.dropout must be in [0, 1)")
    if cfg.loss.kind == "sampled" and cfg.loss.num_negatives <= 0:
        raise ConfigError("loss.num_negatives must be > 0 for loss.kind = 'sampled'")
    if not cfg.eval.ks or min(cfg.eval.ks) <= 0:
        raise ConfigError("eval.ks must be a non-empty list of positive integers")
    _validate_prepare(cfg.prepare)
    return cfg


_RESERVED_FEATURE_NAMES = ("user", "length", "item", "ts", "target")


def _validate_prepare(p: PrepareConfig) -> None:
    """Rules of the `prepare` section (positivity of shard and length settings is checked in `validate`)."""
    inp, cols, sp, flt = p.input, p.input.columns, p.split, p.filters
    if sp.kind == "time" and (sp.valid_time is None or sp.test_time is None):
        raise ConfigError("prepare.split.valid_time and prepare.split.test_time are required when prepare.split.kind = 'time'")
    if sp.kind == "time" and sp.valid_time > sp.test_time:  # type: ignore[operator]
        raise ConfigError(f"prepare.split.valid_time ({sp.valid_time}) must be <= prepare.split.test_time ({sp.test_time})")
    if sp.window_stride < 0 or sp.window_stride > sp.max_len:
        raise ConfigError(f"prepare.split.window_stride must be in [0, max_len = {sp.max_len}], got {sp.window_stride}")
    if inp.format in ("sequence-lines", "user-sequences") and inp.timestamp_format != "order":
        raise ConfigError(
            f"prepare.input.format = '{inp.format}' has no time column: set prepare.input.timestamp_format = 'order'"
        )
    required = {"user": cols.user, "item": cols.item} | ({} if inp.timestamp_format == "order" else {"timestamp": cols.timestamp})
    for role, name in required.items():
        if not name:
            raise ConfigError(f"prepare.input.columns.{role} must name a column")
    used = [c for c in [cols.user, cols.item, cols.timestamp if inp.timestamp_format != "order" else "", cols.action, cols.rating, *cols.context] if c]
    if len(used) != len(set(used)):
        raise ConfigError(f"prepare.input.columns: a column is mapped to two roles ({used})")
    features = [*inp.item_single_features, *inp.item_multi_features, *(["action"] if cols.action else []), *cols.context]
    clash = sorted({f for f in features if features.count(f) > 1 or f in _RESERVED_FEATURE_NAMES})
    if clash:
        raise ConfigError(f"prepare: feature names must be unique and not one of {_RESERVED_FEATURE_NAMES}: {clash}")
    if flt.min_rating is not None and not cols.rating:
        raise ConfigError("prepare.filters.min_rating needs prepare.input.columns.rating")
    if flt.actions and not cols.action:
        raise ConfigError("prepare.filters.actions needs prepare.input.columns.action")
    if inp.min_timestamp >= inp.max_timestamp:
        raise ConfigError("prepare.input.min_timestamp must be < prepare.input.max_timestamp")
    for key, value in {"filters.min_user_events": flt.min_user_events, "filters.min_item_events": flt.min_item_events,
                       "vocab_min_count": p.vocab_min_count, "input.max_values_per_item": inp.max_values_per_item,
                       "shuffle_partitions": p.shuffle_partitions}.items():
        if value < 1:
            raise ConfigError(f"prepare.{key} must be >= 1, got {value}")
    if flt.k_core < 0:
        raise ConfigError(f"prepare.filters.k_core must be >= 0, got {flt.k_core}")
    if not p.output:
        raise ConfigError("prepare.output must not be empty")


def _validate_generate(g: GenerateConfig) -> None:
    """Rules of the `generate` section (positivity of counts is checked in `validate`)."""
    if g.min_events_per_user < 2:
        raise ConfigError(f"generate.min_events_per_user must be >= 2, got {g.min_events_per_user}")
    if g.max_events_per_user < g.min_events_per_user:
        raise ConfigError("generate.max_events_per_user must be >= generate.min_events_per_user")
    if not g.min_events_per_user <= g.mean_events_per_user <= g.max_events_per_user:
        raise ConfigError(
            f"generate.mean_events_per_user ({g.mean_events_per_user}) must lie between "
            f"generate.min_events_per_user ({g.min_events_per_user}) and generate.max_events_per_user ({g.max_events_per_user})"
        )
    if g.num_events < g.min_events_per_user:
        raise ConfigError(f"generate.num_events ({g.num_events}) must be >= generate.min_events_per_user ({g.min_events_per_user})")
    if g.num_categories > g.num_items:
        raise ConfigError(f"generate.num_categories ({g.num_categories}) must be <= generate.num_items ({g.num_items})")
    if not 1 <= g.clusters_per_user <= g.num_categories:
        raise ConfigError(f"generate.clusters_per_user must be in [1, generate.num_categories], got {g.clusters_per_user}")
    if not 1 <= g.num_successors < g.num_items:
        raise ConfigError(f"generate.num_successors must be in [1, generate.num_items), got {g.num_successors}")
    if not 0.0 <= g.transition_prob <= 1.0:
        raise ConfigError(f"generate.transition_prob must be in [0, 1], got {g.transition_prob}")
    if g.zipf_exponent < 0:
        raise ConfigError(f"generate.zipf_exponent must be >= 0, got {g.zipf_exponent}")
    if g.seed < 0 or g.start_time < 0:
        raise ConfigError("generate.seed and generate.start_time must be >= 0")
    if not g.output:
        raise ConfigError("generate.output must not be empty")


# --------------------------------------------------------------------------------------------------
# Loading: dicts -> dataclasses with strict keys and types
# --------------------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    """Check `value` against annotation `tp`; ints are accepted where floats are expected."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        if value not in typing.get_args(tp):
            choices = ", ".join(repr(c) for c in typing.get_args(tp))
            raise ConfigError(f"{source}: {key} = {value!r} is not one of {choices}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key, source)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{source}: {key} has the wrong type")
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{source}: {key} must be a list, got {type(value).__name__} {value!r}")
        return [_coerce(v, item_tp, f"{key}[{i}]", source) for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: {key} must be a table (section), got {value!r}")
        return _build(tp, value, key, source)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{source}: {key} must be a float, got {type(value).__name__} {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{source}: {key} must be an int, got {type(value).__name__} {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{source}: {key} must be a bool (true/false), got {type(value).__name__} {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{source}: {key} must be a string, got {type(value).__name__} {value!r}")
        return value
    raise TypeError(f"unsupported config annotation {_type_name(tp)} for {key}")


def _build(cls: type, values: dict[str, Any], prefix: str, source: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for k in values:
        if k not in names:
            where = f"{prefix}.{k}" if prefix else k
            raise ConfigError(f"{source}: unknown config key '{where}'")
    kwargs = {k: _coerce(v, hints[k], f"{prefix}.{k}" if prefix else k, source) for k, v in values.items()}
    return cls(**kwargs)


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in override.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain dict of a config tree (JSON/TOML friendly)."""
    return dataclasses.asdict(cfg)


def _parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected section.key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set {text!r}: expected section.key=value")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw  # bare words are strings: --set tracking.wandb=disabled
    return key.split("."), value


def _type_at(path: list[str]) -> Any:
    tp: Any = RunConfig
    for part in path:
        if not dataclasses.is_dataclass(tp):
            return None
        hints = typing.get_type_hints(tp)
        if part not in hints:
            return None
        tp = hints[part]
    return tp


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b=c` strings to a nested dict; values parse as TOML literals, else as strings."""
    for text in overrides:
        path, value = _parse_override(text)
        # A string field given a bare number (--set name=123) stays a string.
        if _type_at(path) is str and not isinstance(value, str):
            value = text.split("=", 1)[1].strip()
        node = data
        for part in path[:-1]:
            nxt = node.setdefault(part, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"--set {text!r}: '{part}' is not a section")
            node = nxt
        node[path[-1]] = value
    return data


def load_toml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: config file not found")
    try:
        with p.open("rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{p}: invalid TOML: {e}") from None
    except OSError as e:
        raise ConfigError(f"{p}: cannot read config file: {e.strerror}") from None


def from_dict(data: dict[str, Any], source: str = "config") -> RunConfig:
    """Build and validate a RunConfig from a nested dict (missing keys take their defaults)."""
    cfg = _build(RunConfig, data, "", source)
    try:
        return validate(cfg)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """defaults < TOML file < overrides. Raises ConfigError with the key and source."""
    data: dict[str, Any] = load_toml(path) if path else {}
    source = str(path) if path else "defaults"
    if overrides:
        data = apply_overrides(data, list(overrides))
        source = f"{source} + --set" if path else "--set"
    return from_dict(data, source)


def save_json(cfg: RunConfig, path: str | Path) -> None:
    Path(path).write_text(json.dumps(to_dict(cfg), indent=2, sort_keys=True) + "\n")


def field_docs(cls: type = RunConfig, prefix: str = "") -> dict[str, tuple[str, Any, str]]:
    """{dotted key: (type name, default, docstring)} for every leaf field, from attribute docstrings."""
    tree = ast.parse(inspect.getsource(cls))
    docs: dict[str, str] = {}
    body = tree.body[0].body  # type: ignore[attr-defined]
    for node, nxt in zip(body, body[1:], strict=False):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            if isinstance(nxt, ast.Expr) and isinstance(getattr(nxt, "value", None), ast.Constant):
                docs[node.target.id] = str(nxt.value.value)
    out: dict[str, tuple[str, Any, str]] = {}
    hints = typing.get_type_hints(cls)
    default = cls()
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out.update(field_docs(tp, key + "."))
        else:
            out[key] = (_type_name(tp), getattr(default, f.name), docs.get(f.name, ""))
    return out
