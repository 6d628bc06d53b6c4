"""Start-up and teardown guards: no op compiled at run time, rank-aware logging, fault points."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.unit


def test_deepspeed_builds_no_shared_memory_comm_op():
    """The op that used to be JIT-built (under a lock) at every first init_distributed is off."""
    from seqrec.engine import NO_RUNTIME_OPS, _deepspeed

    ds = _deepspeed()
    from deepspeed.comm.torch import build_shm_op

    assert all(ds.ops.__compatible_ops__[name] is False for name in NO_RUNTIME_OPS)
    assert build_shm_op() is None  # returns before any compiler or lock is touched


def _level_for(rank: str | None, level: str = "INFO") -> int:
    code = (
        "import logging, sys; from seqrec.cli import setup_logging; "
        f"setup_logging({level!r}); print(logging.getLogger().level)"
    )
    env = {k: v for k, v in os.environ.items() if k != "RANK"}
    if rank is not None:
        env["RANK"] = rank
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return int(out.stdout.strip())


def test_only_rank_zero_logs_progress():
    assert _level_for(None) == logging.INFO
    assert _level_for("0") == logging.INFO
    assert _level_for("1") == logging.WARNING
    assert _level_for("3", "DEBUG") == logging.WARNING
    assert _level_for("1", "ERROR") == logging.ERROR


def test_fault_point_kills_only_where_asked():
    code = "from seqrec import faults; faults.point('eval'); faults.point('checkpoint', 20); print('alive')"

    def run(fault: str, rank: str = "0") -> subprocess.CompletedProcess:
        env = {**os.environ, "SEQREC_FAULT_POINT": fault, "RANK": rank}
        return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)

    assert run("checkpoint:40").stdout.strip() == "alive"
    assert run("eval", rank="1").stdout.strip() == "alive"
    for fault in ("eval", "checkpoint", "checkpoint:20"):
        proc = run(fault)
        assert proc.returncode == -9 and "alive" not in proc.stdout


def test_a_missing_rank_is_a_bounded_error_naming_the_rendezvous():
    """Rank 0 of 2 with nobody else coming: a RendezvousError naming the address after timeout_s."""
    from seqrec.distributed import free_port

    port = free_port()
    code = (
        "import time; from seqrec.config import DistConfig; "
        "from seqrec.distributed import DistInfo, RendezvousError, init_process_group\n"
        "t = time.monotonic()\n"
        "try:\n"
        "    init_process_group(DistConfig(timeout_s=3), DistInfo.from_env())\n"
        "except RendezvousError as e:\n"
        "    print(round(time.monotonic() - t), e)\n"
    )
    env = {**os.environ, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(port)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    seconds, _, message = out.stdout.strip().partition(" ")
    assert f"the process group of 2 ranks at 127.0.0.1:{port} did not form within dist.timeout_s=3 s" in message, out
    assert 3 <= int(seconds) <= 60
