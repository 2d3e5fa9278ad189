"""The stop flag: signals only set it (no collective, no I/O in a handler). Torch-free, so a worker installs it
first thing, before the slow imports.

Two kinds of request, agreed across ranks as the larger of the two codes (see workers.tracking.stepsync; "the next step
boundary" below means the boundary of the second exchange after the signal — exchanges come about every 50 ms, or
every step when steps are longer — the same step on every rank):

- ``STOP`` (SIGTERM, SIGINT, SIGHUP — a closed terminal or ssh session): save at the next step boundary and exit 0;
- ``PREEMPT`` (SIGUSR1, SIGUSR2: SLURM's notice before a preemption or the time limit): save at the next step
  boundary; under SLURM, rank 0 then requeues the job (workers/slurm_job.py).
"""

from __future__ import annotations

import ctypes
import os
import signal
import time
from typing import Any

NONE, STOP, PREEMPT = 0, 1, 2
REASONS = {NONE: None, STOP: "stop", PREEMPT: "preempt"}
_CODES = {
    signal.SIGTERM: STOP,
    signal.SIGINT: STOP,
    signal.SIGHUP: STOP,  # its default action would end the worker unsaved when the terminal closes
    signal.SIGUSR1: PREEMPT,
    signal.SIGUSR2: PREEMPT,
}
STOP_SIGNALS = frozenset(_CODES)


class StopFlag:
    """Set by signals. ``current_step`` is kept up to date by the trainer (a plain attribute write per step) so
    the handler can note which step was in flight when the first notice came."""

    def __init__(self) -> None:
        self.code = NONE
        self.signum: int | None = None
        self.signal_step: int | None = None  # the step in flight when the first signal arrived
        self.signal_time: float | None = None
        self.current_step = 0

    @property
    def requested(self) -> bool:
        return self.code != NONE

    def install(self) -> StopFlag:
        for sig in _CODES:
            signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, _frame: Any) -> None:
        if self.signum is None:
            self.signum, self.signal_step, self.signal_time = signum, self.current_step, time.time()
        self.code = max(self.code, _CODES.get(signal.Signals(signum), STOP))

    @property
    def signal_name(self) -> str | None:
        """The first stop signal this process got (``SIGHUP``), or None (another rank's request)."""
        return signal.Signals(self.signum).name if self.signum is not None else None

    def describe(self) -> str:
        """E.g. ``SIGUSR2 during step 7`` (for logs)."""
        if self.signum is None:
            return "a stop request from another rank"
        return f"{signal.Signals(self.signum).name} during step {self.signal_step}"


def die_with_parent(parent_pid: int) -> bool:
    """Linux: ask the kernel to SIGKILL this process when its parent dies (even by SIGKILL). False if the parent
    ``parent_pid`` is already gone — it died before the request took effect, and no signal will come."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL)
    except OSError:
        pass
    return os.getppid() == parent_pid


def ignore_stop_signals() -> None:
    """For a helper process of a worker: the signals that stop a run reach the whole process group (Ctrl-C, SLURM's
    notice) — the helper must outlive them until its worker, which saves first, tells it to end."""
    for sig in _CODES:
        signal.signal(sig, signal.SIG_IGN)
