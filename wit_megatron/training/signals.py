"""Stopping a run cleanly: SIGTERM (what Slurm and `timeout` send) and the time limit, agreed by all ranks.

A rank that receives SIGTERM only records it; at the end of each iteration all ranks agree (one small
all-reduce) whether any rank got it or ran past `--exit-duration-in-mins`, so every rank saves and stops
after the same iteration. Ctrl-C (SIGINT) is not caught: it aborts at once, and a save it interrupts is
never taken for a complete one (checkpoint.save).
"""

from __future__ import annotations

import signal
import time
from typing import Optional

import torch


class StopRequests:
    """Records SIGTERM while installed (a context manager) and answers `agreed()` once per iteration."""

    def __init__(self, exit_duration_in_mins: Optional[float] = None):
        self.deadline = None if exit_duration_in_mins is None else time.monotonic() + 60.0 * exit_duration_in_mins
        self.signal_received = False
        self._previous = None

    def __enter__(self) -> "StopRequests":
        self._previous = signal.signal(signal.SIGTERM, self._record)
        return self

    def __exit__(self, *exc) -> None:
        signal.signal(signal.SIGTERM, self._previous)

    def _record(self, signum, frame) -> None:
        self.signal_received = True

    def agreed(self) -> Optional[str]:
        """'signal' or 'duration' when any rank asks to stop (every rank gets the same answer), else None."""
        flags = torch.tensor([int(self.signal_received),
                              int(self.deadline is not None and time.monotonic() >= self.deadline)], dtype=torch.int32)
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
            flags = flags.to(device)
            torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
        received, late = flags.tolist()
        return "signal" if received else "duration" if late else None
