"""The launch side of SLURM: ``orchestrator submit`` (through submitit), ``--wait``, ``cancel``, and the SLURM part
of ``orchestrator status``.

The job side (what each task runs, preemption → save → requeue) is workers/slurm_job.py and workers.entry.SlurmJob.
Job ids are kept in ``RunDir.slurm_jobs``; the job side appends its events to ``RunDir.slurm_events``; submitit
keeps its scripts and per-task stdout/stderr under ``RunDir.submitit_job(<job id>)``. Live state comes from squeue,
then scontrol (finished jobs, for a while), then sacct (clusters with accounting).
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.slurm_history import failure_report, history
from workers.config import Config, SlurmConfig
from workers.contract import EXIT_FAILED, EXIT_OK
from workers.entry import SlurmJob
from workers.errors import ClusterRefusedError
from workers.fsutil import atomic_write
from workers.rundir import RunDir
from workers.slurm_job import read_events, record_event

# States after which a job never runs again. REQUEUED, PENDING, RUNNING, COMPLETING, ... are not in it. GONE: the
# controller has forgotten the job (it ended long ago) and no accounting remembers it. UNKNOWN (SLURM did not
# answer) is not final: the job may well be running.
TERMINAL = {
    "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
    "PREEMPTED", "REVOKED", "GONE",
}  # fmt: skip
PENDING_NOTE_EVERY_S = 60.0
LOST_CONTACT_S = 120.0
# Pending reasons that do not clear by waiting: the request does not fit the partition or its limits.
HOPELESS = {
    "PartitionNodeLimit": "more nodes than the partition allows",
    "PartitionTimeLimit": "a longer time limit than the partition allows",
    "PartitionConfig": "resources the partition does not offer",
    "BadConstraints": "a constraint no node satisfies",
    "DependencyNeverSatisfied": "a dependency that can no longer be satisfied",
    "InvalidAccount": "an invalid account",
    "InvalidQOS": "an invalid QOS",
}
HELD = ("JobHeldAdmin", "JobHeldUser", "launch failed requeued held")


@dataclass(frozen=True)
class JobState:
    state: str  # SLURM's state name (RUNNING, PENDING, COMPLETED, ...) or UNKNOWN when no tool knows the job
    reason: str = ""  # why a job is pending (Priority, Resources, BeginTime, ...)
    nodes: str = ""

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL

    @property
    def hopeless(self) -> str | None:
        """Why a pending job will never start by itself, or None."""
        if self.state != "PENDING":
            return None
        return next((why for key, why in HOPELESS.items() if self.reason.startswith(key)), None)

    def describe(self) -> str:
        extra = self.reason if self.state in ("PENDING", "UNKNOWN") else self.nodes
        text = self.state + (f" ({extra})" if extra and extra not in ("None", "(null)") else "")
        if self.hopeless:
            text += f": it asks for {self.hopeless} and will not start. HINT: orchestrator cancel, then resubmit"
        elif self.state == "PENDING" and self.reason.startswith(HELD):
            text += ": held. HINT: scontrol release <job id>, or orchestrator cancel"
        return text


def require_slurm() -> None:
    """ClusterRefusedError (exit 2) when the SLURM client commands are missing."""
    missing = [cmd for cmd in ("sbatch", "squeue", "scontrol", "scancel") if shutil.which(cmd) is None]
    if missing:
        raise ClusterRefusedError(
            f"SLURM not found: {', '.join(missing)} not on PATH. HINT: run this on a SLURM login node; for a local "
            'dev cluster: slurm/dev-cluster.sh up && eval "$(slurm/dev-cluster.sh env)"'
        )


# How long the controller may take to answer a ping: a live one answers in milliseconds; sbatch against a dead one
# would retry for MessageTimeout x retries (tens of seconds) before saying "Unable to contact slurm controller".
CONTROLLER_WAIT_S = 3.0


def require_controller() -> None:
    """ClusterRefusedError (exit 2) naming the controller when no SLURM controller answers (no configuration found,
    slurmctld down or unreachable), within :data:`CONTROLLER_WAIT_S` — before a job could be refused for it in
    words that blame the partition or the account."""
    where = f"SLURM_CONF={os.environ['SLURM_CONF']}" if "SLURM_CONF" in os.environ else "no SLURM_CONF set"
    hint = f"HINT: start slurmctld or point SLURM_CONF at the cluster's slurm.conf ({where})"
    rc, out, err = _run(["scontrol", "ping"], timeout=CONTROLLER_WAIT_S)
    said = " ".join((err or out).split())[:200] or f"exit {rc}"
    if rc == -1 and "timed out" in err.lower():
        raise ClusterRefusedError(
            f"the SLURM controller does not answer (no reply within {CONTROLLER_WAIT_S:g} s). {hint}"
        )
    if rc != 0 or "UP" not in out:
        raise ClusterRefusedError(f"no SLURM controller answers ({said}). {hint}")


def _run(cmd: list[str], timeout: float = 30) -> tuple[int, str, str]:
    """(exit code, stdout, stderr); exit code -1 when the command could not run at all or timed out."""
    try:
        proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.SubprocessError) as exc:
        return -1, "", str(exc)
    return proc.returncode, proc.stdout, proc.stderr


def _forgotten(stderr: str) -> bool:
    return "Invalid job id" in stderr


def job_state(job_id: str) -> JobState:
    """Where a job is now: squeue for live jobs, scontrol for recently finished ones, then sacct.

    GONE when the controller answers that it does not know the job (and no accounting does); UNKNOWN when SLURM
    could not be asked (controller down, timeout): callers must not take that for the job's end.
    """
    rc, out, err = _run(["squeue", "-h", "-j", job_id, "-o", "%T|%r|%N"])
    if rc == 0 and out.strip():
        state, reason, nodes = [*out.strip().splitlines()[0].split("|"), "", ""][:3]
        return JobState(state, reason, nodes)
    answered = rc == 0 or _forgotten(err)
    rc, out, err = _run(["scontrol", "show", "job", "-o", job_id])
    if rc == 0 and "JobState=" in out:
        fields = dict(item.split("=", 1) for item in out.split() if "=" in item)
        return JobState(fields.get("JobState", "UNKNOWN"), fields.get("Reason", ""), fields.get("NodeList", ""))
    answered = answered or _forgotten(err)
    rc, out, _ = _run(["sacct", "-n", "-X", "-P", "-j", job_id, "-o", "State"])
    if rc == 0 and out.strip():
        return JobState(out.strip().splitlines()[0].split()[0])
    return JobState("GONE") if answered else JobState("UNKNOWN", "SLURM did not answer")


def load_jobs(paths: RunDir) -> list[dict[str, Any]]:
    """The run's submitted jobs, oldest first; entries without a string ``job_id`` (a damaged file) are skipped."""
    try:
        jobs = json.loads(paths.slurm_jobs.read_text()) if paths.slurm_jobs.is_file() else []
    except (OSError, UnicodeDecodeError, ValueError):
        return []
    if not isinstance(jobs, list):
        return []
    return [j for j in jobs if isinstance(j, dict) and isinstance(j.get("job_id"), str)]


