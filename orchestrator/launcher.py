"""Local launcher: start N workers (forked by a fork server that has imported torch), supervise them, report
per-rank outcomes.

Failures are data: every rank ends as a :class:`RankOutcome` (exit code, signal, error record); the first rank
to fail is the root cause. If one worker fails, the others are torn down (SIGTERM, grace period, SIGKILL of each
worker's whole process tree) so nothing hangs. The first SIGINT/SIGTERM to the launcher is forwarded to the
workers as a graceful stop (they save at the next step and exit 0); a second one tears them down at once.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing.connection
import multiprocessing.forkserver
import os
import signal
import socket
import time
from typing import Any

import psutil

from orchestrator.outcome import RankOutcome, RunResult, failure_order, rank_outcome
from orchestrator.stacks import capture, culprits, report_text
from workers.config import Config
from workers.contract import is_int
from workers.entry import spawned_worker
from workers.fsutil import RunDirLock
from workers.heartbeat import WATCHED, read_heartbeat
from workers.lifeline import SharedFd, Ties
from workers.rundir import RunDir

log = logging.getLogger("orchestrator.launcher")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def kill_tree(pids: list[int], grace_s: float) -> None:
    """SIGTERM each process and all its descendants, wait ``grace_s``, then SIGKILL whatever is left."""
    procs: list[psutil.Process] = []
    for pid in pids:
        try:
            parent = psutil.Process(pid)
            procs += [parent, *parent.children(recursive=True)]
        except psutil.NoSuchProcess:
            continue
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.send_signal(signal.SIGTERM)
    alive = _wait_gone(procs, grace_s)
    for p in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    _wait_gone(alive, 5.0)


def _gone(proc: psutil.Process) -> bool:
    try:
        return proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _wait_gone(procs: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    """Wait until each process has exited; return those still running. Never reaps (``waitpid``) anything:
    the worker processes' exit codes belong to multiprocessing, which reads them on join."""
    deadline = time.monotonic() + timeout
    alive = [p for p in procs if not _gone(p)]
    while alive and time.monotonic() < deadline:
        time.sleep(0.05)
        alive = [p for p in alive if not _gone(p)]
    return alive


class SignalRelay:
    """Launcher signal handling: the handler only records; the supervision loop acts on it."""

    def __init__(self) -> None:
        self.count = 0
        self.times: list[float] = []  # when each request came (monotonic)
        self.signums: list[int] = []  # which signal each request was
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> SignalRelay:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # SIGHUP: the terminal or ssh session closed
            # Install our own even if SIGINT was ignored (a launcher started from a script may inherit that).
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, _frame: Any) -> None:
        self.times.append(time.monotonic())
        self.signums.append(signum)
        self.count += 1


class HangWatch:
    """Reads the workers' heartbeat files; names a rank that froze or stopped making progress.

    - Frozen: a heartbeat file not rewritten for ``timeout_s`` (SIGSTOP, a swapped-out or dead machine). Checked
      across all ranks first: a frozen rank is the cause, the others only wait for it.
    - Stuck: every rank is in phase ``train`` or ``eval`` past its first step of this attempt, and some
      (step, phase, tick) has not changed for ``timeout_s`` (a stuck collective, a deadlock; an eval ticks once a
      batch). Setup, the first step (compilation, warm-up) and checkpoint phases are exempt: they may be slow
      without being stuck.
    """

    def __init__(self, paths: RunDir, nproc: int, timeout_s: float) -> None:
        self.paths = [paths.heartbeat_file(r) for r in range(nproc)]
        self.timeout_s = timeout_s
        self._progress: dict[int, tuple[tuple[int, str, int], float]] = {}  # rank -> ((step, phase, tick), since)
        self._first_step: dict[int, int] = {}  # rank -> the first step it reported in phase train

    def find_hung(self, alive: list[int], now: float) -> tuple[int, str] | None:
        if self.timeout_s <= 0:
            return None
        beats = {r: b for r in alive if (b := read_heartbeat(self.paths[r])) is not None}
        stale = sorted(
            ((now - b["time"], r) for r, b in beats.items() if now - b["time"] > self.timeout_s), reverse=True
        )
        if stale:
            age, rank = stale[0]
            return rank, f"no heartbeat for {age:.0f} s at step {beats[rank]['step']} (frozen?)"
        for rank, beat in beats.items():
            key = (beat["step"], beat["phase"], beat.get("tick", 0))
            if rank not in self._progress or self._progress[rank][0] != key:
                self._progress[rank] = (key, now)
            if is_int(beat.get("first_step")):  # the worker's own word: a fast first step is not missed
                self._first_step[rank] = beat["first_step"]
            elif beat["phase"] == "train":
                self._first_step.setdefault(rank, beat["step"])
        watched = len(beats) == len(alive) and all(
            b["phase"] in WATCHED and r in self._first_step and b["step"] > self._first_step[r]
            for r, b in beats.items()
        )
        stuck = sorted((beats[r]["step"], r) for r in beats if now - self._progress[r][1] > self.timeout_s)
        if not (watched and stuck):
            return None
        step, rank = stuck[0]
        ranks = ", ".join(str(r) for _, r in stuck)
        return (
            rank,
            f"no progress for {now - self._progress[rank][1]:.0f} s at step {step} on rank(s) {ranks} "
            "(stuck collective?)",
        )


