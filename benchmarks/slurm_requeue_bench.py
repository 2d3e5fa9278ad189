"""Recovery on SLURM: from the preemption notice to the requeued job's first completed step.

Each trial submits the quickstart (2 tasks, gloo, CPU) to the SLURM cluster named by SLURM_CONF (default: the dev
cluster of slurm/dev-cluster.sh), waits until it trains, sends ``scancel --signal=USR2 JOBID`` and reads back:
- notice → saved: ranks agree at the next step, save synchronously, rank 0 records the requeue (events.jsonl);
- saved → restarted: SLURM requeues, schedules and starts the job again, and the workers import torch (the start
  event of restart 1 is written once rank 0 knows its rank, after the imports);
- restarted → first step: process group, model build, checkpoint load and verify, first step (metrics.jsonl);
- the total, and the steps lost: the last step the first incarnation logged (a metrics row every step) minus the
  saved step — work done before the requeue that the requeued job must redo.

    python benchmarks/slurm_requeue_bench.py [--trials 3] [--out benchmarks/results/slurm_requeue.json]
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

from workers.rundir import RunDir

ROOT = Path(__file__).resolve().parents[1]
DEV_CONF = Path(os.environ.get("ORCH_SLURM_DIR", "/tmp/orch-slurm")) / "etc" / "slurm.conf"


def _rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def _wait(pred, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.05)


def _squeue(job: str) -> str:
    return subprocess.run(["squeue", "-h", "-j", job], check=False, capture_output=True, text=True).stdout.strip()


def trial(base: Path, i: int) -> dict:
    run = base / f"run-{i}"
    cmd = [sys.executable, "-m", "orchestrator", "submit", "configs/quickstart.yaml", "--tasks-per-node", "2",
           f"run.dir={run}", "train.max_steps=1000000", "train.log_every=1", "train.checkpoint_every=1000000",
           "tracking.mode=disabled"]  # fmt: skip
    job = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()[0]
    try:
        _wait(lambda: any(r["step"] >= 50 for r in _rows(RunDir(run).metrics)), 120, "training to start")
        t_signal = time.time()
        subprocess.run(["scancel", "--signal=USR2", job], check=True)
        events = RunDir(run).slurm_events
        requeue = _wait(lambda: next((e for e in _rows(events) if e["event"] == "requeue"), None), 60, "requeue")
        start = _wait(lambda: next((e for e in _rows(events) if e["event"] == "start" and e["restart"] == 1), None),
                      300, "the requeued start")  # fmt: skip
        first = _wait(lambda: next((r for r in _rows(RunDir(run).metrics) if r.get("restarts") == 1), None),
                      120, "the first requeued step")  # fmt: skip
    finally:
        subprocess.run(["scancel", job], check=False)
        _wait(lambda: not _squeue(job), 60, "the cancelled job to end")
    return {
        "job": job,
        "notice_to_saved_s": requeue["time"] - t_signal,
        "saved_to_restarted_s": start["time"] - requeue["time"],
        "restarted_to_first_step_s": first["time"] - start["time"],
        "notice_to_first_step_s": first["time"] - t_signal,
        "saved_step": requeue["saved_step"],
        "first_step_after": first["step"],
        # steps the first incarnation completed that the checkpoint does not hold (redone after the requeue)
        "steps_lost": max(r["step"] for r in _rows(RunDir(run).metrics) if r.get("restarts") == 0)
        - requeue["saved_step"],
    }


def summarize(values: list[float]) -> dict:
    return {"median": round(statistics.median(values), 3), "min": round(min(values), 3), "max": round(max(values), 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "slurm_requeue.json"))
    args = parser.parse_args()
    if "SLURM_CONF" not in os.environ and DEV_CONF.is_file():
        os.environ["SLURM_CONF"] = str(DEV_CONF)
    with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as tmp:
        trials = [trial(Path(tmp), i) for i in range(args.trials)]
    keys = ["notice_to_saved_s", "saved_to_restarted_s", "restarted_to_first_step_s", "notice_to_first_step_s"]
    result = {
        "benchmark": "slurm_requeue",
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "cluster": "slurm/dev-cluster.sh (SLURM from Debian, 2 nodes on this machine, sched_interval=1)",
        "setup": "quickstart, 2 tasks on one node, gloo/CPU, scancel --signal=USR2 after step 50",
        "summary": {k: summarize([t[k] for t in trials]) for k in keys},
        "steps_lost": [t["steps_lost"] for t in trials],
        "trials": trials,
    }
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result["summary"], indent=1), "steps lost:", result["steps_lost"])


if __name__ == "__main__":
    main()
