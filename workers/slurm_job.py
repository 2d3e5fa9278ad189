"""The job side of SLURM: what each task of a submitted job runs, and what a preemption notice leads to.

Tasks reach :func:`workers.entry.run_worker` either through submitit (:class:`workers.entry.SlurmJob`) or a plain
``srun python -m workers CONFIG`` (``slurm/train.sbatch``); both take the same path from there:

1. SLURM sends the notice (``slurm.signal``, USR2 by default, ``slurm.signal_delay_s`` before the end; or
   ``scancel --signal=USR2``). Its handler only sets the stop flag (workers/stop.py).
2. Ranks agree at the next step boundary and all join a synchronous save (Trainer).
3. Rank 0 tells a time limit from a preemption, records the event, and requeues the job with
   ``scontrol requeue``; every rank exits cleanly. Timeouts requeue at most ``slurm.max_timeouts`` times.
4. The requeued job (same job id) resumes from that checkpoint like any other resume.

The run's SLURM history is ``RunDir.slurm_events`` (one JSON object per line: start, requeue, completed,
timeout-cap, ...), written by rank 0 and read by ``orchestrator status`` / ``submit --wait``. Torch-free; must not
import the entry points (they import this module) or the launch side.
"""

from __future__ import annotations

import logging
import os
import subprocess
import time
from typing import Any

from workers.config import Config
from workers.contract import first_failure
from workers.fsutil import append_line, read_lines
from workers.rundir import RunDir
from workers.stop import StopFlag

log = logging.getLogger("workers.slurm")
# SLURM checks time limits every ~30 s: a notice this close to the job's end time is the time limit, not a preemption.
_TIMEOUT_SLACK_S = 60


def job_id(env: dict[str, str] | None = None) -> str | None:
    env = os.environ if env is None else env
    return env.get("SLURM_JOB_ID")


def slurm_target(env: dict[str, str] | None = None) -> str:
    """What scontrol and squeue must be told to mean this job and nothing else: ``ARRAY_TASK`` for a task of an
    array (a sweep) — SLURM gives one task of an array the array's own id, and that bare id means every task —
    else the job id."""
    env = os.environ if env is None else env
    array, task = env.get("SLURM_ARRAY_JOB_ID"), env.get("SLURM_ARRAY_TASK_ID")
    return f"{array}_{task}" if array and task else (env.get("SLURM_JOB_ID") or "?")


def record_event(paths: RunDir, event: str, **fields: Any) -> None:
    """Append one event to the run's SLURM event log (rank 0 only; a line is one small write)."""
    row = {
        "event": event,
        "time": time.time(),
        "job_id": job_id(),
        "restart": int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0),
        **fields,
    }
    append_line(paths.slurm_events, row)


def read_events(paths: RunDir) -> list[dict[str, Any]]:
    """The run's SLURM events, oldest first (a torn or malformed line is skipped)."""
    return read_lines(paths.slurm_events)


def restart_counts(paths: RunDir) -> dict[str, float]:
    """For the metrics rows of a task of a SLURM job: its requeues so far and, of those, preemptions."""
    requeues = [e for e in read_events(paths) if e.get("event") == "requeue"]
    return {
        "restarts": float(os.environ.get("SLURM_RESTART_COUNT", "0") or 0),
        "preemptions": float(sum(1 for e in requeues if e.get("kind") == "preemption")),
    }


def parse_time_left(text: str) -> float | None:
    """squeue's ``%L`` (``[D-]HH:MM:SS``, ``MM:SS``, ``UNLIMITED``, ...) in seconds; None when not a duration."""
    days, _, clock = text.strip().rpartition("-")
    try:
        parts = [int(x) for x in clock.split(":")]
        seconds = sum(v * 60**i for i, v in enumerate(reversed(parts)))
        return seconds + (int(days) * 86400 if days else 0)
    except ValueError:
        return None


