"""How a launch ended, as data: each rank's outcome (exit code, error record, hang) and the run's result —
which rank failed first and why, whether it is retryable, a usage error, a known failure — and its one-line report."""

from __future__ import annotations

import signal
from dataclasses import dataclass, field
from typing import Any

from workers.contract import ErrorRecord, FailureKind
from workers.rundir import RunDir

# How gloo and NCCL word a collective that timed out (gloo: "Timed out waiting 5000ms for recv operation to
# complete"; NCCL's watchdog: "Watchdog caught collective operation timeout").
_COLLECTIVE_TIMEOUTS = ("Timed out waiting", "collective operation timeout")


@dataclass(frozen=True)
class RankOutcome:
    """How one worker process ended."""

    rank: int
    exitcode: int | None  # None: still running when torn down (then killed)
    signal_name: str | None = None
    error: ErrorRecord | None = None  # the worker's error record (message, traceback), when it wrote one
    ended_at: float = 0.0  # when the launcher saw the process end
    hung: str | None = None  # why the launcher judged the rank hung (then it was killed)

    @property
    def failed(self) -> bool:
        return self.exitcode != 0 or self.hung is not None

    @property
    def collective_timeout(self) -> bool:
        """It failed because a collective timed out (``launch.collective_timeout_s``): some other rank never came."""
        return self.error is not None and any(s in self.error.message for s in _COLLECTIVE_TIMEOUTS)

    @property
    def lost_peer(self) -> bool:
        """It failed only because another rank vanished from a collective (its own error says so)."""
        return self.error is not None and self.error.lost_peer

    def describe(self) -> str:
        if self.hung:
            how = f"hung — {self.hung}"
        elif self.signal_name:
            how = f"killed by {self.signal_name}"
        else:
            how = f"exit code {self.exitcode}"
        return f"rank {self.rank}: {how}" + (f" — {self.error.message}" if self.error else "")


@dataclass
class RunResult:
    """Per-rank outcomes of one attempt; ``root_cause`` is the rank that failed first."""

    outcomes: dict[int, RankOutcome] = field(default_factory=dict)
    root_cause: RankOutcome | None = None
    stopped_by_signal: bool = False
    logs_hint: str = "the run's logs folder"  # where the per-rank error records are
    lost_run_dir: str | None = None  # the run dir (its lock) was deleted or replaced under the running group

    @property
    def ok(self) -> bool:
        return (
            self.lost_run_dir is None and self.root_cause is None and all(not o.failed for o in self.outcomes.values())
        )

    @property
    def failure_kind(self) -> FailureKind | None:
        """What the root cause reported; None when it wrote no record (a signal, a hard crash, a hang)."""
        return self.root_cause.error.kind if self.root_cause and self.root_cause.error else None

    @property
    def known_failure(self) -> bool:
        """The root cause is a failure the product understands (usage, checkpoint, disk, numerics): one line says
        it all."""
        return self.failure_kind is not None and self.failure_kind.known

    @property
    def usage_error(self) -> bool:
        return self.failure_kind is FailureKind.CONFIG

    @property
    def retryable(self) -> bool:
        """A restart can help (not a usage error, not a run dir without a usable checkpoint, not a lost run dir)."""
        return self.lost_run_dir is None and (self.failure_kind is None or self.failure_kind.retryable)

    @property
    def port_taken(self) -> bool:
        """Rank 0 could not listen on the rendezvous port: another process took it between our pick and its bind
        (:func:`free_port` can only pick a port that is free *now*). Nothing trained; the group can start again."""
        error = self.root_cause.error if self.root_cause else None
        return error is not None and "EADDRINUSE" in error.message and "failed to listen" in error.message

    def report(self) -> str:
        """A human report: the root cause with its traceback, then every rank's outcome."""
        if self.ok:
            return "all ranks finished"
        if self.lost_run_dir:
            return f"training stopped: {self.lost_run_dir}"
        rc = self.root_cause
        if rc.error is not None and rc.error.kind.known and not rc.hung:  # its message says all: one line
            return f"training failed: {rc.error.detail} [rank {rc.rank}; traceback in {self.logs_hint}]"
        lines = [f"training failed: rank {rc.rank} failed first ({rc.describe()})"]
        if rc.error and rc.error.traceback:
            lines += ["", f"traceback of rank {rc.rank}:", rc.error.traceback.rstrip()]
        lines += ["", f"all ranks (full tracebacks in {self.logs_hint}):"]
        for rank in sorted(self.outcomes):
            outcome = self.outcomes[rank]
            lines.append(f"  {outcome.describe()}")
            if outcome is not rc and outcome.error and outcome.error.traceback:
                where = [ln.strip() for ln in outcome.error.traceback.splitlines() if ln.strip().startswith("File")]
                lines += [f"      at {where[-1]}"] if where else []
        return "\n".join(lines)


def failure_order(outcome: RankOutcome) -> tuple[bool, float, float]:
    """Who failed first: a rank that merely reported the lost peer comes after any other failure; then the
    launcher's order of seeing the exits (``ended_at``); within one observation, a rank that died without an
    error record (a signal, a hard crash) first, then by the time each rank wrote its error record."""
    return outcome.lost_peer, outcome.ended_at, outcome.error.time if outcome.error else float("-inf")


def rank_outcome(rank: int, proc: Any, paths: RunDir, seen_at: float) -> RankOutcome:
    """How ``proc`` ended: its exit code or signal, and its error record (from its pipe, else its file)."""
    exitcode = proc.exitcode
    error = _piped_record(proc) or ErrorRecord.read(paths.error_file(rank))
    sig = signal.Signals(-exitcode).name if exitcode is not None and exitcode < 0 else None
    return RankOutcome(rank, exitcode, sig, error, seen_at)


def _piped_record(proc: Any) -> ErrorRecord | None:
    reader = getattr(proc, "report", None)
    try:
        return ErrorRecord.from_json(reader.recv_bytes().decode()) if reader is not None and reader.poll() else None
    except (EOFError, OSError, UnicodeDecodeError):
        return None