# What the fork server imports before it forks anyone (workers/preload.py says why it is a module of its own).
_PRELOAD = ["workers.preload"]


_LIFELINE: SharedFd | None = None  # the read end of this launcher's lifeline (workers.lifeline); the write end stays


def _lifeline() -> SharedFd:
    """This process's lifeline, made once: a pipe whose write end only this process holds (close-on-exec, never
    passed on), so its end of file in a worker means this process is gone, however it ended."""
    global _LIFELINE
    if _LIFELINE is None:
        read_end, _write_end = os.pipe()  # the write end is never written nor closed: the kernel closes it with us
        _LIFELINE = SharedFd(read_end)
    return _LIFELINE


def ties(lock: RunDirLock | None) -> Ties:
    """What each worker of this launcher keeps (workers.lifeline): the lifeline and the run dir's locked file."""
    return Ties(_lifeline(), SharedFd(lock.fd) if lock is not None and lock.fd is not None else None)


def stop_fork_server() -> None:
    """End the fork server now (a launch that ends before any worker was forked): it would otherwise finish its
    imports first and only then notice that its launcher is gone."""
    pid = getattr(multiprocessing.forkserver._forkserver, "_forkserver_pid", None)
    if pid:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)


def worker_context() -> tuple[Any, int]:
    """The multiprocessing context workers start from, and the pid of their parent (the fork server).

    The server is started on the first call and imports torch and the trainer *once*, in the background: a
    worker is then a ``fork`` of it (milliseconds) instead of a new interpreter importing torch (about a second of
    CPU each) — a group of N pays one import instead of N, and a restart pays none. The server forks from a
    process that has only imported (no threads, no CUDA, no process group), which is what makes the fork safe.
    It lives as long as this process (it exits when our end of its pipe closes, even on SIGKILL), and its
    workers die with it (``die_with_parent``). The first ``Process.start`` waits for the imports to finish.
    """
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(_PRELOAD)
    multiprocessing.forkserver.ensure_running()
    # the server's pid is not public API; without it a worker falls back to watching its own parent
    return ctx, getattr(multiprocessing.forkserver._forkserver, "_forkserver_pid", None) or 0


def _spawn(cfg: Config, slots: tuple[int, ...], attempt: int, lock: RunDirLock | None) -> list:
    """Start one worker process per slot (rank r on ``slots[r]``, see :mod:`orchestrator.capacity`), forked by the
    fork server (see :func:`worker_context`), each tied to this launcher and holding ``lock``
    (see :mod:`workers.lifeline`)."""
    ctx, server_pid = worker_context()
    bonds = ties(lock)
    port, procs, nproc = free_port(), [], len(slots)
    try:
        for rank in range(nproc):
            # Each worker's error record also comes back over its own pipe: a read-only or full run dir must not
            # turn a known failure into a bare exit code (one writer per pipe: no lock a killed worker could hold).
            reader, writer = ctx.Pipe(duplex=False)
            args = (cfg.to_dict(), rank, nproc, port, server_pid, attempt, writer, bonds, slots)
            proc = ctx.Process(target=spawned_worker, name=f"worker-{rank}", args=args)
            proc.start()
            writer.close()
            proc.report = reader
            procs.append(proc)
    except BaseException:
        kill_tree([p.pid for p in procs if p.is_alive()], 0.0)
        raise
    return procs


