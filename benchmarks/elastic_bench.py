"""Elastic capacity: from a failure to training again on what is left.

SLURM (the cluster named by SLURM_CONF, default slurm/dev-cluster.sh): the quickstart submitted with
``--nodes 1-2 --tasks-per-node 1``; once it trains (step 30, a checkpoint every 20 steps), node n2 is drained and
the rank on it SIGKILLed. Read back from the run dir: kill → the failure recorded by the batch script
(``slurm/events.jsonl``), → the requeued job started (on n1 alone: world size 1), → its first step; the steps redone
(logged before the kill, not in the checkpoint) and the samples skipped or repeated (the consumed-index audit
trail against the global stream: must be 0).

Local: ``--nproc 3 launch.min_nproc=2`` on a task whose worker on slot 2 fails after 30 micro-steps in every
attempt (benchmarks/broken_slot_task.py): the second failure drops the slot; read back: the slot dropped (the
launcher's event) → the first step on 2 workers.

    python benchmarks/elastic_bench.py [--trials 3] [--parts slurm local] [--out benchmarks/results/elastic.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
from recovery_bench import _rows, _wait  # (this folder is on sys.path: the benchmarks run as scripts)

from workers.data import GlobalOrder
from workers.rundir import RunDir

ROOT = Path(__file__).resolve().parents[1]
DEV_CONF = Path(os.environ.get("ORCH_SLURM_DIR", "/tmp/orch-slurm")) / "etc" / "slurm.conf"
GBS, EVERY = 64, 20


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "benchmarks")])}


def _skipped_or_repeated(run: Path, steps: int) -> int:
    """Samples of the first ``steps`` steps the run did not consume exactly once, in stream order (a step redone
    after the failure counts once: its last attempt's)."""
    consumed: dict[int, list[tuple]] = {}
    rows = [row for path in sorted(RunDir(run).samples.glob("rank-*.jsonl")) for row in _rows(path)]
    last = {row["step"]: max(r["attempt"] for r in rows if r["step"] == row["step"]) for row in rows}
    for row in rows:
        if row["attempt"] == last[row["step"]]:
            consumed.setdefault(row["step"], []).append((row["rank"], row["micro"], row["indices"]))
    stream = GlobalOrder(4096, 0).take(0, steps * GBS)
    got = [i for s in range(steps) for *_, ix in sorted(consumed.get(s, [])) for i in ix]
    return sum(1 for a, b in zip(got, stream, strict=False) if a != b) + abs(len(got) - len(stream))


def _rank_pid(job: str, rank: int) -> int:
    for proc in psutil.process_iter(["cmdline"]):
        try:
            env = proc.environ()
        except psutil.Error:
            continue
        if (
            env.get("SLURM_JOB_ID") == job
            and env.get("SLURM_PROCID") == str(rank)
            and "submitit" in " ".join(proc.info["cmdline"] or [])
        ):
            return proc.pid
    raise RuntimeError(f"rank {rank} of job {job} not found")


def _event(paths: RunDir, name: str, restart: int | None = None) -> dict | None:
    return next((e for e in _rows(paths.slurm_events) if e["event"] == name and restart in (None, e["restart"])), None)


def _queued(job: str) -> bool:
    return bool(subprocess.run(["squeue", "-h", "-j", job], check=False, capture_output=True, text=True).stdout.strip())


COMMON = [f"train.checkpoint_every={EVERY}", "train.log_every=1", "tracking.mode=disabled", "data.record_indices=true"]


def slurm_trial(base: Path, i: int) -> dict:
    run = base / f"slurm-{i}"
    cmd = [sys.executable, "-m", "orchestrator", "submit", "configs/quickstart.yaml", "--nodes", "1-2",
           "--tasks-per-node", "1", "--max-restarts", "1", f"run.dir={run}", "train.max_steps=100000",
           *COMMON]  # fmt: skip
    job = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, check=True).stdout.split()[0]
    paths = RunDir(run)
    try:
        _wait(lambda: any(r["step"] >= 30 for r in _rows(paths.metrics)), 180, "training on 2 nodes")
        subprocess.run(["scontrol", "update", "nodename=n2", "state=drain", "reason=elastic-bench"], check=True)
        t_kill = time.time()
        os.kill(_rank_pid(job, 1), 9)
        failed = _wait(lambda: _event(paths, "failed"), 60, "the failure recorded")
        start = _wait(lambda: _event(paths, "start", restart=1), 300, "the requeued start")
        first = _wait(lambda: next((r for r in _rows(paths.metrics) if r.get("restarts") == 1), None), 120, "a step")
        _wait(lambda: any(r["step"] >= first["step"] + 10 for r in _rows(paths.metrics)), 120, "training on")
    finally:
        subprocess.run(["scancel", job], check=False)
        subprocess.run(["scontrol", "update", "nodename=n2", "state=resume"], check=False)
        _wait(lambda: not _queued(job), 60, "the job to end")
    # (the rows logged after the checkpoint the requeued job resumed from were moved aside when it started)
    rows = [r for p in [paths.metrics, *paths.metrics_attempts()] for r in _rows(p)]
    logged = max(r["step"] for r in rows if r.get("restarts") == 0)
    resumed = first["step"] - 1
    return {
        "job": job, "kill_to_failure_recorded_s": failed["time"] - t_kill,
        "failure_recorded_to_restarted_s": start["time"] - failed["time"],
        "restarted_to_first_step_s": first["time"] - start["time"], "kill_to_first_step_s": first["time"] - t_kill,
        "world_size_before": 2, "world_size_after": start["world_size"], "resumed_from_step": resumed,
        "steps_redone": max(0, logged - resumed),
        "samples_skipped_or_repeated": _skipped_or_repeated(run, resumed + 10),
    }  # fmt: skip