def add_job(paths: RunDir, job: dict[str, Any]) -> None:
    jobs = load_jobs(paths)
    jobs.append(job)
    paths.slurm_jobs.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(paths.slurm_jobs, json.dumps(jobs, indent=1))


def active_jobs(paths: RunDir) -> list[tuple[str, JobState]]:
    """Recorded jobs of this run dir that may still run (pending, running, requeued, held, or SLURM can't say)."""
    found = []
    for job in load_jobs(paths):
        state = job_state(job["job_id"])
        if not state.terminal:
            found.append((job["job_id"], state))
    return found


def executor_for(cfg: Config, paths: RunDir, folder: Path | None = None, teardown: list[str] | None = None) -> Any:
    """submitit's executor for ``cfg``'s job: its scripts and logs under ``folder`` (default: the run dir's), and
    ``teardown`` after the step (default: this run's requeue-on-failure)."""
    import submitit  # noqa: PLC0415 - only submit needs it

    s = cfg.slurm
    folder = folder or paths.submitit_job("%j")
    executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=s.max_timeouts)
    params: dict[str, Any] = {
        "job_name": s.job_name or paths.root.resolve().name,
        "cpus_per_task": s.cpus_per_task,
        "time": s.time_min,
        "signal_delay_s": s.signal_delay_s,
        **_shape(s),
        # The notice signal (submitit would set USR2 from its own env var) and requeueability, whatever the
        # cluster's default; then the user's own sbatch options, which win.
        "additional_parameters": {
            "signal": f"{s.signal}@{s.signal_delay_s}",
            "requeue": True,
            **_node_range(s),
            **s.additional,
        },
        # After the step: a failure no rank could report (a SIGKILLed rank, a lost node) requeues the job up to
        # launch.max_restarts times, on whatever node count SLURM grants then (workers/slurm_exit.py).
        "teardown": teardown if teardown is not None else requeue_on_failure([paths.root]),
    }
    optional = {
        "gpus_per_node": s.gpus_per_node or None, "mem": f"{s.mem_gb:g}G" if s.mem_gb else None,
        "partition": s.partition, "account": s.account, "qos": s.qos, "constraint": s.constraint,
        "setup": list(s.setup) or None,
    }  # fmt: skip
    params.update({k: v for k, v in optional.items() if v is not None})
    executor.update_parameters(**params)
    return executor


