"""Why a run hangs: every thread's Python stack of every local rank, read from outside by py-spy (it reads a
process that is frozen by SIGSTOP or blocked in C code: ``--nonblocking`` never pauses it), and the few lines that
say what each rank is doing — the innermost frame in the task's or the trainer's own code, and for a rank that
waits in a collective, which one.

Used by the launcher before it tears a hung group down (``RunDir.stacks_file``) and by
``orchestrator stacks RUN`` on demand. py-spy needs the right to read another process's memory (root, or
``ptrace_scope`` 0 / CAP_SYS_PTRACE); where it cannot, each rank dumps its own threads with faulthandler on the
stacks signal (workers.logsetup.register_stack_dumps) — not a rank frozen by SIGSTOP, which the report names.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil

from workers.contract import ENV_PY_SPY, STACKS_SIGNAL
from workers.errors import UsageError
from workers.heartbeat import read_heartbeat
from workers.rundir import RunDir
from workers.stackdump import Frame, RankStacks, Thread, parse_faulthandler

PY_SPY_TIMEOUT_S = 20.0
FAULTHANDLER_WAIT_S = 3.0


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
            return RankStacks(rank, pid, parse_faulthandler(dump.read_text(errors="replace")[before:]))
        size = now
    return RankStacks(rank, pid, problem=f"it did not dump its stacks within {FAULTHANDLER_WAIT_S:.0f} s")


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


def recorded_stacks(paths: RunDir, attempt: int | None = None) -> str | None:
    """The stacks recorded at the hang of ``attempt`` (None: the newest attempt that has any): the launcher's
    stacks file, or — where each rank's own watch wrote its file (torchrun, SLURM) — those files merged in rank
    order, each under its file's name; None when there are none (or none can be read)."""
    attempts = paths.stacks_attempts()
    if attempt is None and not attempts:
        return None
    attempt = attempts[-1] if attempt is None else attempt
    texts = []
    for path in [paths.stacks_file(attempt), *paths.rank_stacks_files(attempt)]:
        try:
            text = path.read_text(errors="replace")
        except OSError:
            continue
        texts.append(text if path == paths.stacks_file(attempt) else f"## {path.name}\n{text}")
    return "\n".join(texts) if texts else None


def run(run_dir: str, last: bool = False) -> int:
    """``orchestrator stacks RUN``: print every live local rank's stacks; writes nothing. No live rank here, or
    stacks that cannot be read at all (py-spy missing, no permission): UsageError, one line (naming ``--last`` when
    the run recorded stacks at a hang). ``last``: print the stacks recorded at the run's newest hang instead."""
    paths = RunDir(run_dir)
    if not paths.root.is_dir():
        raise UsageError(f"'{paths.root}' does not exist. HINT: give the run's run.dir")
    if last:
        recorded = recorded_stacks(paths)
        if recorded is None:
            raise UsageError(f"'{paths.root}' recorded no stacks (no hang was found in it)")
        print(recorded, end="")
        return 0
    pids = live_ranks(paths)
    if not pids:
        also = (
            f"; `orchestrator stacks {paths.root} --last` prints those of its last hang"
            if paths.stacks_attempts()
            else ""
        )
        raise UsageError(
            f"'{paths.root}' has no rank running on this machine (no live worker behind its heartbeat files). HINT: "
            f"`orchestrator status {paths.root}` says whether it runs; a SLURM run's ranks run on its nodes{also}"
        )
    stacks = capture(pids, paths)
    unread = [s for s in stacks if s.problem]
    if len(unread) == len(stacks):
        raise UsageError(f"cannot read the stacks of '{paths.root}': {unread[0].problem}")
    print(report_text(stacks, f"{len(stacks)} live rank(s) of {paths.root}"), end="")
    return 0