class PrestartedGroup:
    """The first group of a launch, prepared before the launcher's own checks (config, task import, resume,
    devices) are done: the fork server imports torch and the trainer meanwhile — the slow part of a start — so
    the two slow imports overlap. No worker exists until ``go`` (nothing can be written before the checks
    passed); ``abort`` (the checks failed) has nothing to end: the server exits with the launcher."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        worker_context()

    def go(self, lock: RunDirLock | None) -> list:
        return _spawn(self.cfg, tuple(range(self.cfg.launch.nproc)), 0, lock)

    def abort(self) -> None:
        """Nothing was started that could write; the fork server is ended now (it would finish importing first)."""
        stop_fork_server()


class LocalLauncher:
    """Spawns and supervises one group of workers on this machine, one per device slot (rank r on ``slots[r]``).

    Per-rank error records and heartbeats live in the run's logs folder (cleared at the start of each attempt).
    """

    def __init__(
        self, cfg: Config, paths: RunDir, slots: tuple[int, ...], attempt: int = 0, lock: RunDirLock | None = None
    ) -> None:
        """``lock``: the launch's run-dir lock; if the run dir is deleted or replaced meanwhile, the group stops."""
        self.cfg, self.paths, self.slots, self.attempt, self.lock = cfg, paths, slots, attempt, lock
        self._relayed_at: float | None = None  # when the first stop request was passed on to the workers

    def run(self, relay: SignalRelay | None = None, prestarted: PrestartedGroup | None = None) -> RunResult:
        """Start the group (or let a prestarted one through its gate) and supervise it to the end. Always tears
        the group down before returning.

        ``relay``: the launcher's signal handling, when the caller holds it across several attempts.
        """
        with contextlib.suppress(OSError):  # a read-only run dir: the workers will say so; cleanup never crashes
            self.paths.logs.mkdir(parents=True, exist_ok=True)
            for stale in [*self.paths.error_files(), *self.paths.heartbeat_files()]:
                stale.unlink(missing_ok=True)
        procs: list = []
        with contextlib.nullcontext(relay) if relay else SignalRelay() as active:
            try:
                procs = (
                    prestarted.go(self.lock) if prestarted else _spawn(self.cfg, self.slots, self.attempt, self.lock)
                )
                result = self._supervise(procs, active)
                if result.lost_run_dir is None and self.lock is not None and (lost := self.lock.lost()):
                    # a rank that crashed because its files vanished may have been seen first: the cause is this
                    result.lost_run_dir = self._lost_message(lost)
                return result
            finally:
                kill_tree([p.pid for p in procs if p.is_alive()], self.cfg.launch.grace_period_s)

    def _supervise(self, procs: list, relay: SignalRelay) -> RunResult:
        result = RunResult(logs_hint=str(self.paths.logs))
        hangs = HangWatch(self.paths, len(procs), self.cfg.launch.hang_timeout_s)
        first_lost: float | None = None  # when the first rank that only lost its peer was seen
        forwarded = 0
        while len(result.outcomes) < len(procs):
            multiprocessing.connection.wait([p.sentinel for p in procs if p.exitcode is None], timeout=0.2)
            if relay.count > forwarded:
                forwarded = self._relay_signal(procs, relay, forwarded, result)
            seen_at = time.time()
            exits_seen = len(result.outcomes)
            for rank, proc in enumerate(procs):
                if proc.exitcode is not None and rank not in result.outcomes:
                    result.outcomes[rank] = rank_outcome(rank, proc, self.paths, seen_at)
            lost = self.lock.lost() if self.lock is not None else None
            if lost and result.lost_run_dir is None:
                result.lost_run_dir = self._lost_message(lost)
                log.error("%s", result.lost_run_dir)
                self._teardown(procs, result)
                break
            # An exit is evidence; a hang is a judgement: in a poll that saw new exits, they speak first.
            if result.root_cause is None and len(result.outcomes) == exits_seen:
                alive = [r for r, p in enumerate(procs) if p.exitcode is None]
                hung = None if relay.count else hangs.find_hung(alive, seen_at)
                if hung:
                    result.outcomes[hung[0]] = RankOutcome(hung[0], None, None, None, seen_at, hung=hung[1])
            failures = [o for o in result.outcomes.values() if o.failed]
            if failures and result.root_cause is None and all(o.lost_peer for o in failures):
                # Only ranks that lost their peer so far: the rank that broke the connection (it may close it
                # before it has finished exiting) is about to be seen; give it a moment to be the root cause.
                first_lost = first_lost or seen_at
                if len(result.outcomes) < len(procs) and seen_at - first_lost < _PEER_LOST_WAIT_S:
                    continue
            if failures and result.root_cause is None:
                result.root_cause = min(failures, key=failure_order)
                if not result.known_failure:  # a known failure is reported once, as one line, by the supervisor
                    log.error("%s; stopping the other workers", result.root_cause.describe())
                if result.root_cause.hung or result.root_cause.collective_timeout:
                    self._report_hang(procs, result.root_cause)
                self._teardown(procs, result)
        return result

    # A second request tears down only when it comes this long after the first was relayed: GNU `timeout -s INT`
    # and a terminal's Ctrl-C signal the launcher *and* its process group, so two arrive in one instant.
    SECOND_REQUEST_AFTER_S = 1.0

    def _lost_message(self, how: str) -> str:
        return (
            f"the run dir {self.paths.root} was {how} while the run was going (its lock with it); the workers were "
            "stopped so that two runs never write into one run dir"
        )

    def _relay_signal(self, procs: list, relay: SignalRelay, forwarded: int, result: RunResult) -> int:
        result.stopped_by_signal = True
        now = time.monotonic()
        if self._relayed_at is None:
            log.warning("stop requested: workers will save at the next step and exit (again to abort)")
            for p in procs:  # the signal the launcher got: the workers' reports name it ("stopped on request (SIGHUP)")
                if p.exitcode is None:
                    os.kill(p.pid, relay.signums[forwarded])
            self._relayed_at = now
        elif any(t >= self._relayed_at + self.SECOND_REQUEST_AFTER_S for t in relay.times[forwarded:]):
            log.warning("second stop request: tearing the workers down now")
            kill_tree([p.pid for p in procs if p.exitcode is None], 0.0)
        else:
            log.info("another stop signal came with the first (a process-group signal): still stopping gracefully")
        return relay.count

    def _report_hang(self, procs: list, hung: RankOutcome) -> None:
        """Before the teardown of a hang (``hung``: the rank judged hung, or one whose collective timed out): every
        live rank's stacks into this attempt's stacks file, and on the console where each rank is — the stuck
        rank's own code, the collective the others wait in."""
        stacks = capture({r: p.pid for r, p in enumerate(procs) if p.exitcode is None}, self.paths)
        path = self.paths.stacks_file(self.attempt)
        why = f"attempt {self.attempt}: {hung.describe()}"
        try:
            path.write_text(report_text(stacks, why))
        except OSError as exc:
            log.error("cannot write %s: %s", path, exc)
        stuck = culprits(stacks, hung.rank, frozen=(hung.hung or "").startswith("no heartbeat"))
        log.error("where each rank was at the hang (every thread of every rank: %s):", path)
        for s in stacks:
            log.error("  %s%s", s.summary(), "  <- no progress" if s.rank in stuck else "")

    def _teardown(self, procs: list, result: RunResult) -> None:
        kill_tree([p.pid for p in procs if p.exitcode is None], self.cfg.launch.grace_period_s)
        for rank, proc in enumerate(procs):
            proc.join(timeout=5)
            if rank not in result.outcomes:
                result.outcomes[rank] = rank_outcome(rank, proc, self.paths, time.time())


_PEER_LOST_WAIT_S = 2.0  # how long ranks that only lost their peer wait for the rank that caused it to be seen
