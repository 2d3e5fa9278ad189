"""Why a run hangs: every thread's Python stack of every local rank, read from outside by py-spy (it reads a
process that is frozen by SIGSTOP or blocked in C code: ``--nonblocking`` never pauses it), and the few lines that
say what each rank is doing — the innermost frame in the task's or the trainer's own code, and for a rank that
waits in a collective, which one.

Used by the launcher before it tears a hung group down (``logs/stacks-<attempt>.txt``) and by
``orchestrator stacks RUN`` on demand. py-spy needs the right to read another process's memory (root, or
``ptrace_scope`` 0 / CAP_SYS_PTRACE); where it cannot, each rank dumps its own threads with faulthandler on the
stacks signal (workers.logsetup.register_stack_dumps) — not a rank frozen by SIGSTOP, which the report names.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import psutil

from workers.contract import ENV_PY_SPY, STACKS_SIGNAL
from workers.errors import UsageError
from workers.heartbeat import read_heartbeat
from workers.rundir import RunDir

PY_SPY_TIMEOUT_S = 20.0
FAULTHANDLER_WAIT_S = 3.0
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


def culprits(stacks: list[RankStacks], judged: int, frozen: bool) -> list[int]:
    """The ranks that made no progress. A frozen rank (no heartbeat: SIGSTOP, a dead machine) is the one the
    launcher judged. Otherwise those read and not inside a collective (the others wait for them) — or, when every
    rank is inside one or none could be read, the judged one."""
    outside = [s.rank for s in stacks if not s.problem and s.waits_in() is None]
    return [judged] if frozen or not outside else outside


def py_spy() -> str | None:
    """The py-spy executable: ``ORCH_PY_SPY`` ("none": not used), else beside this Python's (a venv), else on
    PATH."""
    chosen = os.environ.get(ENV_PY_SPY)
    if chosen:
        return None if chosen == "none" else chosen
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.exists() else shutil.which("py-spy")


def read_stacks(rank: int, pid: int, paths: RunDir) -> RankStacks:
    """One rank's stacks through py-spy, else (not installed, not permitted) through the rank's own faulthandler;
    never raises (a problem is part of the answer)."""
    read = _py_spy_stacks(rank, pid)
    if read.problem is None:
        return read
    fallback = _faulthandler_stacks(rank, pid, paths)
    if fallback.problem is None:
        return RankStacks(rank, pid, fallback.threads, via=f"faulthandler ({read.problem})")
    return RankStacks(rank, pid, problem=f"{read.problem}; {fallback.problem}")


def _faulthandler_stacks(rank: int, pid: int, paths: RunDir) -> RankStacks:
    """Ask the rank to dump its stacks (STACKS_SIGNAL: workers.logsetup.register_stack_dumps) and read them."""
    dump = paths.faulthandler_file(rank)
    try:
        if psutil.Process(pid).status() == psutil.STATUS_STOPPED:
            return RankStacks(rank, pid, problem="it is stopped (SIGSTOP?): it cannot dump its own stacks")
        before = dump.stat().st_size
        os.kill(pid, STACKS_SIGNAL)
    except (OSError, psutil.Error) as exc:
        return RankStacks(rank, pid, problem=f"no faulthandler dump either ({exc})")
    deadline, size = time.monotonic() + FAULTHANDLER_WAIT_S, before
    while time.monotonic() < deadline:
        time.sleep(0.1)
        now = dump.stat().st_size if dump.exists() else 0
        if now > before and now == size:  # written, and no longer growing
            return RankStacks(rank, pid, _parse_faulthandler(dump.read_text(errors="replace")[before:]))
        size = now
    return RankStacks(rank, pid, problem=f"it did not dump its stacks within {FAULTHANDLER_WAIT_S:.0f} s")


_FH_THREAD = re.compile(r"^(Current thread|Thread) (0x[0-9a-f]+)")
_FH_FRAME = re.compile(r'^\s+File "(.*)", line (\d+) in (.*)$')


def _parse_faulthandler(text: str) -> tuple[Thread, ...]:
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


def _py_spy_stacks(rank: int, pid: int) -> RankStacks:
    exe = py_spy()
    if exe is None:
        return RankStacks(rank, pid, problem="py-spy is not installed (pip install py-spy)")
    cmd = [exe, "dump", "--pid", str(pid), "--nonblocking", "--json", "--full-filenames"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=PY_SPY_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired:
        return RankStacks(rank, pid, problem=f"py-spy did not answer within {PY_SPY_TIMEOUT_S:.0f} s")
    except OSError as exc:  # ORCH_PY_SPY names something that does not run
        return RankStacks(rank, pid, problem=f"py-spy '{exe}' cannot run ({exc.strerror or exc})")
    if proc.returncode != 0:
        said = next((ln.strip() for ln in proc.stderr.splitlines() if ln.strip()), "no reason given")
        if "ermission" in proc.stderr or "ptrace" in proc.stderr.lower():
            said += " (reading another process needs root, or kernel.yama.ptrace_scope=0, or CAP_SYS_PTRACE)"
        return RankStacks(rank, pid, problem=f"py-spy could not read it: {said}")
    try:
        threads = tuple(
            Thread(t.get("thread_name") or str(t.get("thread_id")),
                   tuple(Frame(f["name"], f["filename"], int(f["line"])) for f in t["frames"]))
            for t in json.loads(proc.stdout)
        )  # fmt: skip
    except (ValueError, KeyError, TypeError) as exc:
        return RankStacks(rank, pid, problem=f"py-spy's output did not parse ({exc})")
    return RankStacks(rank, pid, threads)


def capture(pids: dict[int, int], paths: RunDir) -> list[RankStacks]:
    """Every rank's stacks (``rank -> pid``), read at the same time, in rank order."""
    if not pids:
        return []
    with ThreadPoolExecutor(max_workers=min(8, len(pids))) as pool:
        return list(pool.map(lambda item: read_stacks(*item, paths), sorted(pids.items())))