def _shape(s: SlurmConfig) -> dict[str, Any]:
    """Nodes and tasks. A fixed node count asks sbatch for ``--ntasks-per-node``. A range must not: SLURM then
    grants its minimum; it grants as many nodes as it can when each node is asked for CPUs instead (``--mincpus``,
    :func:`_node_range`), and the step places the tasks (``srun --ntasks-per-node``)."""
    # A task that fails takes the step down at once: the other ranks don't wait out the collective timeout.
    srun = ["--kill-on-bad-exit=1"]
    # (submitit counts tasks with "nodes": its largest value; the sbatch line gets the range)
    if s.min_nodes == s.max_nodes:
        return {"nodes": s.max_nodes, "ntasks_per_node": s.tasks_per_node, "srun_args": srun}
    return {"nodes": s.max_nodes, "srun_args": [*srun, f"--ntasks-per-node={s.tasks_per_node}"]}


def _node_range(s: SlurmConfig) -> dict[str, Any]:
    """The sbatch options of a node range (see :func:`_shape`); none for a fixed node count."""
    if s.min_nodes == s.max_nodes:
        return {}
    return {"nodes": f"{s.min_nodes}-{s.max_nodes}", "mincpus": s.tasks_per_node * s.cpus_per_task}


def requeue_on_failure(run_dirs: list[Path]) -> list[str]:
    """The batch script's lines after ``srun``: hand the step's exit status to the job side's failure handling.
    Several run dirs: an array job, one run dir per task (``SLURM_ARRAY_TASK_ID``)."""
    runs = " ".join(shlex.quote(str(r.resolve())) for r in run_dirs)
    command = shlex.join([sys.executable, "-m", "workers.slurm_exit"])
    which = '"${ORCH_RUNS[${SLURM_ARRAY_TASK_ID:-0}]}"'
    # (SIGTERM ignored from here on: a requeue of the job ends its batch script with one, and excluding a node
    # from the requeued job comes after that; KillWait's SIGKILL still bounds it)
    return ["ORCH_STEP_STATUS=$?", "trap '' TERM", f"ORCH_RUNS=({runs})", f'{command} {which} "$ORCH_STEP_STATUS"']


