"""The restart policy of a local launch: what to do after each attempt (torch elastic's agent, in small).

Mechanism — starting, watching and tearing down one group of workers — is orchestrator.launcher; this module only
decides, from an attempt's :class:`~orchestrator.launcher.RunResult`, whether the launch is done, failed, a usage
error, or gets another attempt from the latest checkpoint.
"""

from __future__ import annotations

import enum
import logging
import sys
import time
from collections.abc import Callable

from orchestrator.capacity import Capacity, Drop
from orchestrator.launcher import LocalLauncher, PrestartedGroup, SignalRelay
from orchestrator.outcome import RunResult
from workers.config import Config
from workers.contract import EXIT_FAILED, EXIT_OK, EXIT_USAGE
from workers.fsutil import RunDirLock, append_line
from workers.rundir import RunDir

log = logging.getLogger("orchestrator")


class Verdict(enum.Enum):
    """What an attempt's outcome means for the launch."""

    DONE = "done"  # every rank finished
    USAGE_ERROR = "usage error"  # the user must change something: one line, exit 2, no retry
    FAILED = "failed"  # not retryable, stopped by the user, or out of restarts
    RESTART = "restart"  # start a new group from the latest checkpoint


def decide(result: RunResult, stop_requested: bool, restarts: int, max_restarts: int) -> Verdict:
    """The policy. ``stop_requested``: the user asked the launch to stop (a stop is never answered by a restart)."""
    if result.ok:
        return Verdict.DONE
    if result.usage_error:
        return Verdict.USAGE_ERROR
    if stop_requested or result.stopped_by_signal or not result.retryable or restarts >= max_restarts:
        return Verdict.FAILED
    return Verdict.RESTART


def _announce(cfg: Config, paths: RunDir, nproc: int, restarts: int) -> None:
    """The first attempt is announced by rank 0's own first line (a usage error then stays one line); a restart here."""
    log.log(
        logging.INFO if restarts else logging.DEBUG, "launching %d worker(s), run dir %s%s", nproc, paths.root,
        f" (restart {restarts}/{cfg.launch.max_restarts})" if restarts else "",
    )  # fmt: skip


def _report_failure(
    result: RunResult, verdict: Verdict, capacity: Capacity, paths: RunDir, attempt: int, stopped: bool
) -> bool:
    """Report a failed attempt; count it against its device slot (which may be dropped before ``attempt``, the
    next). Returns True when the launch ends here (FAILED), with the slot that kept failing named."""
    drop = capacity.observe(result) if not stopped else None
    print(result.report(), file=sys.stderr)
    if verdict is Verdict.FAILED:
        if not stopped and (repeated := capacity.repeated()):
            print(f"the repeated cause: {repeated}", file=sys.stderr)
        return True
    if drop is not None:
        _dropped(paths, drop, attempt)
    return False


def _dropped(paths: RunDir, drop: Drop, attempt: int) -> None:
    """Say (console and the run's event log) that the next attempt runs without ``drop.slot``."""
    log.warning("%s", drop.describe())
    try:
        row = {"event": "slot-dropped", "time": time.time(), "attempt": attempt, "slot": drop.slot,
               "reason": drop.reason, "slots": list(drop.slots), "world_size": len(drop.slots)}  # fmt: skip
        append_line(paths.launch_events, row)
    except OSError as exc:  # a full disk must not turn a drop into a crash of the launcher
        log.error("cannot record the dropped slot in %s: %s", paths.launch_events, exc)


_PORT_RETRIES = 3  # starts again on a new port when rank 0 could not listen on the one picked (a race, not a fault)


def run_with_restarts(
    cfg: Config,
    paths: RunDir,
    group: PrestartedGroup,
    lock: RunDirLock | None = None,
    undo: Callable[[], None] | None = None,
) -> int:
    """Run attempts until the policy says stop; returns the launch's exit code. The first attempt uses the
    prestarted group; restarts spawn afresh. ``lock``: the launch's run-dir lock (watched while workers run).
    ``undo``: called, with the lock still held, when the *first* attempt ends in a usage error (bad input found by
    the workers leaves the run dir as it was; a later attempt's usage error leaves the run's own progress alone)."""
    restarts, prestarted, port_retries = 0, group, 0
    capacity = Capacity.of(cfg)
    # One signal relay for all attempts: a Ctrl-C during a teardown or between attempts still means "stop".
    with SignalRelay() as relay:
        while True:
            _announce(cfg, paths, len(capacity.slots), restarts)
            result = LocalLauncher(cfg, paths, capacity.slots, attempt=restarts, lock=lock).run(relay, prestarted)
            prestarted = None
            if result.port_taken and port_retries < _PORT_RETRIES and not relay.count:
                port_retries += 1  # not a restart: the group never rendezvoused, so nothing ran
                log.warning("the rendezvous port was taken meanwhile by another process: starting again on another")
                continue
            verdict = decide(result, relay.count > 0, restarts, cfg.launch.max_restarts)
            if verdict is Verdict.DONE:
                log.info("run finished: %s", paths.root)
                return EXIT_OK
            if verdict is Verdict.USAGE_ERROR:
                if restarts == 0 and undo is not None:
                    undo()
                print(f"orchestrator: error: {result.root_cause.error.detail}", file=sys.stderr)
                return EXIT_USAGE
            if _report_failure(result, verdict, capacity, paths, restarts + 1, stopped=relay.count > 0):
                return EXIT_FAILED
            restarts += 1
            log.warning("restarting the group from the latest checkpoint (%d/%d)", restarts, cfg.launch.max_restarts)
