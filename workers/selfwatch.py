"""A rank that no launcher of ours watches — a task of a SLURM job, a torchrun worker — watches its own progress.

Under ``orchestrator launch`` the launcher reads every rank's heartbeat and, at a hang, every rank's stacks
(orchestrator.stacks). Elsewhere nobody would: a rank stuck in its data loader leaves the others in an all-reduce
until the collective timeout, and the user learns nothing about why. So such a rank (workers.entry starts it for a
torchrun or SLURM group of two ranks or more) runs :class:`SelfWatch` in place of the heartbeat: when its step (and,
in an eval, its batch) has not moved for ``launch.hang_timeout_s`` where the shared rule (workers.heartbeat.Progress)
judges a hang — the first train step and the step after a checkpoint are exempt — it writes every thread's stack
(faulthandler, read into workers.stackdump's model) into its own stacks file (``RunDir.rank_stacks_file``: one file
per rank, as ranks on other nodes cannot append safely to one file on NFS), says where it is in one line on
stderr — its innermost own frame, or the collective it waits in — and then ``on_hang`` ends this rank as failed (a
retryable failure: SLURM's requeue and torchrun's restarts apply).

Every rank of a hung group stops moving within about one step of the others, so each writes its stacks before the
first one leaves (``GRACE_S``). A rank that waits in a collective only waits for a peer: it says so
(``contract.HANG_WAITING``) and leaves later still, so the rank that made no progress of its own is the one that
fails first and the one the reports name. A rank frozen by SIGSTOP cannot write; the others' files then say which
collective they wait in.

The hang path takes no lock another thread may hold — the hung thread may sit inside a logging handler or a
buffered write: its writes are os-level (``os.open``/``os.write``), its line goes straight to fd 2, and nothing on
it logs. Torch-free.
"""

from __future__ import annotations

import contextlib
import faulthandler
import os
import socket
import tempfile
import threading
import time
from collections.abc import Callable

from workers.contract import HANG_WAITING
from workers.heartbeat import Progress
from workers.rundir import RunDir
from workers.stackdump import RankStacks, Thread, parse_faulthandler


class HangError(RuntimeError):
    """What a rank's error record says when its own watch found it hung (a restart may help: retryable)."""


def own_stacks(rank: int) -> RankStacks:
    """Every thread of this process, innermost frame first, named as ``threading`` names them. Raises OSError when
    faulthandler has nowhere to write (no temporary file: a full ``/tmp``)."""
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


def say(line: str) -> None:
    """One line on this process's stderr, straight to fd 2: no logging handler's lock, no Python buffer."""
    with contextlib.suppress(OSError):
        os.write(2, (line.rstrip("\n") + "\n").encode(errors="replace"))


def _write(fd: int | None, text: str) -> None:
    """All of ``text`` to ``fd`` (None: nowhere), os-level."""
    view = memoryview(text.encode(errors="replace"))
    while fd is not None and view:
        view = view[os.write(fd, view) :]


class SelfWatch(Progress):
    """The heartbeat's interface (``start``/``update``/``stop``), watched by a thread of this process.
    ``on_hang(message)`` is called once, on that thread, after the stacks are written — also when they could not
    be — and should end the process without taking any lock (no logging).

    ``clock`` (seconds, monotonic) and ``interval_s`` (how often the thread looks, in real time) are injectable:
    a test moves the clock instead of sleeping."""

    GRACE_S = 3.0  # after writing this rank's stacks: the other ranks' watches write theirs

    def __init__(
        self, paths: RunDir, rank: int, attempt: int, timeout_s: float, on_hang: Callable[[str], None],
        clock: Callable[[], float] = time.monotonic, interval_s: float | None = None,
    ) -> None:  # fmt: skip
        super().__init__()
        self.paths, self.rank, self.attempt, self.timeout_s, self.on_hang = paths, rank, attempt, timeout_s, on_hang
        self.clock = clock
        self.interval_s = min(1.0, timeout_s / 4) if interval_s is None else interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="orch-selfwatch", daemon=True)

    def start(self) -> SelfWatch:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    @property
    def peer_delay_s(self) -> float:
        """How much later than a rank stuck on its own a rank waiting in a collective leaves: both stopped moving
        within about a check of each other, so this is a grace and two checks more."""
        return self.GRACE_S + 2 * self.interval_s

    def _watch(self) -> None:
        seen, since = None, self.clock()
        checked = since
        while not self._stop.wait(self.interval_s):
            now, state = self.clock(), (self.step, self.phase, self.tick)
            # This thread woke far too late: the whole process was stopped (a suspended SLURM job, a SIGSTOP and
            # SIGCONT, a machine asleep), which is not this rank failing to progress — start counting again.
            late = now - checked > 3 * self.interval_s + 1.0
            checked = now
            if state != seen or late or not self.should_judge():
                seen, since = state, now
            elif now - since >= self.timeout_s:
                self._hung(f"no progress for {now - since:.0f} s at step {self.step} ({self.phase})")
                return

    def _hung(self, why: str) -> None:
        """Write this rank's stacks, say where it is, give the others time to write theirs, then ``on_hang`` —
        reached whatever failed before it (a rank left hung with its watch gone would wait for the collective
        timeout and say nothing)."""
        message, delay = f"hung — {why}", self.GRACE_S
        try:
            stacks = self._write_stacks(why)
            if stacks is not None:
                waits = stacks.waits_in() is not None
                message = f"hung — {why}{f', {HANG_WAITING}' if waits else ''}; where it is: {stacks.summary()}"
                delay = self.peer_delay_s if waits else self.GRACE_S
            say(f"rank {self.rank}: {message} (every thread: {self._path()})")
        finally:
            if not self._stop.wait(delay):
                self.on_hang(message)

    def _path(self) -> str:
        return str(self.paths.rank_stacks_file(self.attempt, self.rank))

    def _write_stacks(self, why: str) -> RankStacks | None:
        """This rank's block in its stacks file: why, where it is, every thread. Where the stacks cannot be read
        (no temporary file for the dump) faulthandler writes them into the file itself, or the file says why not.
        Returns the stacks read, None when they could not be."""
        fd = None
        try:
            fd = os.open(self._path(), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        except OSError as exc:
            say(f"rank {self.rank}: could not write its stacks to {self._path()} ({exc})")
        try:
            try:
                stacks = own_stacks(self.rank)
            except OSError as exc:
                _write(fd, f"# rank {self.rank}: {why}\n# its stacks could not be read ({exc}): faulthandler's dump\n")
                self._dump_into(fd)
                return None
            waits = f", {HANG_WAITING}" if stacks.waits_in() else ""
            _write(fd, f"# rank {self.rank}: {why}{waits}\n# {stacks.summary()}\n{stacks.text()}\n")
            return stacks
        except OSError as exc:  # the file cannot take it (a full disk): the line on stderr still says where
            say(f"rank {self.rank}: could not write its stacks to {self._path()} ({exc})")
            return None
        finally:
            if fd is not None:
                os.close(fd)

    @staticmethod
    def _dump_into(fd: int | None) -> None:
        """faulthandler's dump of every thread straight into ``fd`` — or one line saying why there is none."""
        if fd is None:
            return
        try:
            faulthandler.dump_traceback(file=fd, all_threads=True)
        except (OSError, ValueError, RuntimeError) as exc:
            _write(fd, f"stacks unavailable: {exc}\n")
