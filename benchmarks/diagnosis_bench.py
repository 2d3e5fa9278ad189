"""The cost of a hang report: how long reading every rank's stacks takes (py-spy, in parallel, ``--nonblocking``),
on a running 2-rank run and with one rank frozen by SIGSTOP; and, end to end, the seconds from a SIGSTOP to the
launcher's exit with ``launch.hang_timeout_s`` = T (detection: T plus the heartbeat's 1 s; then the report, then
the teardown's grace period).

    python benchmarks/diagnosis_bench.py [--repeats 3] [--out benchmarks/results/diagnosis.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from orchestrator.stacks import capture, live_ranks  # noqa: E402
from workers.rundir import RunDir  # noqa: E402

HANG_TIMEOUT_S = 3
GRACE_S = 1


def summary(xs: list[float]) -> dict[str, float]:
    return {"median": round(statistics.median(xs), 3), "min": round(min(xs), 3), "max": round(max(xs), 3)}


def start(run: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "orchestrator", "launch", "configs/quickstart.yaml", "--nproc", "2", f"run.dir={run}",
           "train.max_steps=1000000", "train.checkpoint_every=100000", "tracking.mode=disabled",
           f"launch.hang_timeout_s={HANG_TIMEOUT_S}", f"launch.grace_period_s={GRACE_S}"]  # fmt: skip
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # fmt: skip


def wait_running(paths: RunDir, proc: subprocess.Popen) -> dict[int, int]:
    deadline = time.monotonic() + 120
    while len(pids := live_ranks(paths)) < 2:
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"the run did not start: {proc.stderr.read() if proc.stderr else ''}")
        time.sleep(0.1)
    time.sleep(2)  # past the first steps
    return pids


def one_trial(base: Path, r: int) -> tuple[float, float, float]:
    run = base / f"run-{r}"
    proc = start(run)
    try:
        pids = wait_running(RunDir(run), proc)
        t0 = time.perf_counter()
        assert all(not s.problem for s in capture(pids, RunDir(run)))
        running = time.perf_counter() - t0
        os.kill(pids[1], signal.SIGSTOP)
        stopped_at = time.perf_counter()
        t0 = time.perf_counter()
        assert all(not s.problem for s in capture(pids, RunDir(run)))
        frozen = time.perf_counter() - t0
        proc.communicate(timeout=120)
        to_exit = time.perf_counter() - stopped_at
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert (run / "logs" / "stacks-0.txt").is_file(), "no hang report was written"
    return running, frozen, to_exit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "diagnosis.json")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            rows.append(one_trial(Path(tmp), r))
            print(f"trial {r}: capture {rows[-1][0]:.3f} s running, {rows[-1][1]:.3f} s frozen; "
                  f"SIGSTOP -> exit {rows[-1][2]:.2f} s", flush=True)  # fmt: skip
    result = {
        "benchmark": "diagnosis", "machine": platform.machine(), "cpus": os.cpu_count(),
        "setup": f"quickstart, 2 ranks, launch.hang_timeout_s={HANG_TIMEOUT_S}, launch.grace_period_s={GRACE_S}",
        "capture_running_s": summary([x[0] for x in rows]), "capture_frozen_s": summary([x[1] for x in rows]),
        "sigstop_to_exit_s": summary([x[2] for x in rows]), "hang_timeout_s": HANG_TIMEOUT_S, "grace_s": GRACE_S,
    }  # fmt: skip
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
