"""Reading shards with petastorm: virtual shards, equal steps per rank, exact and reshardable resume.

Training order (train=True). The split's row groups (files sorted by path, row groups in file order)
are dealt into C *virtual shards*: row group g belongs to virtual shard g mod C. Each virtual shard is
read by its own petastorm reader (`cur_shard=c, shard_count=C`) that shuffles its row groups and
rows with a seed of (seed, epoch, c), so its row stream is a pure function of (seed, epoch, c) and
does not depend on the number of ranks. Optimizer step s of an epoch consumes rows
[s * G/C, (s+1) * G/C) of every virtual shard's stream (G = train.global_batch_size). Rank r of W
owns the virtual shards c = r, r+W, ... (W must divide C); it concatenates its shards' rows of the
step and cuts them into the step's `accumulation` micro batches. Every rank takes the same number
of steps per epoch (the shortest virtual shard's rows // (G/C)), so collectives never wait on a rank
that ran dry (torchtitan: finite data with DP "can exhaust ranks at different steps").

The position is a global sample offset: (epoch, rows consumed per virtual shard), the same on every
rank. The set of samples of each step does not depend on the world size, so a checkpoint written by
W ranks resumes on W' ranks (any W' dividing C) with a data position that neither repeats nor skips
a sample; only the grouping of a step's samples into ranks and micro batches changes. C is chosen
once per run (`data.virtual_shards`, or the largest C <= max(8, W) that the row groups, W and G
allow) and kept in the checkpoint.

Evaluation (train=False): rank r reads the row groups g with g mod W == r, one pass, every row once.

Ranks are passed in as ints; this module never calls torch.distributed (torchtitan GrainDataLoader).
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import queue
import threading
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from seqrec.data import storage
from seqrec.data.schema import COL_LENGTH, COL_USER, Manifest, SchemaError, verify_split

log = logging.getLogger(__name__)

Batch = dict[str, torch.Tensor]


def _quiet_petastorm() -> None:
    # petastorm 0.13 on pyarrow 14 emits a FutureWarning per row group (DEPENDENCIES.md) and logs
    # at INFO that our plain Parquet shards carry no Unischema, at every reader start.
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    logging.getLogger("petastorm").setLevel(logging.WARNING)


def row_groups_per_rank(manifest: Manifest, split: str, world_size: int, sizes: list[int] | None = None) -> list[int]:
    """Rows each rank reads: row group g (global order) goes to rank g % world_size."""
    sizes = row_group_sizes(manifest, split) if sizes is None else sizes
    if len(sizes) < world_size:
        raise SchemaError(
            f"{manifest.manifest_path}: split '{split}' has {len(sizes)} row groups, fewer than the {world_size} ranks; "
            f"re-run `seqrec prepare` with prepare.shards.max_world_size >= {world_size}"
        )
    return [sum(sizes[r::world_size]) for r in range(world_size)]


def collate(columns: dict[str, np.ndarray], names: list[str]) -> Batch:
    """numpy columns of one batch -> int64 tensors (user ids stay out of the tensor batch)."""
    out: Batch = {}
    for name in names:
        arr = columns[name]
        if arr.dtype == object:  # list columns from petastorm come as an object array of arrays
            arr = np.stack(arr)
        out[name] = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.int64))
    return out


def row_group_sizes(manifest: Manifest, split: str) -> list[int]:
    """Rows of every row group of a split, in the global order (files by path, groups in file order)."""
    sizes = []
    for f in sorted(manifest.files(split), key=lambda f: manifest.path(f.path)):
        meta = storage.parquet_file(manifest.path(f.path)).metadata
        sizes += [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
    return sizes


def choose_virtual_shards(requested: int, num_row_groups: int, world_size: int, global_batch: int, where: str) -> int:
    """C for a fresh run: `requested`, or the largest C <= max(8, W) with C <= row groups, W | C, C | G."""
    if requested:
        check_virtual_shards(requested, num_row_groups, world_size, global_batch, where)
        return requested
    for c in range(min(max(DEFAULT_VIRTUAL_SHARDS, world_size), num_row_groups), 0, -1):
        if c % world_size == 0 and global_batch % c == 0:
            return c
    raise SchemaError(
        f"{where}: {num_row_groups} row groups cannot feed {world_size} ranks with global batches of {global_batch} "
        f"rows; re-run `seqrec prepare` with prepare.shards.max_world_size >= {world_size}"
    )


def check_virtual_shards(c: int, num_row_groups: int, world_size: int, global_batch: int, where: str) -> None:
    if c > num_row_groups:
        raise SchemaError(f"{where}: data.virtual_shards = {c} but the split has only {num_row_groups} row groups")
    if c % world_size:
        raise SchemaError(
            f"{where}: the world size {world_size} does not divide the {c} virtual shards of this run "
            f"(data.virtual_shards); use a world size among {[w for w in range(1, c + 1) if c % w == 0]}"
        )
    if global_batch % c:
        raise SchemaError(f"{where}: train.global_batch_size {global_batch} is not a multiple of the {c} virtual shards")


DEFAULT_VIRTUAL_SHARDS = 8


@dataclass(slots=True)
class LoaderState:
    """Position after the last batch taken: `rows` consumed per virtual shard in `epoch` (a multiple
    of G/C), plus `micro` batches taken of the next step (0 at every optimizer-step boundary)."""

    epoch: int = 0
    rows: int = 0
    micro: int = 0


class _Rows:
    """Exact row counts out of a stream of row-group chunks."""

    def __init__(self, chunks: Iterator[dict[str, np.ndarray]], columns: list[str], where: str) -> None:
        self.chunks, self.columns, self.where = chunks, columns, where
        self.buffer: list[dict[str, np.ndarray]] = []
        self.buffered = 0

    def take(self, n: int) -> dict[str, np.ndarray]:
        while self.buffered < n:
            chunk = next(self.chunks, None)
            if chunk is None:
                raise SchemaError(f"{self.where}: ran out of rows (the shards changed under the run?)")
            self.buffer.append(chunk)
            self.buffered += len(chunk[COL_LENGTH])
        merged = {k: np.concatenate([c[k] for c in self.buffer]) for k in self.columns}
        rest = {k: v[n:] for k, v in merged.items()}
        self.buffered -= n
        self.buffer = [rest] if self.buffered else []
        return {k: v[:n] for k, v in merged.items()}

    def skip(self, n: int) -> None:
        """Drop n rows without holding them (resume: the samples consumed before the checkpoint)."""
        while self.buffered < n:
            n -= self.buffered
            self.buffer, self.buffered = [], 0
            chunk = next(self.chunks, None)
            if chunk is None:
                raise SchemaError(f"{self.where}: ran out of rows (the shards changed under the run?)")
            self.buffer, self.buffered = [chunk], len(chunk[COL_LENGTH])
        if n:
            self.take(n)

    def close(self) -> None:
        self.chunks.close()  # type: ignore[attr-defined]


class ShardLoader:
    """Infinite (training) or one-pass (evaluation) batches of one split for one rank.

    Args:
        manifest: the parsed manifest of the shard folder.
        split: "train", "valid" or "test".
        dp_rank / dp_world_size: this rank and the data-parallel world size.
        batch_size: rows per batch on this rank.
        seed: base seed; epoch e reads with seed `seed * 100_003 + e + 1`.
        shuffle: shuffle row groups and rows every epoch.
        train: True: equal steps per rank, drop the tail, loop over epochs forever.
            False: one pass, every row once, the last batch may be short.

    Example:
        loader = ShardLoader(m, "train", dp_rank=0, dp_world_size=2, batch_size=64, seed=0)
        batch = next(iter(loader)); state = loader.state_dict()
    """

    def __init__(
        self,
        manifest: Manifest,
        split: str,
        *,
        dp_rank: int,
        dp_world_size: int,
        batch_size: int,
        seed: int = 0,
        shuffle: bool = True,
        train: bool = True,
        prefetch_batches: int = 8,
        global_batch_size: int = 0,
        virtual_shards: int = 0,
    ) -> None:
        verify_split(manifest, split)
        self.manifest, self.split = manifest, split
        self.rank, self.world_size = dp_rank, dp_world_size
        self.batch_size, self.seed = batch_size, seed
        self.shuffle, self.train = shuffle, train
        self.prefetch_batches = prefetch_batches
        self.where = f"{manifest.manifest_path} (split '{split}')"
        self.group_sizes = row_group_sizes(manifest, split)  # one metadata pass per split
        self.rank_rows = row_groups_per_rank(manifest, split, dp_world_size, self.group_sizes)
        if train:
            self.global_batch = global_batch_size or batch_size * dp_world_size
            if self.global_batch % (batch_size * dp_world_size):
                raise SchemaError(
                    f"{self.where}: global batch {self.global_batch} is not a multiple of micro batch {batch_size} x "
                    f"{dp_world_size} ranks"
                )
            self.accumulation = self.global_batch // (batch_size * dp_world_size)
            self._set_virtual_shards(
                choose_virtual_shards(virtual_shards, len(self.group_sizes), dp_world_size, self.global_batch, self.where)
            )
        else:
            self.steps_per_epoch = min(self.rank_rows) // batch_size
        self.state = LoaderState()
        files = sorted(manifest.path(f.path) for f in manifest.files(split))
        # Local shards: file:// URLs; remote ones (s3://...): URLs plus a file system (see storage).
        self.urls, self.filesystem = storage.petastorm_source(files)
        schema = storage.parquet_file(files[0]).schema_arrow
        self.columns = [n for n in schema.names if n != COL_USER]

    def _set_virtual_shards(self, c: int) -> None:
        """Layout of the training order for C virtual shards (W | C and C | G checked by the caller)."""
        self.virtual_shards = c
        self.shard_rows = [sum(self.group_sizes[v::c]) for v in range(c)]
        self.rows_per_step = self.global_batch // c  # rows of every virtual shard per optimizer step
        self.optimizer_steps_per_epoch = min(self.shard_rows) // self.rows_per_step
        self.steps_per_epoch = self.optimizer_steps_per_epoch * self.accumulation  # micro batches per rank
        if self.optimizer_steps_per_epoch == 0:
            short = int(np.argmin(self.shard_rows))
            raise SchemaError(
                f"{self.where}: virtual shard {short} of {c} holds {self.shard_rows[short]} rows, fewer than the "
                f"{self.rows_per_step} it must give every step (global batch {self.global_batch} / {c})"
            )

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict[str, int]:
        """The global sample offset (the same on every rank) and the layout it refers to."""
        out = {"epoch": self.state.epoch, "rows": self.state.rows, "micro": self.state.micro}
        if self.train:
            out |= {"virtual_shards": self.virtual_shards, "world_size": self.world_size, "global_batch": self.global_batch}
        return out

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Resume at `state`, possibly written by another number of ranks (see the module docstring)."""
        missing = [k for k in ("epoch", "rows", "micro", "virtual_shards", "global_batch") if k not in state]
        if missing:
            raise SchemaError(f"{self.where}: loader state {state} has no {missing} (written by an older seqrec?)")
        if int(state["global_batch"]) != self.global_batch:
            raise SchemaError(
                f"{self.where}: the checkpoint trained with global batches of {state['global_batch']} rows, this run "
                f"with {self.global_batch}; keep train.global_batch_size to resume"
            )
        c = int(state["virtual_shards"])
        check_virtual_shards(c, len(self.group_sizes), self.world_size, self.global_batch, self.where)
        if int(state["micro"]) and int(state.get("world_size", self.world_size)) != self.world_size:
            raise SchemaError(f"{self.where}: a position inside an optimizer step resumes only on the same world size")
        self._set_virtual_shards(c)
        self.state = LoaderState(epoch=int(state["epoch"]), rows=int(state["rows"]), micro=int(state["micro"]))

    # ---------------------------------------------------------------- reading
    def _epoch_seed(self, epoch: int, shard: int = 0) -> int:
        # Never 0: petastorm treats seed 0 like None and shuffles with the global np.random state.
        return (self.seed * 100_003 + epoch) * 1009 + shard + 1

    def _rows(self, epoch: int, shard: int, shard_count: int) -> Iterator[dict[str, np.ndarray]]:
        """Row-group chunks of row groups g = shard mod shard_count, in the epoch's deterministic order."""
        from petastorm import make_batch_reader

        _quiet_petastorm()
        reader = make_batch_reader(
            self.urls,
            filesystem=self.filesystem,
            schema_fields=self.columns,
            # The thread pool of petastorm 0.13.1 loses row groups now and then (seen here: 3 of 12
            # reads of 15 row groups came back short). The synchronous pool is exact; our own
            # background thread (__iter__) provides the prefetching.
            reader_pool_type="dummy",
            seed=self._epoch_seed(epoch, shard),
            shuffle_row_groups=self.shuffle,
            shuffle_rows=self.shuffle,
            num_epochs=1,
            cur_shard=shard,
            shard_count=shard_count,
        )
        try:
            for chunk in reader:
                yield chunk._asdict()
        finally:
            # Not `with reader:`: its __exit__ prints "Cache cleanup complete." to stdout.
            reader.stop()
            reader.join()

    def _eval_batches(self) -> Iterator[Batch]:
        """One pass over this rank's row groups (g mod W == rank) in fixed-size batches, the last short."""
        pending: list[dict[str, np.ndarray]] = []
        pending_rows = 0
        for chunk in self._rows(0, self.rank, self.world_size):
            pending.append(chunk)
            pending_rows += len(chunk[COL_LENGTH])
            while pending_rows >= self.batch_size:
                merged = {k: np.concatenate([c[k] for c in pending]) for k in self.columns}
                yield collate({k: v[: self.batch_size] for k, v in merged.items()}, self.columns)
                rest = {k: v[self.batch_size :] for k, v in merged.items()}
                pending_rows -= self.batch_size
                pending = [rest] if pending_rows else []
        if pending_rows:
            merged = {k: np.concatenate([c[k] for c in pending]) for k in self.columns}
            yield collate(merged, self.columns)

    def __iter__(self) -> Batches:
        """Batches in order, prepared by a background thread; the position advances as they are taken.

        The returned iterator must be closed (`close()`, or `with iter(loader) as batches:`): it joins
        the prefetch thread, which must never outlive the interpreter's teardown (see `Batches`).
        """
        return Batches(self, LoaderState(self.state.epoch, self.state.rows, self.state.micro))

    def _produce_from(self, start: LoaderState) -> Iterator[tuple[LoaderState, Batch]]:
        """(position after the batch, batch) from `start` on."""
        if not self.train:
            with contextlib.closing(self._eval_batches()) as batches:
                for i, batch in enumerate(batches):
                    yield LoaderState(0, 0, i + 1), batch
            return
        c, per_step, m = self.virtual_shards, self.rows_per_step, self.batch_size
        epoch, rows, micro = start.epoch, start.rows, start.micro
        while True:
            streams = [
                _Rows(self._rows(epoch, v, c), self.columns, f"{self.where} virtual shard {v}")
                for v in range(self.rank, c, self.world_size)
            ]
            try:
                for stream in streams:
                    stream.skip(rows)  # the samples consumed before the checkpoint
                for step in range(rows // per_step, self.optimizer_steps_per_epoch):
                    parts = [stream.take(per_step) for stream in streams]
                    merged = {k: np.concatenate([p[k] for p in parts]) for k in self.columns}
                    for i in range(micro, self.accumulation):
                        last = i == self.accumulation - 1
                        position = LoaderState(epoch, (step + 1 if last else step) * per_step, 0 if last else i + 1)
                        yield position, collate({k: v[i * m : (i + 1) * m] for k, v in merged.items()}, self.columns)
                    micro = 0
            finally:
                for stream in streams:
                    stream.close()
            epoch, rows, micro = epoch + 1, 0, 0


_END = object()


@dataclass(slots=True)
class _Failure:
    error: BaseException


class _Prefetch:
    """The state shared by a prefetch thread and its consumer (the thread never references `Batches`)."""

    def __init__(self, name: str, maxsize: int) -> None:
        self.queue: queue.Queue = queue.Queue(maxsize=maxsize)
        self.stop = threading.Event()
        self.thread: threading.Thread | None = None
        self.name = name

    def put(self, item: object) -> bool:
        while not self.stop.is_set():
            try:
                self.queue.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def drain(self) -> None:
        while True:
            try:
                self.queue.get_nowait()
            except queue.Empty:
                return

    def join(self, timeout_s: float) -> bool:
        """Stop, drain and join the thread; False if it is still alive after `timeout_s`."""
        self.stop.set()
        deadline = time.monotonic() + timeout_s
        while self.thread is not None and self.thread.is_alive() and time.monotonic() < deadline:
            self.drain()
            self.thread.join(timeout=0.05)
        self.drain()
        alive = self.thread is not None and self.thread.is_alive()
        if alive:
            log.warning("loader thread %s did not stop within %.0f s", self.name, timeout_s)
        else:
            _LIVE.discard(self)
        return not alive


_LIVE: set[_Prefetch] = set()  # every prefetch thread not yet joined (joined at exit at the latest)


def _prefetch_worker(loader: ShardLoader, start: LoaderState, pf: _Prefetch) -> None:
    try:
        with contextlib.closing(loader._produce_from(start)) as items:  # closes the petastorm reader
            for item in items:
                if not pf.put(item):
                    break
            else:
                pf.put(_END)
    except BaseException as e:  # surface reader errors in the consumer thread
        pf.put(_Failure(e))
    finally:
        if pf.stop.is_set():
            pf.drain()  # free the prepared batches here, while the interpreter is fully alive


class Batches:
    """Iterator over a ShardLoader's batches, filled by one prefetch thread; `close()` joins it.

    Why the join matters: a daemon thread still alive when the interpreter finalizes is ended with
    `pthread_exit` the moment it takes the GIL; freeing the tensors it holds (its queue) re-takes
    the GIL inside a `noexcept` destructor, so the forced unwind ends in `std::terminate`
    ("terminate called without an active exception", SIGABRT, exit -6) after a finished run (seen
    in a core dump: `THPVariable_clear` -> `PyEval_RestoreThread` -> `pthread_exit`). So `close()`
    stops the thread, drains its queue and joins it; the trainer and the evaluation close every
    iterator they open, an abandoned iterator stops its thread when collected, and an `atexit`
    hook (atexit runs before finalization) joins any thread still alive.
    """

    JOIN_TIMEOUT_S = 60.0

    def __init__(self, loader: ShardLoader, start: LoaderState) -> None:
        self.loader = loader
        self.closed = False
        self.pf = _Prefetch(f"loader-{loader.split}-r{loader.rank}", loader.prefetch_batches)
        self.pf.thread = threading.Thread(
            target=_prefetch_worker, args=(loader, start, self.pf), name=self.pf.name, daemon=True
        )
        _LIVE.add(self.pf)
        self.pf.thread.start()

    def __iter__(self) -> Batches:
        return self

    def __next__(self) -> Batch:
        if self.closed:
            raise StopIteration
        item = self.pf.queue.get()
        if item is _END:
            self.close()
            raise StopIteration
        if isinstance(item, _Failure):
            self.close()
            raise item.error
        position, batch = item
        # Advance before handing the batch out: a checkpoint taken after training on it must resume
        # after it.
        self.loader.state = position
        return batch

    def close(self) -> None:
        """Stop the prefetch thread, drop what it prepared, and join it (idempotent)."""
        if not self.closed:
            self.closed = True
            self.pf.join(self.JOIN_TIMEOUT_S)

    def __enter__(self) -> Batches:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        # An abandoned iterator stops its thread (not joined: __del__ may run on any thread; the
        # atexit hook joins it at the latest).
        self.pf.stop.set()


def live_threads() -> list[str]:
    """Names of prefetch threads still alive (tests assert this is empty after a run)."""
    return [pf.name for pf in list(_LIVE) if pf.thread is not None and pf.thread.is_alive()]


def close_all(timeout_s: float = Batches.JOIN_TIMEOUT_S) -> None:
    """Stop and join every prefetch thread still alive (registered with atexit)."""
    for pf in list(_LIVE):
        pf.join(timeout_s)


atexit.register(close_all)
