"""Fault injection for crash tests: `SEQREC_FAULT_POINT=<name>[:<step>]` SIGKILLs this process there.

The points sit at the moments a real job dies badly (half-written checkpoint, mid-evaluation) so
tests can kill a run exactly there instead of racing a timer. Rank 0 only; unset in normal runs,
where `point()` is one dictionary lookup.

    SEQREC_FAULT_POINT=checkpoint:40   # after the engine state of step 40 is written, before COMPLETE
    SEQREC_FAULT_POINT=eval            # after the first batch of the first evaluation
"""

from __future__ import annotations

import os
import signal

ENV = "SEQREC_FAULT_POINT"


def point(name: str, step: int | None = None) -> None:
    """SIGKILL this process if the environment asks for a fault at `name` (and `step`)."""
    wanted = os.environ.get(ENV)
    if not wanted or os.environ.get("RANK", "0") != "0":
        return
    want_name, _, want_step = wanted.partition(":")
    if want_name == name and (not want_step or (step is not None and int(want_step) == step)):
        os.kill(os.getpid(), signal.SIGKILL)
