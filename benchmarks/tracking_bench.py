"""What tracking costs per step: no logging vs metrics.jsonl only vs metrics.jsonl + wandb (offline), at the
default log interval (train.log_every=10), 2 gloo workers, interleaved repeats.

    python benchmarks/tracking_bench.py [--repeats 5] [--steps 3000 1500 300] [--hidden 64 512 2048] [--no-pin]
        [--out benchmarks/results/tracking.json]

Throughput is taken from the run's own clock: (steps between two log points) / (time between them), which
includes everything the loop does, logging included; the first window (start-up) is dropped. "No logging" runs
with log_every larger than the run, so the loop only times itself at step 1 and at the end.

Each worker is pinned to its own core as soon as it is spawned (all its threads then, and every thread it starts
later, inherit the pin; the launcher and wandb's service stay free): on 2 shared cores, unpinned runs of the same
config differ by up to 10 % from the scheduler's placement alone, which hides effects of 1 %.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from workers.rundir import RunDir

ROOT = Path(__file__).resolve().parents[1]
GBS = 64  # configs/quickstart.yaml
MODES = {
    "no logging": ["tracking.mode=disabled", "train.log_every=1000000"],
    "jsonl only": ["tracking.mode=disabled", "train.log_every=10"],
    "jsonl + wandb offline": ["tracking.mode=offline", "train.log_every=10"],
}


def pin_workers(proc: subprocess.Popen, nproc: int) -> None:
    """Pin each of the launcher's ``nproc`` worker processes (every thread it has now) to its own core."""
    workers: list[psutil.Process] = []
    deadline = time.monotonic() + 60
    while len(workers) < nproc and proc.poll() is None and time.monotonic() < deadline:
        workers = [c for c in psutil.Process(proc.pid).children() if "spawn_main" in " ".join(c.cmdline())]
        time.sleep(0.02)
    cores = sorted(os.sched_getaffinity(0))
    for i, worker in enumerate(sorted(workers, key=lambda w: w.pid)):
        for thread in worker.threads():
            with contextlib.suppress(OSError):
                os.sched_setaffinity(thread.id, {cores[i % len(cores)]})


def settle(timeout_s: float = 30.0) -> None:
    """Wait until nothing of the previous run is left (wandb's service can outlive its run by a moment)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        left = [p for p in psutil.process_iter(["cmdline"]) if any("wandb-core" in a for a in p.info["cmdline"] or [])]
        if not left:
            break
        time.sleep(0.2)
    time.sleep(0.5)


def run_once(base: Path, name: str, overrides: list[str], steps: int, hidden: int, pin: bool) -> tuple:
    run = base / f"{name.replace(' ', '_')}-{time.monotonic_ns()}"
    cmd = [
        sys.executable,
        "-m",
        "orchestrator",
        "launch",
        "configs/quickstart.yaml",
        "--nproc",
        "2",
        f"run.dir={run}",
        f"train.max_steps={steps}",
        f"train.checkpoint_every={steps}",
        f"task.args.hidden={hidden}",
        *overrides,
    ]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if pin:
        pin_workers(proc, 2)
    _, err = proc.communicate()
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{err[-3000:]}")
    rows = [json.loads(line) for line in RunDir(run).metrics.read_text().splitlines()]
    # Each row's samples_per_s covers the window since the previous row; from step 1 (start-up excluded) on.
    seconds = sum((b["step"] - a["step"]) * GBS / b["samples_per_s"] for a, b in itertools.pairwise(rows))
    # direct cost on rank 0's training thread: reading the values, building the row, the sinks (metrics.jsonl,
    # the queue put to wandb's thread) and the console line. The gather travels with the stop check.
    direct = (rows[-1]["logging_s_total"] - rows[0]["logging_s_total"]) / seconds
    # off the training thread: the orch-wandb process and wandb's service report their CPU time per row
    found = re.findall(r"([\d.]+) ms of CPU a row", RunDir(run).rank_log(0).read_text())
    wandb_cpu_ms = float(found[-1]) if found else None
    return (rows[-1]["step"] - rows[0]["step"]) / seconds, direct, wandb_cpu_ms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--hidden", type=int, nargs="+", default=[64, 512, 2048])
    parser.add_argument("--steps", type=int, nargs="+", default=[3000, 1500, 300], help="per --hidden, in order")
    parser.add_argument("--no-pin", action="store_true", help="leave the workers where the scheduler puts them")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if len(args.steps) != len(args.hidden):
        parser.error("give one --steps value per --hidden value")
    results = []
    with tempfile.TemporaryDirectory(prefix="track-bench-") as tmp:
        for hidden, steps in zip(args.hidden, args.steps, strict=True):
            rates: dict[str, list[float]] = {m: [] for m in MODES}
            direct: dict[str, list[float]] = {m: [] for m in MODES}
            wandb_cpu: list[float] = []
            for repeat in range(args.repeats):  # interleaved: each repeat runs every mode once, in a rotated order
                names = list(MODES)
                for name in names[repeat % len(names) :] + names[: repeat % len(names)]:
                    settle()
                    rate, share, cpu_ms = run_once(Path(tmp), name, MODES[name], steps, hidden, pin=not args.no_pin)
                    rates[name].append(rate)
                    direct[name].append(share)
                    if cpu_ms is not None:
                        wandb_cpu.append(cpu_ms)
            base = statistics.median(rates["no logging"])
            for name, vals in rates.items():
                med = statistics.median(vals)
                # paired: each run against the no-logging run of the same repeat
                paired = [100 * (b / v - 1) for b, v in zip(rates["no logging"], vals, strict=True)]
                share = 100 * statistics.median(direct[name])
                results.append(
                    {
                        "hidden": hidden,
                        "steps": steps,
                        "mode": name,
                        "steps_per_s": {"median": med, "min": min(vals), "max": max(vals)},
                        "step_ms": 1000 / med,
                        "end_to_end_overhead_pct": 100 * (base / med - 1),
                        "paired_overhead_pct": {
                            "median": statistics.median(paired), "min": min(paired), "max": max(paired)
                        },
                        "rank0_logging_work_pct_of_time": share,
                    }
                )  # fmt: skip
                if name == "jsonl + wandb offline" and wandb_cpu:
                    # CPU the wandb side used per row, as a share of the CPU time one log interval gives one core
                    ms = statistics.median(wandb_cpu)
                    results[-1]["wandb_cpu_ms_per_row"] = ms
                    results[-1]["wandb_cpu_pct_of_one_core"] = 100 * ms / (10 * 1000 / med)
                print(
                    f"hidden {hidden:4d}  {name:22s} {med:8.1f} steps/s ({min(vals):.1f}-{max(vals):.1f})  "
                    f"{1000 / med:6.3f} ms/step  vs no logging {100 * (base / med - 1):+6.2f} % "
                    f"(paired {statistics.median(paired):+.2f} %, {min(paired):+.2f}..{max(paired):+.2f})  "
                    f"rank-0 logging work {share:5.2f} % of the time"
                    + (
                        f"  wandb CPU {results[-1]['wandb_cpu_ms_per_row']:.2f} ms/row"
                        if wandb_cpu and "wandb" in name
                        else ""
                    ),
                    flush=True,
                )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        meta = {
            "machine": platform.platform(), "cpus": os.cpu_count(), "repeats": args.repeats,
            "pinned": not args.no_pin, "log_every": 10,
        }  # fmt: skip
        args.out.write_text(json.dumps({"meta": meta, "results": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