def submit(cfg: Config, paths: RunDir) -> str:
    """Submit the validated run; record and return the job id.

    Raises ClusterRefusedError when SLURM refuses the job (bad partition, account, ...), after removing what the attempt
    left in the run dir (and the run dir itself when this submission created it).
    """
    from submitit.core.utils import FailedJobError  # noqa: PLC0415 - only submit needs submitit

    existed = paths.root.exists()
    executor = executor_for(cfg, paths)
    try:
        with _captured_stderr() as captured:  # sbatch writes its refusal to our stderr: fold it into one message
            job = executor.submit(SlurmJob(cfg.to_dict()))
    except FailedJobError as exc:  # sbatch said no (nothing was queued)
        _clean_refused(paths, existed)
        said = [ln for ln in captured.read().splitlines() if ln.strip()] or str(exc).strip().splitlines()
        raise ClusterRefusedError(
            f"SLURM refused the job: {said[-1] if said else type(exc).__name__}. "
            "HINT: check slurm.partition / account / qos, --nodes/--tasks-per-node against sinfo, slurm.additional"
        ) from None
    s = cfg.slurm
    add_job(paths, {
        "job_id": str(job.job_id), "submitted": time.time(), "nodes": s.nodes, "tasks_per_node": s.tasks_per_node,
        "gpus_per_node": s.gpus_per_node, "world_size": s.world_size,
        "submitit_dir": str(paths.submitit_job(str(job.job_id))),
    })  # fmt: skip
    return str(job.job_id)


class _Captured:
    def __init__(self) -> None:
        self.file = tempfile.TemporaryFile(mode="w+b")  # noqa: SIM115 - closed by _captured_stderr

    text = ""

    def read(self) -> str:
        if self.file.closed:
            return self.text
        self.file.seek(0)
        return self.file.read().decode(errors="replace")


@contextlib.contextmanager
def _captured_stderr() -> Iterator[_Captured]:
    """Send file descriptor 2 (child processes included) to a temporary file for the duration."""
    captured = _Captured()
    sys.stderr.flush()
    saved = os.dup(2)
    os.dup2(captured.file.fileno(), 2)
    try:
        yield captured
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        captured.text = captured.read()
        captured.file.close()


def _clean_refused(paths: RunDir, existed: bool) -> None:
    """Remove what a refused submission wrote: submitit's staging files, or the run dir it created."""
    if not existed:
        shutil.rmtree(paths.root, ignore_errors=True)
        return
    staging = paths.submitit
    for path in staging.glob("*") if staging.is_dir() else []:
        if path.is_file():  # job folders (<job id>/) belong to earlier, accepted submissions
            path.unlink(missing_ok=True)
    for folder in (staging, staging.parent):
        with contextlib.suppress(OSError):
            folder.rmdir()  # only when empty


def cancel(paths: RunDir) -> tuple[list[str], list[str]]:
    """scancel every active job of the run dir (SLURM sends SIGTERM first: ranks save at the next step if they
    can within the cluster's KillWait). Returns (job ids cancelled, problems)."""
    require_slurm()
    cancelled, problems = [], []
    for job_id, state in active_jobs(paths):
        rc, _out, err = _run(["scancel", job_id])
        if rc == 0:
            record_event(paths, "cancelled", job_id=job_id)
            cancelled.append(job_id)
        else:
            problems.append(f"job {job_id} ({state.describe()}): scancel said {err.strip() or f'exit {rc}'}")
    return cancelled, problems


# ---------------------------------------------------------------- failures and following


class LogFollower:
    """Prints what is appended to a file (rank 0's log) from a given offset on."""

    def __init__(self, path: Path, offset: int) -> None:
        self.path, self.offset = path, offset

    def pump(self) -> None:
        try:
            with self.path.open("rb") as f:
                f.seek(self.offset)
                data = f.read()
        except OSError:
            return
        if data:
            self.offset += len(data)
            sys.stdout.write(data.decode(errors="replace"))
            sys.stdout.flush()


def log_offset(paths: RunDir) -> int:
    path = paths.rank_log(0)
    return path.stat().st_size if path.exists() else 0


