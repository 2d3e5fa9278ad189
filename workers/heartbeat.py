"""Per-rank liveness for hang detection.

A daemon thread rewrites the rank's heartbeat file (``RunDir.heartbeat_file``:
``{pid, rank, step, phase, tick, first_step, time}``) every ``interval`` seconds. The launcher reads these files:
a heartbeat that stops (a frozen process: SIGSTOP, a dead machine), or progress that stops while the phase is
``train`` (the step) or ``eval`` (the step and ``tick``, the eval batches done) — a stuck collective, a deadlock —
is a hang.
The training loop only assigns two attributes per step; all I/O happens in the thread.

:class:`Progress` is what both watches of a rank share — this heartbeat (read by our launcher) and a rank's own
watch (workers.selfwatch, under torchrun and SLURM): the state the loop reports, and when a lack of progress in it
may be judged a hang at all.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

from workers.contract import ENV_HEARTBEAT_INTERVAL, is_int, is_number

WATCHED = ("train", "eval")  # the phases in which a lack of progress is a hang (the launcher's rule too)


class Progress:
    """Where this rank is, as the training loop reports it (``update``: cheap, call it every step), and whether a
    lack of progress may be judged a hang now (:meth:`should_judge`).

    Exempt, as the launcher's watch (orchestrator.launcher.HangWatch) exempts them: setup, the checkpoint phase
    and the first train step (compilation, warm-up, the first collective) — and, because one rank cannot see the
    others, the train step that follows a checkpoint: with ``train.async_checkpoint`` rank 0 waits for its earlier
    background save in phase ``checkpoint`` while the others are already in that step's all-reduce, waiting for
    it. The launcher exempts the same wait by requiring every rank in a watched phase.
    """

    def __init__(self) -> None:
        self.step, self.phase, self.tick = 0, "setup", 0
        self.first_step: int | None = None  # the step this process first trained from (its warm-up step)
        self.after_checkpoint: int | None = None  # the step training went on from after the last checkpoint

    def update(self, step: int | None = None, phase: str | None = None, tick: int = 0) -> None:
        """``tick``: progress within the phase (eval batches done), so a long eval is not a stuck step."""
        left = self.phase
        if step is not None:
            self.step = step
        if phase is not None:
            self.phase = phase
        if self.phase == "train":
            if self.first_step is None:
                self.first_step = self.step
            if left == "checkpoint":
                self.after_checkpoint = self.step
        self.tick = tick

    def should_judge(self) -> bool:
        """Whether standing still now is a hang: a watched phase, past the first train step and past the step that
        follows a checkpoint (an eval before the first train step is exempt too, as the launcher has it)."""
        return (
            self.phase in WATCHED and self.first_step is not None and self.step > self.first_step
            and (self.after_checkpoint is None or self.step > self.after_checkpoint)
        )  # fmt: skip


class Heartbeat(Progress):
    """Writes this rank's heartbeat file from a background thread. ``update`` is cheap: call it every step."""

    def __init__(self, path: Path, rank: int, interval_s: float = 1.0) -> None:
        super().__init__()
        self.path, self.rank, self.interval_s = path, rank, interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)

    def start(self) -> Heartbeat:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._write()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._write()

    def _write(self) -> None:
        record = {
            "pid": os.getpid(), "rank": self.rank, "step": self.step, "phase": self.phase, "tick": self.tick,
            "first_step": self.first_step, "time": time.time(),
        }  # fmt: skip
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        try:
            tmp.write_text(json.dumps(record))
            os.replace(tmp, self.path)
        except OSError:
            pass  # a full disk must not kill training from a side thread; the launcher will see staleness


class NoHeartbeat:
    """The do-nothing twin, for launches that don't watch heartbeats (torchrun, a plain process)."""

    def start(self) -> NoHeartbeat:
        return self

    def update(self, step: int | None = None, phase: str | None = None, tick: int = 0) -> None:
        pass

    def stop(self) -> None:
        pass


def heartbeat_for(path: Path | None, rank: int) -> Heartbeat | NoHeartbeat:
    """This rank's heartbeat at ``path`` (the launcher watches it), or the do-nothing twin when nobody watches.
    The interval may be tuned with ``ORCH_HEARTBEAT_INTERVAL_S`` (tests and the chaos script use it)."""
    if path is None:
        return NoHeartbeat()
    try:
        interval = float(os.environ.get(ENV_HEARTBEAT_INTERVAL, "1.0"))
    except ValueError:
        interval = 1.0
    return Heartbeat(path, rank, interval if interval > 0 else 1.0)


def read_heartbeat(path: Path) -> dict | None:
    """A rank's last heartbeat ``{pid, rank, step, phase, time}``; None when absent or malformed (then the launcher
    treats the rank as not reporting, never crashes)."""
    try:
        beat = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    ok = (
        isinstance(beat, dict) and is_int(beat.get("step")) and isinstance(beat.get("phase"), str)
        and is_number(beat.get("time")) and is_int(beat.get("tick", 0))
    )  # fmt: skip
    return beat if ok else None
