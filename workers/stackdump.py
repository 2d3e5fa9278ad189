"""Stacks as data: a rank's threads and frames (innermost first), what they say — the innermost frame in the task's
or the trainer's own code, the collective a rank waits in — and faulthandler's text read into them. Shared by the
launcher's hang report (orchestrator.stacks, through py-spy) and a rank's own watch (workers.selfwatch). Torch-free.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path

# Where a frame is not the user's or the trainer's own code: the interpreter's library and installed packages.
_LIBRARY = (f"{sys.prefix}/lib", f"{sys.base_prefix}/lib", "site-packages", "dist-packages", "<frozen")
# Frames that are a wait in a collective, innermost first: (a piece of the file path, how the wait is named).
_WAITS = (
    ("torch/distributed/", None),  # the function's own name: all_reduce, broadcast_object_list, barrier, ...
    ("workers/tracking/stepsync.py", "the step sync's all-reduce (stop agreement and log values)"),
    ("torch/autograd/", "backward: DDP's gradient all-reduce"),
    ("torch/_tensor.py", "backward: DDP's gradient all-reduce"),
)


@dataclass(frozen=True)
class Frame:
    function: str
    file: str
    line: int

    def __str__(self) -> str:
        return f"{self.function} ({_short(self.file)}:{self.line})"

    @property
    def own(self) -> bool:
        """In the task's or the trainer's code (not the standard library, not an installed package)."""
        return not any(part in self.file for part in _LIBRARY)


@dataclass(frozen=True)
class Thread:
    name: str
    frames: tuple[Frame, ...]  # innermost first


@dataclass(frozen=True)
class RankStacks:
    """One rank's threads as py-spy read them, or why they could not be read."""

    rank: int
    pid: int
    threads: tuple[Thread, ...] = ()
    problem: str | None = None
    via: str = "py-spy"  # or "faulthandler (why py-spy could not)"

    @property
    def main(self) -> Thread | None:
        return next((t for t in self.threads if t.name == "MainThread"), self.threads[0] if self.threads else None)

    def innermost_own(self) -> Frame | None:
        """The main thread's innermost frame in the task's or the trainer's code."""
        main = self.main
        return next((f for f in main.frames if f.own), None) if main else None

    def waits_in(self) -> str | None:
        """Which collective the main thread waits in, when its stack shows one."""
        main = self.main
        for frame in main.frames if main else ():
            for piece, named in _WAITS:
                if piece in frame.file:
                    return f"{named or frame.function} ({_short(frame.file)}:{frame.line})"
        return None

    def summary(self) -> str:
        """One line: where the rank is — its innermost own frame, and the collective it is inside, if any."""
        if self.problem:
            return f"rank {self.rank} (pid {self.pid}): {self.problem}"
        wait, own = self.waits_in(), self.innermost_own()
        where = f"at {own}" if own else "outside the task's and the trainer's code"
        return f"rank {self.rank} (pid {self.pid}): {where}" + (f", inside {wait}" if wait else "")

    def text(self) -> str:
        """Every thread, innermost frame first (the file's form)."""
        head = f"=== rank {self.rank} (pid {self.pid}) ===" + ("" if self.via == "py-spy" else f" via {self.via}")
        if self.problem:
            return f"{head}\n{self.problem}\n"
        body = [f'Thread "{t.name}":\n' + "".join(f"    {f}\n" for f in t.frames) for t in self.threads]
        return head + "\n" + "".join(body)


def _short(file: str) -> str:
    """A frame's file as a reader finds it: inside an installed package from the package on, inside the current
    folder relative to it, else as it is."""
    for marker in ("site-packages/", "dist-packages/"):
        if marker in file:
            return file.split(marker, 1)[1]
    cwd = str(Path.cwd()) + "/"
    return file[len(cwd) :] if file.startswith(cwd) else file


_FH_THREAD = re.compile(r"^(Current thread|Thread) (0x[0-9a-f]+)")
_FH_FRAME = re.compile(r'^\s+File "(.*)", line (\d+) in (.*)$')


def parse_faulthandler(text: str) -> tuple[Thread, ...]:
    """faulthandler's dump (most recent call first, like py-spy); the thread that took the signal is Python's
    main thread."""
    threads: list[Thread] = []
    for line in text.splitlines():
        head = _FH_THREAD.match(line)
        if head:
            threads.append(Thread("MainThread" if head.group(1) == "Current thread" else head.group(2), ()))
        elif (frame := _FH_FRAME.match(line)) and threads:
            last = threads[-1]
            threads[-1] = Thread(last.name, (*last.frames, Frame(frame.group(3), frame.group(1), int(frame.group(2)))))
    return tuple(threads)
