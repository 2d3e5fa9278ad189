"""What tracking costs per step: no logging vs metrics.jsonl only vs metrics.jsonl + wandb (offline), at the
default log interval (train.log_every=10), 2 gloo workers, interleaved repeats.

    python benchmarks/tracking_bench.py [--repeats 3] [--steps 1500] [--hidden 64 512 2048] [--large-steps 300]
        [--out benchmarks/results/tracking.json]

Throughput is taken from the run's own clock: (steps between two log points) / (time between them), which
includes everything the loop does, logging included; the first window (start-up) is dropped. "No logging" runs
with log_every larger than the run, so the loop only times itself at step 1 and at the end.
"""

from __future__ import annotations

import argparse
import itertools
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
GBS = 64  # configs/quickstart.yaml
MODES = {
    "no logging": ["tracking.mode=disabled", "train.log_every=1000000"],
    "jsonl only": ["tracking.mode=disabled", "train.log_every=10"],
    "jsonl + wandb offline": ["tracking.mode=offline", "train.log_every=10"],
}


def run_once(base: Path, name: str, overrides: list[str], steps: int, hidden: int) -> float:
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
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    # Each row's samples_per_s covers the window since the previous row; from step 1 (start-up excluded) on.
    seconds = sum((b["step"] - a["step"]) * GBS / b["samples_per_s"] for a, b in itertools.pairwise(rows))
    # direct cost on rank 0: the sinks and the console line (metrics.jsonl, the wandb queue put) and, apart, the
    # all-gather at log steps (mostly waiting for the slower rank: a wait the next all-reduce would have anyway)
    sinks = (rows[-1]["logging_s_total"] - rows[0]["logging_s_total"]) / seconds
    gather = (rows[-1]["gather_s_total"] - rows[0]["gather_s_total"]) / seconds
    return (rows[-1]["step"] - rows[0]["step"]) / seconds, sinks, gather


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--hidden", type=int, nargs="+", default=[64, 512, 2048])
    parser.add_argument(
        "--large-steps", type=int, default=300, help="steps for models wider than 512 (~60 ms steps at 2048)"
    )
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory(prefix="track-bench-") as tmp:
        for hidden in args.hidden:
            rates: dict[str, list[float]] = {m: [] for m in MODES}
            direct: dict[str, list[float]] = {m: [] for m in MODES}
            gathers: dict[str, list[float]] = {m: [] for m in MODES}
            for _ in range(args.repeats):  # interleaved
                for name, overrides in MODES.items():
                    steps = args.steps if hidden <= 512 else args.large_steps
                    rate, share, gather = run_once(Path(tmp), name, overrides, steps, hidden)
                    rates[name].append(rate)
                    direct[name].append(share)
                    gathers[name].append(gather)
            base = statistics.median(rates["no logging"])
            for name, vals in rates.items():
                med = statistics.median(vals)
                share = 100 * statistics.median(direct[name])
                gather = 100 * statistics.median(gathers[name])
                results.append(
                    {
                        "hidden": hidden,
                        "mode": name,
                        "steps_per_s": {"median": med, "min": min(vals), "max": max(vals)},
                        "step_ms": 1000 / med,
                        "end_to_end_overhead_pct": 100 * (base / med - 1),
                        "sinks_and_console_pct_of_time": share,
                        "log_step_all_gather_pct_of_time": gather,
                    }
                )
                print(
                    f"hidden {hidden:4d}  {name:22s} {med:8.1f} steps/s ({min(vals):.1f}-{max(vals):.1f})  "
                    f"{1000 / med:6.3f} ms/step  end-to-end vs no logging {100 * (base / med - 1):+6.2f} %  "
                    f"sinks+console {share:5.2f} %  all-gather {gather:5.2f} % of the time"
                )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        meta = {"machine": platform.platform(), "cpus": os.cpu_count(), "repeats": args.repeats, "steps": args.steps}
        args.out.write_text(json.dumps({"meta": meta, "results": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
