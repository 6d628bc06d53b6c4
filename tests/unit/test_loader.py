"""The petastorm loader: disjoint covering rank shards, equal steps, deterministic order, exact resume."""

from __future__ import annotations

import gc
import itertools
import subprocess
import sys
import textwrap
from collections import Counter

import pytest

from seqrec.data.loader import ShardLoader, close_all, live_threads
from seqrec.data.schema import SchemaError
from tests.fixtures import write_tiny_dataset

pytestmark = pytest.mark.unit


def _key(batch, i):
    """A row identity: the full item list and timestamps (unique per user and split)."""
    return (tuple(batch["item"][i].tolist()), tuple(batch["ts"][i].tolist()))


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    return write_tiny_dataset(tmp_path_factory.mktemp("tiny"), num_users=60, row_group_rows=4, files_per_split=3)


@pytest.mark.parametrize("world", [1, 2, 4])
def test_eval_pass_is_disjoint_and_covering(manifest, world):
    seen: Counter = Counter()
    for rank in range(world):
        loader = ShardLoader(manifest, "test", dp_rank=rank, dp_world_size=world, batch_size=7, train=False, shuffle=False)
        for batch in loader:
            seen.update(_key(batch, i) for i in range(len(batch["length"])))
    assert sum(seen.values()) == manifest.rows("test") == 60
    assert max(seen.values()) == 1


