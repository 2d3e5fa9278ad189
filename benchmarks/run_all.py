"""Run every benchmark on this machine, write ``benchmarks/results/*.json``, then render BENCHMARKS.md.

    python benchmarks/run_all.py            # everything (about 30 minutes on 2 cores, chaos included)
    python benchmarks/run_all.py --only loop checkpoint    # some of them, then the report
    python benchmarks/run_all.py --quick    # fewer repeats and trials, for a first look

The SLURM benchmark needs a cluster (SLURM_CONF, or the dev cluster of slurm/dev-cluster.sh); without one it is
skipped and its section keeps the previous result. Benchmarks are not part of the test suite.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def commands(quick: bool) -> dict[str, list[str]]:
    py = sys.executable
    return {
        "loop": [py, "benchmarks/loop_bench.py", "--repeats", "2" if quick else "3",
                 "--out", str(RESULTS / "loop.json")],
        "checkpoint": [py, "benchmarks/checkpoint_bench.py", "--repeats", "1" if quick else "3",
                       "--out", str(RESULTS / "checkpoint.json")],
        "recovery": [py, "benchmarks/recovery_bench.py", "--trials", "2" if quick else "5",
                     "--out", str(RESULTS / "recovery.json")],
        "slurm_requeue": [py, "benchmarks/slurm_requeue_bench.py", "--trials", "1" if quick else "3",
                          "--out", str(RESULTS / "slurm_requeue.json")],
        "tracking": [py, "benchmarks/tracking_bench.py", "--repeats", "1" if quick else "5",
                     "--out", str(RESULTS / "tracking.json")],
        "eval": [py, "benchmarks/eval_bench.py", "--repeats", "1" if quick else "3",
                 "--out", str(RESULTS / "eval.json")],
        "checksum": [py, "benchmarks/checksum_bench.py", "--repeats", "2" if quick else "5",
                     "--out", str(RESULTS / "checksum.json")],
        "guard": [py, "benchmarks/guard_bench.py", "--repeats", "1" if quick else "4",
                  "--out", str(RESULTS / "guard.json")],
        "sharded": [py, "benchmarks/sharded_bench.py", "--repeats", "1" if quick else "3",
                    "--out", str(RESULTS / "sharded.json")],
        "chaos-fsdp": [py, "scripts/chaos.py", "--trials", "3" if quick else "24", "--seed", "0", "--parallel",
                       "fsdp", "--out", str(RESULTS / "chaos-fsdp.json")],
        "diagnosis": [py, "benchmarks/diagnosis_bench.py", "--repeats", "1" if quick else "3",
                      "--out", str(RESULTS / "diagnosis.json")],
        "elastic": [py, "benchmarks/elastic_bench.py", "--trials", "1" if quick else "3",
                    "--out", str(RESULTS / "elastic.json")],
        "sweep": [py, "benchmarks/sweep_bench.py", "--repeats", "1" if quick else "3",
                  "--out", str(RESULTS / "sweep.json")],
        "scale": [py, "benchmarks/scale_bench.py", "--repeats", "1" if quick else "2",
                  "--out", str(RESULTS / "scale.json")],
        "chaos": [py, "scripts/chaos.py", "--trials", "5" if quick else "50", "--seed", "0",
                  "--out", str(RESULTS / "chaos.json")],
    }  # fmt: skip


def slurm_available() -> bool:
    if shutil.which("sbatch") is None:
        return False
    dev = Path(os.environ.get("ORCH_SLURM_DIR", "/tmp/orch-slurm")) / "etc" / "slurm.conf"
    if "SLURM_CONF" not in os.environ and dev.is_file():
        os.environ["SLURM_CONF"] = str(dev)
    ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, check=False)
    return "UP" in ping.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", nargs="+", default=None, choices=list(commands(False)))
    args = parser.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    for name, cmd in commands(args.quick).items():
        if args.only and name not in args.only:
            continue
        if name in ("slurm_requeue", "elastic") and not slurm_available():
            print(f"== {name}: skipped (no SLURM cluster answers; slurm/dev-cluster.sh up)", flush=True)
            continue
        run = [*cmd, "--no-slurm"] if name == "sweep" and not slurm_available() else cmd
        print(f"== {name}: {' '.join(run[1:])}", flush=True)
        subprocess.run(run, cwd=ROOT, env=env, check=True)
    subprocess.run([sys.executable, "benchmarks/report.py"], cwd=ROOT, check=True)


if __name__ == "__main__":
    main()