def follow(paths: RunDir, job_id: str, offset: int = 0, poll_s: float = 1.0) -> int:
    """Follow a job to its end (requeues included), streaming rank 0's log. Exit code 0 when it completed, 1 when
    it ended otherwise, will never start, or SLURM stopped answering."""
    follower = LogFollower(paths.rank_log(0), offset)
    job = next((j for j in load_jobs(paths) if j["job_id"] == job_id), {"job_id": job_id})
    last, noted, answered = None, 0.0, time.monotonic()
    while True:
        state = job_state(job_id)
        follower.pump()
        now = time.monotonic()
        if state.describe() != last or (state.state == "PENDING" and now - noted > PENDING_NOTE_EVERY_S):
            note = "still " if state.describe() == last else ""
            print(f"[submit] job {job_id}: {note}{state.describe()}", file=sys.stderr, flush=True)
            last, noted = state.describe(), now
        if state.state != "UNKNOWN":
            answered = now
        elif now - answered > LOST_CONTACT_S:
            print(f"[submit] SLURM has not answered for {LOST_CONTACT_S:.0f} s; the job may still run. "
                  f"HINT: orchestrator status {paths.root}", file=sys.stderr)  # fmt: skip
            return EXIT_FAILED
        if state.hopeless:
            print(f"[submit] job {job_id} is still queued. HINT: orchestrator cancel {paths.root}", file=sys.stderr)
            return EXIT_FAILED
        if state.terminal:
            break
        time.sleep(poll_s)
    time.sleep(poll_s)  # the last lines may land just after the state changes
    follower.pump()
    events = [e for e in read_events(paths) if e.get("job_id") == job_id]
    if state.state == "COMPLETED" and events and events[-1]["event"] == "completed":
        print(f"[submit] job {job_id} completed at step {events[-1].get('step')}: {paths.root}", file=sys.stderr)
        return EXIT_OK
    print(failure_report(paths, job, state.describe()), file=sys.stderr)
    return EXIT_FAILED


def status_info(paths: RunDir) -> dict[str, Any]:
    """The SLURM part of ``orchestrator status`` (empty when the run was never submitted). Its ``state``, when
    present (failed: the latest job's own verdict), is the run's."""
    jobs = load_jobs(paths)
    events = read_events(paths)
    known = {j["job_id"] for j in jobs}
    for event in events:  # jobs started by plain sbatch (slurm/train.sbatch) only appear in the events
        if isinstance(event.get("job_id"), str) and event["job_id"] not in known:
            known.add(event["job_id"])
            jobs.append({"job_id": event["job_id"]})
    if not jobs:
        return {}
    latest = jobs[-1]
    state = job_state(latest["job_id"]) if shutil.which("squeue") else JobState("UNKNOWN", "no SLURM here")
    requeues = [e for e in events if e.get("event") == "requeue"]
    info: dict[str, Any] = {
        "slurm_jobs": [j["job_id"] for j in jobs],
        "slurm_state": f"job {latest['job_id']}: {state.describe()}",
        "requeues": len(requeues),
        "preemptions": sum(1 for e in requeues if e.get("kind") == "preemption"),
        "timeouts": sum(1 for e in requeues if e.get("kind") == "timeout"),
    }
    info["history"] = history(events)
    mine = [e for e in events if e.get("job_id") == latest["job_id"]]
    if state.state == "UNKNOWN":
        pass  # nothing can be said about the outcome
    elif state.state == "CANCELLED":
        info["note"] = "cancelled; submit the run again to resume from its latest checkpoint"
    elif state.terminal and not (mine and mine[-1]["event"] == "completed"):
        info["failure"] = failure_report(paths, latest, state.describe())
        if mine[-1:] and mine[-1]["event"] == "failed" and not mine[-1].get("requeued"):
            info["state"] = "failed"  # the job's own verdict (restarts spent, not retryable), error file or not
    return info