def test_train_steps_equal_across_ranks_and_epochs_cover(manifest):
    world, bs = 2, 4
    loaders = [ShardLoader(manifest, "train", dp_rank=r, dp_world_size=world, batch_size=bs, seed=3) for r in range(world)]
    steps = {ld.steps_per_epoch for ld in loaders}
    assert len(steps) == 1
    (spe,) = steps
    (c,) = {ld.virtual_shards for ld in loaders}
    assert c == 8  # 15 row groups, world 2, global batch 8
    sizes = loaders[0].group_sizes
    assert spe == min(sum(sizes[v::c]) for v in range(c)) // (world * bs // c)
    keys = []
    for ld in loaders:
        keys += [_key(b, i) for b in itertools.islice(iter(ld), spe) for i in range(bs)]
        state = ld.state_dict()
        assert (state["epoch"], state["rows"], state["micro"]) == (0, spe * world * bs // c, 0)
    assert len(set(keys)) == len(keys) == spe * bs * world  # no repeats inside an epoch, across ranks either


def _steps(manifest, world, micro, global_batch, steps, state=None, seed=5):
    """{step: Counter of row keys} over all ranks, and the state after `steps` optimizer steps."""
    out: dict[int, Counter] = {}
    final = None
    for rank in range(world):
        ld = ShardLoader(manifest, "train", dp_rank=rank, dp_world_size=world, batch_size=micro, seed=seed,
                         global_batch_size=global_batch)
        if state is not None:
            ld.load_state_dict(state)
        first = ld.state.rows // (global_batch // ld.virtual_shards)
        with iter(ld) as batches:
            for s in range(steps * ld.accumulation):
                batch = next(batches)
                step = first + s // ld.accumulation
                out.setdefault(step, Counter()).update(_key(batch, i) for i in range(micro))
        final = ld.state_dict()
    return out, final


@pytest.mark.parametrize("worlds", [(2, 1), (2, 4), (1, 2), (4, 2)])
def test_each_step_takes_the_same_samples_on_any_world_size(manifest, worlds):
    """The step -> samples map is world-size free, so a resume on other ranks neither repeats nor skips."""
    global_batch = 8
    micro = {1: 4, 2: 4, 4: 2}  # world 1 accumulates 2 micro batches
    reference, _ = _steps(manifest, 2, 4, global_batch, 5)
    first, state = _steps(manifest, worlds[0], micro[worlds[0]], global_batch, 2)
    second, _ = _steps(manifest, worlds[1], micro[worlds[1]], global_batch, 3, state=state)
    assert {**first, **second} == reference
    assert sum(sum(c.values()) for c in reference.values()) == 5 * global_batch


def test_resume_on_a_world_size_that_does_not_divide_the_virtual_shards_is_refused(manifest):
    ld = ShardLoader(manifest, "train", dp_rank=0, dp_world_size=2, batch_size=4, seed=5)
    state = ld.state_dict()
    other = ShardLoader(manifest, "train", dp_rank=0, dp_world_size=3, batch_size=4, seed=5, global_batch_size=24)
    with pytest.raises(SchemaError, match="global batches of 8 rows, this run with 24"):
        other.load_state_dict(state)
    state = {**state, "virtual_shards": 8, "global_batch": 24}
    with pytest.raises(SchemaError, match="world size 3 does not divide the 8 virtual shards.*\\[1, 2, 4, 8\\]"):
        other.load_state_dict(state)


def test_order_is_deterministic_and_differs_between_epochs(manifest):
    def first_epochs(seed):
        ld = ShardLoader(manifest, "train", dp_rank=0, dp_world_size=1, batch_size=4, seed=seed)
        return [_key(b, 0) for b in itertools.islice(iter(ld), 2 * ld.steps_per_epoch)]

    a, b = first_epochs(0), first_epochs(0)
    assert a == b
    half = len(a) // 2
    assert a[:half] != a[half:]  # epoch 1 is reshuffled
    assert first_epochs(2) != a
    assert first_epochs(1) != a


def test_resume_continues_exactly(manifest):
    full = ShardLoader(manifest, "train", dp_rank=1, dp_world_size=2, batch_size=3, seed=5)
    spe = full.steps_per_epoch
    total = spe + 3  # crosses an epoch boundary
    reference = [b["item"].tolist() for b in itertools.islice(iter(full), total)]
    for cut in (1, spe - 1, spe, spe + 1):
        first = ShardLoader(manifest, "train", dp_rank=1, dp_world_size=2, batch_size=3, seed=5)
        taken = [b["item"].tolist() for b in itertools.islice(iter(first), cut)]
        state = first.state_dict()
        second = ShardLoader(manifest, "train", dp_rank=1, dp_world_size=2, batch_size=3, seed=5)
        second.load_state_dict(state)
        rest = [b["item"].tolist() for b in itertools.islice(iter(second), total - cut)]
        assert taken + rest == reference, f"cut at {cut}"


def test_more_ranks_than_row_groups_is_a_clear_error(manifest):
    with pytest.raises(SchemaError, match="fewer than the 1000 ranks"):
        ShardLoader(manifest, "test", dp_rank=0, dp_world_size=1000, batch_size=4)


def test_missing_and_corrupt_shards_name_the_file(tmp_path):
    m = write_tiny_dataset(tmp_path / "a")
    victim = tmp_path / "a" / m.files("train")[0].path
    victim.unlink()
    with pytest.raises(SchemaError, match="part-00000.parquet.*missing"):
        ShardLoader(m, "train", dp_rank=0, dp_world_size=1, batch_size=4)
    m = write_tiny_dataset(tmp_path / "b")
    victim = tmp_path / "b" / m.files("train")[1].path
    victim.write_bytes(b"not parquet at all")
    with pytest.raises(SchemaError, match="part-00001.parquet.*not a readable Parquet"):
        ShardLoader(m, "train", dp_rank=0, dp_world_size=1, batch_size=4)


def test_close_joins_the_prefetch_thread_and_drops_its_batches(manifest):
    close_all()  # iterators the tests above abandoned
    ld = ShardLoader(manifest, "train", dp_rank=0, dp_world_size=1, batch_size=2, seed=1, prefetch_batches=2)
    with iter(ld) as batches:
        next(batches)
        assert live_threads() == ["loader-train-r0"]
    assert live_threads() == []
    assert batches.pf.queue.empty()
    assert list(batches) == []  # a closed iterator is exhausted
    state = ld.state_dict()
    assert (state["epoch"], state["rows"], state["micro"]) == (0, 2 // ld.virtual_shards, 0)


def test_one_pass_iterator_closes_itself_at_the_end(manifest):
    close_all()
    ld = ShardLoader(manifest, "test", dp_rank=0, dp_world_size=1, batch_size=16, train=False, shuffle=False)
    assert sum(len(b["length"]) for b in ld) == 60
    assert live_threads() == []


def test_abandoned_iterator_stops_its_thread(manifest):
    ld = ShardLoader(manifest, "train", dp_rank=0, dp_world_size=1, batch_size=2, seed=1, prefetch_batches=2)
    batches = iter(ld)
    next(batches)
    thread = batches.pf.thread
    del batches
    gc.collect()
    thread.join(timeout=30)
    assert not thread.is_alive()


def test_reader_errors_reach_the_consumer(manifest, monkeypatch):
    ld = ShardLoader(manifest, "train", dp_rank=0, dp_world_size=1, batch_size=2, seed=1)

    def broken(epoch, shard, shard_count):
        raise OSError("shard vanished")
        yield  # pragma: no cover

    monkeypatch.setattr(ld, "_rows", broken)
    close_all()
    with pytest.raises(OSError, match="shard vanished"):
        next(iter(ld))
    assert live_threads() == []


def test_process_exits_cleanly_with_an_open_iterator(manifest):
    """An iterator left open at exit is joined by the atexit hook before finalization: exit code 0,
    no `terminate called without an active exception` (the abort this guards against)."""
    script = textwrap.dedent(f"""
        from seqrec.data.loader import ShardLoader
        from seqrec.data.schema import read_manifest
        ld = ShardLoader(read_manifest({manifest.root!r}), "train", dp_rank=0, dp_world_size=1, batch_size=2, seed=1)
        keep = iter(ld)
        next(keep)
    """)
    for _ in range(3):
        proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0 and "terminate called" not in proc.stderr, proc.stderr[-2000:]
