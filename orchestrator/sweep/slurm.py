"""A sweep on SLURM: one array job through submitit, one array task per unfinished trial (each task may itself be
multi-node: the trials' ``slurm.*`` settings). Every task is an ordinary submitted run of its trial's run dir — a
preemption notice saves and requeues that task, a failed step requeues it up to ``launch.max_restarts`` — so the
array needs no supervisor of ours: ``sweep status`` reads the trials' run dirs, ``sweep cancel`` ends the array."""

from __future__ import annotations

import subprocess
import sys
import time
from typing import Any

from orchestrator import slurm_submit as slurm
from orchestrator.sweep.spec import SweepSpec
from orchestrator.sweep.store import SweepDir, SweepState, Trial
from workers.config import check_node_range
from workers.contract import EXIT_OK
from workers.entry import SlurmSweepTrial
from workers.errors import ClusterRefusedError
from workers.preflight import save_resolved_config
from workers.rundir import RunDir


def submit_array(
    spec: SweepSpec, sdir: SweepDir, state: SweepState, todo: list[Trial], env_of: Any, extra: list[str]
) -> int:
    """Submit ``todo`` as one array; record its job id in ``sweep.json``. ``env_of(trial)``: the trial's variables;
    ``extra``: overrides of every trial (the wandb group)."""
    if not todo:
        print(f"sweep {sdir.root}: every trial has finished", file=sys.stderr)
        return EXIT_OK
    slurm.require_slurm()
    slurm.require_controller()
    _refuse_while_active(sdir, state)
    cfgs = [spec.config_of(t.overrides, sdir.trial_dir(t.id), extra) for t in todo]
    for cfg in cfgs:
        check_node_range(cfg)
    runs = [RunDir(cfg.run.dir) for cfg in cfgs]
    executor = slurm.executor_for(cfgs[0], runs[0], folder=sdir.slurm / "%j",
                                  teardown=slurm.requeue_on_failure([r.root for r in runs]))  # fmt: skip
    executor.update_parameters(job_name=sdir.root.resolve().name, array_parallelism=len(todo))
    jobs = _submit(executor, [SlurmSweepTrial(cfg.to_dict(), env_of(t)) for cfg, t in zip(cfgs, todo, strict=True)])
    array = str(jobs[0].job_id).split("_")[0]
    for cfg, run, job in zip(cfgs, runs, jobs, strict=True):
        save_resolved_config(cfg, run)
        s = cfg.slurm  # (recorded in the trial's run dir: its `status` and `cancel` know its job)
        slurm.add_job(run, {"job_id": str(job.job_id), "submitted": time.time(), "nodes": s.nodes,
                            "tasks_per_node": s.tasks_per_node, "world_size": s.world_size})  # fmt: skip
    state.slurm_jobs.append(array)
    state.save(sdir)
    print(array)
    print(f"submitted array job {array}: {len(todo)} trial(s) of sweep {sdir.root}\n"
          f"  follow: orchestrator sweep status {sdir.root}    stop: orchestrator sweep cancel {sdir.root}",
          file=sys.stderr)  # fmt: skip
    return EXIT_OK


def _submit(executor: Any, tasks: list[SlurmSweepTrial]) -> list[Any]:
    """One array job of ``tasks``; ClusterRefusedError (one line, exit 2) when sbatch refuses it."""
    from submitit.core.utils import FailedJobError  # noqa: PLC0415

    try:
        with executor.batch():
            jobs = [executor.submit(task) for task in tasks]
    except FailedJobError as exc:
        said = [ln for ln in str(exc).strip().splitlines() if ln.strip()]
        raise ClusterRefusedError(
            f"SLURM refused the sweep's array job: {said[-1] if said else 'FailedJobError'}. HINT: check "
            "slurm.partition / account / qos, slurm.nodes against sinfo"
        ) from None
    return jobs


def _refuse_while_active(sdir: SweepDir, state: SweepState) -> None:
    """An earlier array job of the sweep still queued or running: its trials would be submitted twice."""
    for job in state.slurm_jobs:
        if not slurm.job_state(job).terminal:
            raise ClusterRefusedError(
                f"sweep dir '{sdir.root}' already has array job {job} queued or running. HINT: orchestrator sweep "
                f"status {sdir.root} follows it; orchestrator sweep cancel {sdir.root} ends it"
            )


def cancel(sdir: SweepDir, state: SweepState) -> int:
    """End the sweep's array job(s) (their tasks get SIGTERM first: they save if they can)."""
    if not state.slurm_jobs:
        print(f"sweep {sdir.root} has no SLURM job", file=sys.stderr)
        return EXIT_OK
    subprocess.run(["scancel", *state.slurm_jobs], check=False, capture_output=True, text=True)
    print(f"cancelled array job(s) {', '.join(state.slurm_jobs)}")
    return EXIT_OK