def local_trial(base: Path, i: int) -> dict:
    run = base / f"local-{i}"
    cmd = [sys.executable, "-m", "orchestrator", "launch", "configs/quickstart.yaml", "--nproc", "3",
           "task.factory=broken_slot_task:build", "task.args={n: 4096, hidden: 64, broken_slot: 2, fail_after: 30}",
           "data.global_batch_size=48", "launch.min_nproc=2", "launch.max_restarts=3", "launch.grace_period_s=1",
           f"run.dir={run}", "train.max_steps=120", *COMMON]  # fmt: skip
    subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, check=True)
    paths = RunDir(run)
    dropped = next(e for e in _rows(paths.launch_events) if e["event"] == "slot-dropped")
    first = next(r for r in _rows(paths.metrics) if r["world_size"] == 2)
    return {
        "dropped_to_first_step_s": first["time"] - dropped["time"],
        "slot": dropped["slot"],
        "world_size_after": dropped["world_size"],
        "first_step_on_2": first["step"],
    }


def summarize(values: list[float]) -> dict:
    return {"median": round(statistics.median(values), 3), "min": round(min(values), 3), "max": round(max(values), 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--parts", nargs="+", default=["slurm", "local"])
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "elastic.json"))
    args = parser.parse_args()
    if "SLURM_CONF" not in os.environ and DEV_CONF.is_file():
        os.environ["SLURM_CONF"] = str(DEV_CONF)
    result: dict = {
        "benchmark": "elastic",
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
    }
    with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as tmp:
        if "slurm" in args.parts:
            trials = [slurm_trial(Path(tmp), i) for i in range(args.trials)]
            keys = ["kill_to_failure_recorded_s", "failure_recorded_to_restarted_s", "restarted_to_first_step_s",
                    "kill_to_first_step_s"]  # fmt: skip
            result["slurm"] = {
                "setup": "quickstart, --nodes 1-2 x 1 task, gloo/CPU, checkpoint every 20 steps; at step >= 30 drain "
                "n2 and SIGKILL its rank (slurm/dev-cluster.sh, sched_interval=1)",
                "summary": {k: summarize([t[k] for t in trials]) for k in keys},
                "samples_skipped_or_repeated": [t["samples_skipped_or_repeated"] for t in trials],
                "trials": trials,
            }  # fmt: skip
            print(json.dumps(result["slurm"]["summary"], indent=1), flush=True)
        if "local" in args.parts:
            trials = [local_trial(Path(tmp), i) for i in range(args.trials)]
            result["local"] = {
                "setup": "quickstart on 3 workers (global batch 48), slot 2 fails after 30 micro-steps in every "
                "attempt, launch.min_nproc=2",
                "summary": {"dropped_to_first_step_s": summarize([t["dropped_to_first_step_s"] for t in trials])},
                "trials": trials,
            }  # fmt: skip
            print(json.dumps(result["local"]["summary"], indent=1), flush=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