def _time_left(job: str) -> float | None:
    """Seconds until the job's time limit, from squeue (%L does not depend on SLURM_TIME_FORMAT)."""
    try:
        out = subprocess.run(
            ["squeue", "-h", "-j", job, "-o", "%L"], capture_output=True, text=True, timeout=30, check=True
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return parse_time_left(out.splitlines()[0]) if out else None


def classify_notice(job: str, signal_delay_s: int, signal_time: float | None) -> str:
    """``timeout`` when the notice came because the time limit is near, else ``preemption``."""
    left = _time_left(job)
    if left is None:
        return "preemption"
    left += time.time() - (signal_time or time.time())  # as it was when the signal came
    return "timeout" if left <= signal_delay_s + _TIMEOUT_SLACK_S else "preemption"


def on_start(cfg: Config, paths: RunDir, world_size: int) -> bool:
    """Rank 0, at the start of every job incarnation: account for an end of the previous one that nothing recorded
    (SLURM requeued the job itself: :func:`account_for_slurms_requeue`), then record this start. False: that end
    spent the job's restarts, and this incarnation must not train (the failure is recorded)."""
    restart = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
    if restart and not account_for_slurms_requeue(cfg, paths, restart):
        return False
    record_event(paths, "start", world_size=world_size, nodes=os.environ.get("SLURM_JOB_NODELIST"))
    if restart:
        log.info("SLURM job %s, requeue %d: resuming from the latest checkpoint", job_id(), restart)
    return True


def account_for_slurms_requeue(cfg: Config, paths: RunDir, restart: int) -> bool:
    """SLURM requeues a requeueable job itself when one of its nodes fails (``NODE_FAIL``: set DOWN, or lost): its
    ranks are then ended (SIGTERM: they save if they can and leave as if stopped) or vanish with the node, and no
    rank or batch script of ours says it failed. Seen from incarnation ``restart``: when the previous one ended
    without a requeue of ours and a node it ran on is down or failed, record the
    loss (``failed``, for that incarnation, by SLURM) and count it against ``launch.max_restarts`` like a failure
    :func:`on_exit` requeues. Returns False when the restarts were already spent: the job ends failed here."""
    job = job_id()
    mine = [e for e in read_events(paths) if e.get("job_id") == job]
    before = [e for e in mine if e.get("restart", 0) == restart - 1]
    start = next((e for e in before if e["event"] == "start"), None)
    if any(e["event"] == "failed" and not e.get("requeued") for e in mine):
        return False  # declared failed already (SLURM requeued it all the same): it does not train again
    if start is None or any(e["event"] == "requeue" or (e["event"] == "failed" and e.get("requeued")) for e in before):
        return True  # the job requeued itself (a notice, a failure: recorded then), or nothing is known of it
    lost = lost_nodes(str(start.get("nodes") or ""))
    if not lost:
        # it ended knowingly (stopped: a preemption SLURM requeues), or without a record on nodes that are all up:
        # a preemption or an admin's requeue whose SIGKILL came before the ranks could save is not a failure
        if not any(e["event"] in _ENDINGS for e in before):
            log.warning("job %s: the previous incarnation left no record; SLURM requeued it on nodes that are up "
                        "(a preemption?): not counted as a failure", job)  # fmt: skip
        return True
    spent = sum(1 for e in mine if e["event"] == "failed" and e.get("requeued"))
    error = f"node {', '.join(lost)} was lost"
    fields: dict[str, Any] = {
        "restart": restart - 1, "by": "slurm", "rank": None, "kind": "node", "error": error,
        "node": lost[0].split(" ")[0], "nodes": start.get("nodes"), "restarts_spent": spent,
    }  # fmt: skip
    if spent >= cfg.launch.max_restarts:
        why = f"launch.max_restarts={cfg.launch.max_restarts} spent"
        record_event(paths, "failed", requeued=False, why=why, **fields)
        log.error("job %s: %s (SLURM requeued the job); %s: not going on", job, error, why)
        return False
    record_event(paths, "failed", requeued=True, why=f"restart {spent + 1}/{cfg.launch.max_restarts}", **fields)
    log.warning("job %s: %s; SLURM requeued the job (restart %d/%d)", job, error, spent + 1, cfg.launch.max_restarts)
    return True


def lost_nodes(nodelist: str) -> list[str]:
    """The nodes of ``nodelist`` that SLURM has down or failed now, each with its reason ("n2 (down: reason)")."""
    if not nodelist:
        return []
    try:
        out = subprocess.run(["sinfo", "-h", "-N", "-n", nodelist, "-o", "%N|%T|%E"],
                             capture_output=True, text=True, timeout=30, check=True).stdout  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return []
    rows = sorted({tuple(line.split("|", 2)) for line in out.splitlines() if line.count("|") == 2})
    return [f"{node} ({state}: {reason})" for node, state, reason in rows if state.startswith(("down", "fail"))]


def on_finish(cfg: Config, paths: RunDir, stop: StopFlag, step: int, stop_reason: str | None) -> int:
    """Rank 0, after every rank has passed the final barrier: record the outcome and requeue after a notice.

    Returns the worker's exit code: 0, or 1 when the job cannot be requeued (time-limit cap, scontrol failure).
    """
    if stop_reason is None or step >= cfg.train.max_steps:  # a notice during the last step changes nothing
        record_event(paths, "completed", step=step)
        return 0
    if stop_reason != "preempt":
        record_event(paths, "stopped", step=step, signal_step=stop.signal_step)
        return 0
    job = job_id() or "?"
    kind = classify_notice(slurm_target(), cfg.slurm.signal_delay_s, stop.signal_time)
    mine = [e for e in read_events(paths) if e.get("job_id") == job]  # this job's requeues, not the run's
    timeouts = sum(1 for e in mine if e.get("event") == "requeue" and e.get("kind") == "timeout")
    fields = {"kind": kind, "saved_step": step, "signal_step": stop.signal_step}
    if kind == "timeout" and timeouts >= cfg.slurm.max_timeouts:
        record_event(paths, "timeout-cap", **fields)
        log.error(
            "job %s reached its time limit %d times (slurm.max_timeouts=%d): saved step %d, not requeued. "
            "Submit the run again to continue it",
            job, timeouts + 1, cfg.slurm.max_timeouts, step,
        )  # fmt: skip
        return 1
    try:
        _scontrol("requeue", slurm_target())
    except (OSError, subprocess.SubprocessError) as exc:
        detail = _said(exc)
        if _ALREADY_REQUEUED in detail:  # SLURM requeued it first (a node lost as the notice came)
            record_event(paths, "requeue", **fields)
            return 0
        record_event(paths, "requeue-failed", error=str(detail).strip(), **fields)
        log.error("could not requeue job %s: %s. Submit the run again to continue from step %d", job, detail, step)
        return 1
    # SLURM now ends this incarnation (SIGTERM, which only sets the flag again): a line is written well within
    # KillWait. Every step completed so far is in the checkpoint: the requeued job starts at step + 1.
    record_event(paths, "requeue", **fields)
    log.info(
        "%s notice for job %s (%s): saved step %d, the last completed step: 0 steps lost; requeued, the job "
        "resumes at step %d",
        kind, job, stop.describe(), step, step + 1,
    )  # fmt: skip
    return 0


# Events that say how an incarnation of the job ended, written while it ended knowingly (see :func:`on_exit`).
_ENDINGS = ("completed", "stopped", "requeue", "requeue-failed", "timeout-cap", "failed")


def on_exit(cfg: Config, paths: RunDir, step_status: int) -> bool:
    """The batch script, after its job step (``srun``) ended with ``step_status``: when the step failed without
    saying so itself — a crashed or OOM-killed rank, a lost node — record the failure in the events and requeue the
    job (``scontrol requeue``: the same job id, a new allocation of whatever node count SLURM grants in the range)
    up to ``launch.max_restarts`` times. A usage error or an unusable checkpoint never requeues. Nothing new is
    saved: the requeued job resumes from the last committed checkpoint. Returns whether it requeued."""
    job, restart = job_id(), int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
    jobs = [e for e in read_events(paths) if e.get("job_id") == job]
    mine = [e for e in jobs if e.get("restart", 0) == restart]
    if step_status == 0 or any(e["event"] in _ENDINGS for e in mine):
        return False  # it ended well, or a rank already said how it ended (a notice's requeue, a stop, ...)
    if any(e["event"] == "failed" and not e.get("requeued") for e in jobs):
        return False  # the job was declared failed (its restarts spent by a lost node: account_for_slurms_requeue)
    if requeued_by_slurm(_show_job(slurm_target()), restart):
        return False  # a lost node: SLURM requeued the job itself; its next incarnation accounts for that
    started = min((float(e.get("time", 0)) for e in mine if e["event"] == "start"), default=0.0)
    # (a rank that only saw its peer vanish is not the cause: the vanished rank, killed or its node lost, wrote none)
    failure = first_failure(paths, job, since=started, own=True)
    spent = sum(1 for e in read_events(paths) if e.get("job_id") == job and e["event"] == "failed" and e["requeued"])
    unreported = f"the job step ended with status {step_status}: a rank was killed, or a node was lost"
    fields: dict[str, Any] = {
        "step_status": step_status, "rank": failure.rank if failure else None,
        "error": failure.message if failure else unreported, "kind": failure.kind.value if failure else None,
        "nodes": os.environ.get("SLURM_JOB_NODELIST"), "restarts_spent": spent,
        "node": _node_of(failure.rank, cfg.slurm.tasks_per_node) if failure else None,
    }  # fmt: skip
    if failure is not None and not failure.kind.retryable:
        record_event(paths, "failed", requeued=False, why=f"not retryable ({failure.kind.value})", **fields)
        return False
    if spent >= cfg.launch.max_restarts:
        why = f"launch.max_restarts={cfg.launch.max_restarts} spent"
        record_event(paths, "failed", requeued=False, why=why, **fields)
        log.error("job %s failed (%s); %s: not requeued", job, fields["error"], why)
        return False
    record_event(paths, "failed", requeued=True, why=f"restart {spent + 1}/{cfg.launch.max_restarts}", **fields)
    exclude = nodes_failed_twice(paths, job) if cfg.slurm.min_nodes < cfg.slurm.max_nodes else []
    exclude = excludable(exclude, _show_job(slurm_target()), _partition_nodes(), cfg.slurm.min_nodes)
    try:  # (recorded first: SLURM ends this script the moment the requeue is accepted)
        _scontrol("requeuehold" if exclude else "requeue", slurm_target())
    except (OSError, subprocess.SubprocessError) as exc:
        if _ALREADY_REQUEUED in _said(exc):
            return True  # SLURM requeued it between the check above and this (a node lost meanwhile)
        record_event(paths, "requeue-failed", error=_said(exc))
        return False
    if exclude:
        _exclude_and_release(paths, slurm_target(), exclude)
    return True


_ALREADY_REQUEUED = "Job is pending execution"  # what ``scontrol requeue`` says of a job SLURM has requeued


def requeued_by_slurm(show: str, restart: int) -> bool:
    """Whether ``show`` (``scontrol show job -o``) says SLURM has requeued the job since incarnation ``restart``
    began: its restart count has moved on, or it is pending or being requeued again. (A node set DOWN under a job
    requeues it; the batch script, on a node still up, may run to its end all the same.)"""
    fields = dict(f.split("=", 1) for f in show.split() if "=" in f)
    state = fields.get("JobState", "")
    count = fields.get("Restarts", "")
    return (count.isdigit() and int(count) > restart) or state in ("PENDING", "REQUEUED", "REQUEUE_HOLD")


def _show_job(job: str) -> str:
    """``scontrol show job -o JOB``; empty when it cannot be asked (then nothing is known to have requeued it)."""
    try:
        return _scontrol("show", "job", "-o", job)
    except (OSError, subprocess.SubprocessError):
        return ""


def excludable(nodes: list[str], show: str, partition: list[str] | None, min_nodes: int) -> list[str]:
    """Of ``nodes`` (failed twice), those to exclude now: not excluded already (``show``: scontrol show job -o), and
    none at all when the partition's nodes left would be fewer than ``min_nodes`` (the job could never start
    again: a failure that follows a rank, not a node, would otherwise exclude healthy nodes one by one).
    ``partition`` None: unknown, nothing is excluded."""
    already = set(excluded_of(show))
    new = [n for n in nodes if n not in already]
    if not new or partition is None or len(set(partition) - already - set(new)) < min_nodes:
        if new:
            log.warning("node(s) %s failed twice but are not excluded: fewer than %d node(s) would be left",
                        ", ".join(new), min_nodes)  # fmt: skip
        return []
    return new


def excluded_of(show: str) -> list[str]:
    """The ExcNodeList of ``show`` (scontrol show job -o), as SLURM wrote it (one entry may be a hostlist)."""
    fields = dict(f.split("=", 1) for f in show.split() if "=" in f)
    had = fields.get("ExcNodeList", "(null)")
    return [] if had in ("(null)", "") else had.split(",")


def _partition_nodes() -> list[str] | None:
    """The nodes of this job's partition (sinfo); None when they cannot be listed."""
    part = os.environ.get("SLURM_JOB_PARTITION", "")
    try:
        out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N", *(["-p", part] if part else [])],
                             capture_output=True, text=True, timeout=30, check=True).stdout  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return sorted({line.strip() for line in out.splitlines() if line.strip()}) or None


