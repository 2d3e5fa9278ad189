"""What ``orchestrator status`` and ``submit --wait`` say about a run's SLURM jobs once they ended: the job's
history (one line per incarnation's start and end, from ``RunDir.slurm_events``) and the report of a job that did
not complete (its first failing rank's traceback, log paths)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from workers.contract import first_failure
from workers.rundir import RunDir
from workers.slurm_job import read_events


def history(events: list[dict[str, Any]]) -> list[str]:
    """The run's SLURM history, one line per job incarnation's start and end (world size changes, failures and
    requeues included), oldest first."""
    lines = []
    for e in events:
        at = f"job {e.get('job_id')} (requeue {e.get('restart', 0)})"
        if e["event"] == "start":
            lines.append(f"{at}: started on {e.get('nodes')}, world size {e.get('world_size')}")
        elif e["event"] == "failed":
            then = "requeued" if e.get("requeued") else "not requeued"
            where = f" on {e['node']}" if e.get("node") else ""
            lines.append(f"{at}: failed{where} — {e.get('error')}; {then} ({e.get('why')})")
        elif e["event"] == "excluded":
            lines.append(f"{at}: {', '.join(e.get('nodes') or [])} failed twice: excluded from the next allocations")
        elif e["event"] == "requeue":
            lines.append(f"{at}: {e.get('kind')} notice, saved step {e.get('saved_step')}; requeued")
        else:
            lines.append(f"{at}: {e['event']}" + (f" at step {e['step']}" if "step" in e else ""))
    return lines


def failure_report(paths: RunDir, job: dict[str, Any], ended: str) -> str:
    """What a user needs when a job did not complete: how it ended (its SLURM state, described), the first failing
    rank's traceback, log paths."""
    lines = [f"job {job['job_id']} ended {ended}"]
    error = first_failure(paths, job["job_id"])
    if error:
        lines += [f"rank {error.rank} failed first: {error.message}", "", error.traceback.rstrip()]
    events = [e for e in read_events(paths) if e.get("job_id") == job["job_id"]]
    if events and events[-1]["event"] == "timeout-cap":
        saved = events[-1].get("saved_step", "?")
        lines.append(f"the job reached its time limit too often (slurm.max_timeouts); last saved step {saved}")
    if events and events[-1]["event"] == "failed" and not events[-1].get("requeued"):
        lines.append(f"not requeued: {events[-1].get('why')}")
        lines += [f"  {h}" for h in ["history:", *history(events)]]
    submitit_logs = f"  {job.get('submitit_dir')}/<job>_<task>_log.err|out"
    lines += ["", "logs:", f"  {paths.logs}/rank-<r>.log", submitit_logs]
    if not error:  # nothing of ours ran far enough to write an error file: show the task's own stderr
        tail = _tail(Path(job.get("submitit_dir", "")) / f"{job['job_id']}_0_log.err", 20)
        if tail:
            lines += ["", "task 0 stderr (last lines):", tail]
    return "\n".join(lines)


def _tail(path: Path, n: int) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""
