"""Local recovery: from the SIGKILL of a rank to the restarted group's first completed step.

Each trial launches the quickstart on 2 gloo workers with ``launch.max_restarts=1`` and a metrics row every step,
waits until step 50, SIGKILLs rank 1 (its pid from its heartbeat file) and reads back from the run's own files:
- kill → the restarted group's first step beyond those already logged (the launcher's detection, teardown of the
  other rank, spawn of the new group, checkpoint load, and the steps redone since that checkpoint);
- the steps redone: the last step the first group logged minus the checkpoint step the restart resumed from.

    python benchmarks/recovery_bench.py [--trials 5] [--out benchmarks/results/recovery.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from workers.rundir import RunDir

ROOT = Path(__file__).resolve().parents[1]


def _rows(path: Path) -> list[dict]:
    out = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def _wait(pred, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not (value := pred()):
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.02)
    return value


def trial(base: Path, i: int, every: int) -> dict:
    run = base / f"run-{i}"
    cmd = [sys.executable, "-m", "orchestrator", "launch", "configs/quickstart.yaml", "--nproc", "2",
           f"run.dir={run}", "train.max_steps=1000000", "train.log_every=1", f"train.checkpoint_every={every}",
           "launch.max_restarts=1", "launch.grace_period_s=1", "tracking.mode=disabled"]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # fmt: skip
    try:
        _wait(lambda: any(r["step"] >= 50 for r in _rows(RunDir(run).metrics)), 120, "training to start")
        pid = json.loads(RunDir(run).heartbeat_file(1).read_text())["pid"]
        t_kill = time.time()
        os.kill(pid, signal.SIGKILL)
        first = _wait(lambda: next((r for r in _rows(RunDir(run).metrics) if r.get("restarts") == 1), None),
                      120, "the restarted group's first step")  # fmt: skip
        last_before = max(r["step"] for r in _rows(RunDir(run).metrics) if r.get("restarts") == 0)
        # metrics.jsonl does not repeat steps it already has: where the restart resumed is in rank 0's log
        resumed = [ln for ln in RunDir(run).rank_log(0).read_text().splitlines() if "resumed from" in ln]
        resumed_at = int(re.search(r"step-(\d{8})", resumed[-1]).group(1))
    finally:
        os.killpg(proc.pid, signal.SIGINT)  # graceful stop of the restarted group, then make sure
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return {
        "kill_to_first_step_s": first["time"] - t_kill,
        "last_step_before": last_before,
        "resumed_at": resumed_at,
        "steps_redone": last_before - resumed_at,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--checkpoint-every", type=int, default=25)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "recovery.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="recovery-bench-", ignore_cleanup_errors=True) as tmp:
        trials = [trial(Path(tmp), i, args.checkpoint_every) for i in range(args.trials)]
    values = [t["kill_to_first_step_s"] for t in trials]
    result = {
        "benchmark": "recovery",
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "setup": f"quickstart, 2 gloo workers, checkpoint every {args.checkpoint_every} steps, SIGKILL of rank 1 "
        "after step 50, launch.max_restarts=1",
        "kill_to_first_step_s": {
            "median": round(statistics.median(values), 3), "min": round(min(values), 3), "max": round(max(values), 3)
        },
        "steps_redone": [t["steps_redone"] for t in trials],
        "trials": trials,
    }  # fmt: skip
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: result[k] for k in ("kill_to_first_step_s", "steps_redone")}))


if __name__ == "__main__":
    main()