def nodes_failed_twice(paths: RunDir, job: str | None) -> list[str]:
    """The nodes two or more of the job's failures happened on (a rank's, or a lost node's): left out of its next
    allocations (a node range only: a fixed node count could then never start)."""
    nodes = [e["node"] for e in read_events(paths) if e.get("job_id") == job and e["event"] == "failed"]
    return sorted({n for n in nodes if isinstance(n, str) and n and nodes.count(n) >= 2})


def _exclude_and_release(paths: RunDir, job: str, nodes: list[str]) -> None:
    """With the requeued job held (``scontrol requeuehold``; SLURM refuses ExcNodeList on a running job): add
    ``nodes`` to its excluded nodes, record that, and release it. The batch script ignores the SIGTERM the requeue
    brings (workers/slurm_exit.py), so this runs to the end."""
    try:
        excluded = ",".join([*excluded_of(_scontrol("show", "job", "-o", job)), *nodes])
        _scontrol("update", f"jobid={job}", f"ExcNodeList={excluded}")
        record_event(paths, "excluded", nodes=nodes, excluded=excluded, why="failed twice")
        log.warning("job %s: node(s) %s failed twice: excluded from its next allocations", job, ", ".join(nodes))
    except (OSError, subprocess.SubprocessError) as exc:
        record_event(paths, "exclude-failed", nodes=nodes, error=_said(exc))
    finally:
        try:
            _scontrol("release", job)
        except (OSError, subprocess.SubprocessError) as exc:
            record_event(paths, "requeue-failed", error=f"held, not released: {_said(exc)}")


def _scontrol(*args: str) -> str:
    return subprocess.run(["scontrol", *args], capture_output=True, text=True, timeout=60, check=True).stdout


def _said(exc: BaseException) -> str:
    return str(getattr(exc, "stderr", "") or exc).strip()


def _node_of(rank: int, tasks_per_node: int) -> str | None:
    """The node rank ``rank`` ran on: SLURM's default (block) layout of the job's tasks over its nodes."""
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", os.environ.get("SLURM_JOB_NODELIST", "")],
                             capture_output=True, text=True, timeout=30, check=True).stdout.split()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    index = rank // max(1, tasks_per_node)
    return out[index] if 0 <= index < len(out) else None