def live_ranks(paths: RunDir) -> dict[int, int]:
    """``rank -> pid`` of the run's ranks that run on this machine now, from their heartbeat files (a pid that
    is gone, or now another program, is not a rank)."""
    found = {}
    for path in paths.heartbeat_files():
        beat = read_heartbeat(path)
        if beat is None:
            continue
        try:
            proc = psutil.Process(beat["pid"])
            alive = proc.status() != psutil.STATUS_ZOMBIE and "python" in " ".join(proc.cmdline()[:1]).lower()
        except (psutil.Error, KeyError, TypeError):
            alive = False
        if alive:
            found[int(beat["rank"])] = int(beat["pid"])
    return found


def report_text(stacks: list[RankStacks], why: str) -> str:
    """The stacks file: why it was taken, one summary line per rank, then every thread of every rank."""
    lines = [f"# {why}", *(f"# {s.summary()}" for s in stacks), ""]  # (the console's lines, at the top)
    return "\n".join(lines) + "\n" + "\n".join(s.text() for s in stacks)


def run(run_dir: str) -> int:
    """``orchestrator stacks RUN``: print every live local rank's stacks; writes nothing. A run with no live rank
    here, or stacks that cannot be read at all (py-spy missing, no permission): UsageError, one line."""
    paths = RunDir(run_dir)
    if not paths.root.is_dir():
        raise UsageError(f"'{paths.root}' does not exist. HINT: give the run's run.dir")
    pids = live_ranks(paths)
    if not pids:
        raise UsageError(
            f"'{paths.root}' has no rank running on this machine (no live worker behind its heartbeat files). HINT: "
            f"`orchestrator status {paths.root}` says whether it runs; a SLURM run's ranks run on its nodes"
        )
    stacks = capture(pids, paths)
    unread = [s for s in stacks if s.problem]
    if len(unread) == len(stacks):
        raise UsageError(f"cannot read the stacks of '{paths.root}': {unread[0].problem}")
    print(report_text(stacks, f"{len(stacks)} live rank(s) of {paths.root}"), end="")
    return 0
