"""What a sweep adds per trial: a grid of 4 trials through ``orchestrator sweep`` against the same 4 runs launched
by hand one after another (``orchestrator launch`` each), wall-clock seconds, interleaved repeats; and on SLURM (the
cluster of SLURM_CONF, default the dev cluster) one array job (``sweep --slurm``) against 4 ``orchestrator
submit``s, from the first command to the last trial's completion.

The sweep's own work per trial: checking every trial's config up front, its state files (sweep.json, Optuna's
journal), reading each finished trial's metric, starting the launcher. Trials: the quickstart, 2 workers, 100 steps,
an eval every 50.

    python benchmarks/sweep_bench.py [--repeats 3] [--out benchmarks/results/sweep.json]
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

ROOT = Path(__file__).resolve().parents[1]
LRS = [0.001, 0.002, 0.003, 0.004]
BASE = ["train.max_steps=100", "eval.every=50", "task.args.eval_n=256", "tracking.mode=disabled",
        "train.checkpoint_every=50"]  # fmt: skip


def _run(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True)
    return time.perf_counter() - t0


def by_sweep(base: Path) -> float:
    grid = "optim.lr=[" + ",".join(map(str, LRS)) + "]"
    return _run([sys.executable, "-m", "orchestrator", "sweep", "configs/quickstart.yaml", "--dir",
                 str(base / f"sweep-{time.monotonic_ns()}"), "--nproc", "2", "--grid", grid, *BASE])  # fmt: skip


def by_hand(base: Path) -> float:
    root = base / f"hand-{time.monotonic_ns()}"
    return sum(_run([sys.executable, "-m", "orchestrator", "launch", "configs/quickstart.yaml", "--nproc", "2",
                     f"run.dir={root / str(lr)}", f"optim.lr={lr}", *BASE]) for lr in LRS)  # fmt: skip


SLURM = ["slurm.tasks_per_node=2", "slurm.time_min=10"]


def _wait_done(run_dirs: list[Path], timeout: float = 900) -> None:
    """Until every run dir's SLURM events end with its completion."""
    deadline = time.monotonic() + timeout
    while True:
        done = 0
        for run in run_dirs:
            events = run / "slurm" / "events.jsonl"
            lines = events.read_text().splitlines() if events.exists() else []
            done += bool(lines) and json.loads(lines[-1])["event"] == "completed"
        if done == len(run_dirs):
            return
        if time.monotonic() > deadline:
            raise TimeoutError("SLURM jobs did not complete")
        time.sleep(0.2)


def by_sweep_slurm(base: Path) -> float:
    sdir = base / f"sweep-slurm-{time.monotonic_ns()}"
    grid = "optim.lr=[" + ",".join(map(str, LRS)) + "]"
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "orchestrator", "sweep", "configs/quickstart.yaml", "--dir", str(sdir),
                    "--slurm", "--grid", grid, *BASE, *SLURM], cwd=ROOT, check=True, capture_output=True)  # fmt: skip
    trials = json.loads((sdir / "sweep.json").read_text())["trials"]
    _wait_done([sdir / t["id"] for t in trials])
    return time.perf_counter() - t0


def by_hand_slurm(base: Path) -> float:
    root = base / f"hand-slurm-{time.monotonic_ns()}"
    t0 = time.perf_counter()
    for lr in LRS:
        subprocess.run([sys.executable, "-m", "orchestrator", "submit", "configs/quickstart.yaml",
                        f"run.dir={root / str(lr)}", f"optim.lr={lr}", *BASE, *SLURM],
                       cwd=ROOT, check=True, capture_output=True)  # fmt: skip
    _wait_done([root / str(lr) for lr in LRS])
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "sweep.json"))
    parser.add_argument("--no-slurm", action="store_true")
    args = parser.parse_args()
    sweeps, hands, slurm_sweeps, slurm_hands = [], [], [], []
    with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as tmp:
        for _ in range(args.repeats):
            sweeps.append(by_sweep(Path(tmp)))
            hands.append(by_hand(Path(tmp)))
            if not args.no_slurm:
                slurm_sweeps.append(by_sweep_slurm(Path(tmp)))
                slurm_hands.append(by_hand_slurm(Path(tmp)))
    per_trial = [(s - h) / len(LRS) for s, h in zip(sweeps, hands, strict=True)]
    summary = lambda v: {"median": round(statistics.median(v), 3), "min": round(min(v), 3), "max": round(max(v), 3)}  # noqa: E731
    result = {
        "benchmark": "sweep",
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "setup": f"quickstart, 2 workers, a grid of {len(LRS)} learning rates, {' '.join(BASE)}",
        "sweep_s": summary(sweeps), "by_hand_s": summary(hands), "overhead_per_trial_s": summary(per_trial),
    }  # fmt: skip
    if slurm_sweeps:
        per = [(s - h) / len(LRS) for s, h in zip(slurm_sweeps, slurm_hands, strict=True)]
        result["slurm"] = {
            "setup": "the same 4 trials, each 2 tasks on one node of slurm/dev-cluster.sh (2 nodes): one array job "
            "(sweep --slurm) vs 4 `orchestrator submit`s, from the first command to the last completion",
            "sweep_s": summary(slurm_sweeps), "by_hand_s": summary(slurm_hands), "overhead_per_trial_s": summary(per),
        }  # fmt: skip
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
