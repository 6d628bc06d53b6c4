"""Run a function on N real processes (gloo, CPU) with torch's elastic launcher, as torchrun would.

torchrec `examples/golden_training/tests/test_train_dlrm.py` style: `elastic_launch` with a local
rendezvous; every process gets RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT like under torchrun.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from typing import Any

from torch.distributed.launcher.api import LaunchConfig, elastic_launch

from seqrec.distributed import free_port


def launch(fn: Callable[..., Any], nproc: int, *args: Any) -> dict[int, Any]:
    """Run fn(*args) on `nproc` processes; return {rank: return value}. Raises if any rank fails."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nproc,
        run_id=uuid.uuid4().hex[:8],
        rdzv_backend="c10d",
        rdzv_endpoint=f"127.0.0.1:{free_port()}",
        max_restarts=0,
        monitor_interval=0.1,
        start_method="spawn",
    )
    return elastic_launch(config, entrypoint=fn)(*args)
