"""Reading shards with petastorm: rank striping, equal steps per rank, exact resume, collation.

Rank r of W reads the row groups whose global index (files sorted by path, row groups in file order)
is r mod W: petastorm's `cur_shard`/`shard_count` sharding, disjoint and covering. Every rank takes
the same number of steps per epoch (the smallest rank's rows // micro batch), so collectives never
wait on a rank that ran dry (torchtitan: finite data with DP "can exhaust ranks at different steps").

Order inside an epoch is a pure function of (seed, epoch, rank): petastorm shuffles row groups and
rows with a seed of ours and reads synchronously inside our prefetch thread, which keeps order. The
position is `(epoch, batches taken in this epoch)`; resuming re-opens the epoch's reader and skips
the batches already taken, so a resumed run neither repeats nor skips a sample.

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


def row_groups_per_rank(manifest: Manifest, split: str, world_size: int) -> list[int]:
    """Rows each rank reads: row group g (global order) goes to rank g % world_size."""
    rows = [0] * world_size
    g = 0
    for f in sorted(manifest.files(split), key=lambda f: manifest.path(f.path)):
        meta = storage.parquet_file(manifest.path(f.path)).metadata
        for i in range(meta.num_row_groups):
            rows[g % world_size] += meta.row_group(i).num_rows
            g += 1
    if g < world_size:
        raise SchemaError(
            f"{manifest.manifest_path}: split '{split}' has {g} row groups, fewer than the {world_size} ranks; "
            f"re-run `seqrec prepare` with prepare.shards.max_world_size >= {world_size}"
        )
    return rows


def collate(columns: dict[str, np.ndarray], names: list[str]) -> Batch:
    """numpy columns of one batch -> int64 tensors (user ids stay out of the tensor batch)."""
    out: Batch = {}
    for name in names:
        arr = columns[name]
        if arr.dtype == object:  # list columns from petastorm come as an object array of arrays
            arr = np.stack(arr)
        out[name] = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.int64))
    return out


@dataclass(slots=True)
class LoaderState:
    epoch: int = 0
    batches_in_epoch: int = 0


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
    ) -> None:
        verify_split(manifest, split)
        self.manifest, self.split = manifest, split
        self.rank, self.world_size = dp_rank, dp_world_size
        self.batch_size, self.seed = batch_size, seed
        self.shuffle, self.train = shuffle, train
        self.prefetch_batches = prefetch_batches
        self.rank_rows = row_groups_per_rank(manifest, split, dp_world_size)
        self.steps_per_epoch = min(self.rank_rows) // batch_size
        if train and self.steps_per_epoch == 0:
            raise SchemaError(
                f"{manifest.manifest_path}: split '{split}' gives rank {int(np.argmin(self.rank_rows))} only "
                f"{min(self.rank_rows)} rows, fewer than one micro batch of {batch_size}"
            )
        self.state = LoaderState()
        files = sorted(manifest.path(f.path) for f in manifest.files(split))
        # Local shards: file:// URLs; remote ones (s3://...): URLs plus a file system (see storage).
        self.urls, self.filesystem = storage.petastorm_source(files)
        schema = storage.parquet_file(files[0]).schema_arrow
        self.columns = [n for n in schema.names if n != COL_USER]

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.state.epoch, "batches_in_epoch": self.state.batches_in_epoch}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.state = LoaderState(epoch=int(state["epoch"]), batches_in_epoch=int(state["batches_in_epoch"]))

    # ---------------------------------------------------------------- reading
    def _epoch_seed(self, epoch: int) -> int:
        # Never 0: petastorm treats seed 0 like None and shuffles with the global np.random state.
        return self.seed * 100_003 + epoch + 1

    def _rows(self, epoch: int) -> Iterator[dict[str, np.ndarray]]:
        """Row-group chunks of this rank for one epoch, in the epoch's deterministic order."""
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
            seed=self._epoch_seed(epoch),
            shuffle_row_groups=self.shuffle,
            shuffle_rows=self.shuffle,
            num_epochs=1,
            cur_shard=self.rank,
            shard_count=self.world_size,
        )
        try:
            for chunk in reader:
                yield chunk._asdict()
        finally:
            # Not `with reader:`: its __exit__ prints "Cache cleanup complete." to stdout.
            reader.stop()
            reader.join()

    def _batches(self, epoch: int) -> Iterator[Batch]:
        """Fixed-size batches of one epoch (the tail is kept only in one-pass mode)."""
        pending: list[dict[str, np.ndarray]] = []
        pending_rows = 0
        for chunk in self._rows(epoch):
            pending.append(chunk)
            pending_rows += len(chunk[COL_LENGTH])
            while pending_rows >= self.batch_size:
                merged = {k: np.concatenate([c[k] for c in pending]) for k in self.columns}
                yield collate({k: v[: self.batch_size] for k, v in merged.items()}, self.columns)
                rest = {k: v[self.batch_size :] for k, v in merged.items()}
                pending_rows -= self.batch_size
                pending = [rest] if pending_rows else []
        if pending_rows and not self.train:
            merged = {k: np.concatenate([c[k] for c in pending]) for k in self.columns}
            yield collate(merged, self.columns)

    def __iter__(self) -> Batches:
        """Batches in order, prepared by a background thread; the position advances as they are taken.

        The returned iterator must be closed (`close()`, or `with iter(loader) as batches:`): it joins
        the prefetch thread, which must never outlive the interpreter's teardown (see `Batches`).
        """
        return Batches(self, LoaderState(self.state.epoch, self.state.batches_in_epoch))

    def _produce_from(self, start: LoaderState) -> Iterator[tuple[tuple[int, int], Batch]]:
        """(position, batch) from `start` on: skip batches already taken, stop epochs at steps_per_epoch."""
        epoch, skip = start.epoch, start.batches_in_epoch
        while True:
            with contextlib.closing(self._batches(epoch)) as batches:
                for i, batch in enumerate(batches):
                    if self.train and i >= self.steps_per_epoch:
                        break
                    if i >= skip:
                        yield (epoch, i), batch
            if not self.train:
                return
            epoch, skip = epoch + 1, 0


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
        (epoch, index), batch = item
        # Advance before handing the batch out: a checkpoint taken after training on it must resume
        # after it.
        self.loader.state = LoaderState(epoch=epoch, batches_in_epoch=index + 1)
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
