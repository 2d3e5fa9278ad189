"""A rank that no launcher of ours watches — a task of a SLURM job, a torchrun worker — watches its own progress.

Under ``orchestrator launch`` the launcher reads every rank's heartbeat and, at a hang, every rank's stacks
(orchestrator.stacks). Elsewhere nobody would: a rank stuck in its data loader leaves the others in an all-reduce
until the collective timeout, and the user learns nothing about why. So such a rank runs :class:`SelfWatch` in
place of the heartbeat: when its step (and, in an eval, its batch) has not moved for ``launch.hang_timeout_s`` in
the train or eval phase, it writes every thread's stack (faulthandler, read into workers.stackdump's model) into the
attempt's stacks file (``RunDir.stacks_file``, one block per rank, appended in one write), logs where it is — its
innermost own frame, or the collective it waits in — and then ends this rank as failed (a retryable failure: SLURM's
requeue and torchrun's restarts apply). Every rank of a hung group stops moving within about one step of the
others, so each writes its own block before the first one leaves (``GRACE_S``). A rank frozen by SIGSTOP cannot
write; the others' blocks then say which collective they wait in. Torch-free.
"""

from __future__ import annotations

import faulthandler
import logging
import os
import socket
import tempfile
import threading
import time
from collections.abc import Callable

from workers.rundir import RunDir
from workers.stackdump import RankStacks, Thread, parse_faulthandler

log = logging.getLogger("workers")
WATCHED = ("train", "eval")  # the phases in which a lack of progress is a hang (the launcher's rule too)


class HangError(RuntimeError):
    """What a rank's error record says when its own watch found it hung (a restart may help: retryable)."""


def own_stacks(rank: int) -> RankStacks:
    """Every thread of this process, innermost frame first, named as ``threading`` names them."""
    with tempfile.TemporaryFile("w+") as dump:
        faulthandler.dump_traceback(file=dump, all_threads=True)
        dump.seek(0)
        text = dump.read()
    names = {t.ident: t.name for t in threading.enumerate()}
    current = threading.current_thread().name
    threads = []
    for thread in parse_faulthandler(text):  # "MainThread" there is the thread that dumped: this one
        ident = None if thread.name == "MainThread" else int(thread.name, 16)
        threads.append(Thread(current if ident is None else names.get(ident, thread.name), thread.frames))
    return RankStacks(rank, os.getpid(), tuple(threads), via=f"its own watch on {socket.gethostname()}")


class SelfWatch:
    """The heartbeat's interface (``start``/``update``/``stop``), watched by a thread of this process.
    ``on_hang(message)`` is called once, on that thread, after the stacks are written; it should end the process."""

    GRACE_S = 3.0  # after writing this rank's stacks: the other ranks' watches write theirs

    def __init__(
        self, paths: RunDir, rank: int, attempt: int, timeout_s: float, on_hang: Callable[[str], None]
    ) -> None:
        self.paths, self.rank, self.attempt, self.timeout_s, self.on_hang = paths, rank, attempt, timeout_s, on_hang
        self.step, self.phase, self.tick = 0, "setup", 0
        self.interval_s = min(1.0, timeout_s / 4)
        self.clock = time.monotonic  # (a test moves it)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="orch-selfwatch", daemon=True)

    def start(self) -> SelfWatch:
        self._thread.start()
        return self

    def update(self, step: int | None = None, phase: str | None = None, tick: int = 0) -> None:
        if step is not None:
            self.step = step
        if phase is not None:
            self.phase = phase
        self.tick = tick

    def stop(self) -> None:
        self._stop.set()

    def _watch(self) -> None:
        seen, since = None, self.clock()
        checked = since
        while not self._stop.wait(self.interval_s):
            now, state = self.clock(), (self.step, self.phase, self.tick)
            # This thread woke far too late: the whole process was stopped (a suspended SLURM job, a SIGSTOP and
            # SIGCONT, a machine asleep), which is not this rank failing to progress — start counting again.
            late = now - checked > 3 * self.interval_s + 1.0
            checked = now
            if state != seen or late:
                seen, since = state, now
            elif self.phase in WATCHED and now - since >= self.timeout_s:
                self._hung(f"no progress for {now - since:.0f} s at step {self.step} ({self.phase})")
                return

    def _hung(self, why: str) -> None:
        stacks = own_stacks(self.rank)
        path = self.paths.stacks_file(self.attempt)
        block = f"# rank {self.rank}: {why}\n# {stacks.summary()}\n{stacks.text()}\n"
        try:  # one write in append mode: the blocks of ranks on other nodes never interleave with it
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, block.encode())
            finally:
                os.close(fd)
        except OSError as exc:
            log.error("rank %d: could not write its stacks to %s (%s)", self.rank, path, exc)
        log.error("rank %d: hung — %s; where it is: %s (every thread: %s)", self.rank, why, stacks.summary(), path)
        if not self._stop.wait(self.GRACE_S):
            self.on_hang(f"hung — {why}; where it is: {stacks.summary()}")
