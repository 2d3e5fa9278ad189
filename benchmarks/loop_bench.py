"""Our loop and launcher against the hand-written DDP loop under torchrun (benchmarks/handwritten_ddp.py).

- step overhead: throughput of ``orchestrator launch`` vs the hand-written loop, world size 2, gloo, same model,
  data, global batch, optimizer, schedule and clipping; the two interleaved, ratio per pair (goal ≥ 0.99);
- launch latency: from the command's start to the first completed step, and to the process's exit, of
  ``orchestrator launch`` vs ``torchrun`` running the hand-written loop (goal ≤ torchrun);
- scaling: our samples/s at world sizes 1 and 2 on this machine.

    python benchmarks/loop_bench.py [--repeats 3] [--steps 3000] [--out benchmarks/results/loop.json]

Throughput is measured the same way for both: wall-clock time between the end of step ``warm`` (10) and the end
of the last step, as each run records it itself (our metrics.jsonl rows carry ``time``; the hand-written loop
writes its own). Ours runs with its defaults except ``tracking.mode=disabled`` (the hand-written loop has no
tracker; tracking has its own benchmark) and no periodic checkpoint (the final one comes after the last step).
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
GBS, WARM = 64, 10


def _run(cmd: list[str]) -> None:
    """Run to the end; one retry (torchrun's standalone rendezvous now and then fails to start on a busy box)."""
    for attempt in (1, 2):
        proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, check=False)
        if proc.returncode == 0:
            return
        print(f"failed (attempt {attempt}): {' '.join(cmd[1:4])}: {proc.stderr.strip()[-500:]}", file=sys.stderr)
    raise RuntimeError(f"{cmd} failed twice")


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "benchmarks"), env.get("PYTHONPATH", "")])
    env.pop("OMP_NUM_THREADS", None)  # both pick threads per worker themselves (cores // workers)
    return env


# The default path: a task that declares nothing (benchmarks/plain_task.py), so per-sample seeding is on.
PLAIN = ["task.factory=plain_task:build", "task.args={n: 4096}"]


def ours(base: Path, nproc: int, steps: int, hidden: int | None, extra: list[str]) -> dict:
    """``hidden`` None: the plain task (``extra`` = PLAIN)."""
    run = base / f"ours-{time.monotonic_ns()}"
    model = [f"task.args.hidden={hidden}"] if hidden is not None else []
    cmd = [sys.executable, "-m", "orchestrator", "launch", "configs/quickstart.yaml", "--nproc", str(nproc),
           f"run.dir={run}", f"train.max_steps={steps}", f"train.checkpoint_every={steps}", "train.log_every=10",
           *model, "tracking.mode=disabled", *extra]  # fmt: skip
    t0 = time.time()
    _run(cmd)
    t_exit = time.time()
    rows = {r["step"]: r for r in map(json.loads, RunDir(run).metrics.read_text().splitlines())}
    return _times(t0, rows[1]["time"], rows[WARM]["time"], rows[steps]["time"], t_exit, steps)


def handwritten(base: Path, nproc: int, steps: int, hidden: int | None, loop: str = "dataloader") -> dict:
    """``hidden`` None: the plain task. ``loop``: the hand-written loop's data path (benchmarks/handwritten_ddp.py)."""
    out = base / f"hand-{time.monotonic_ns()}.json"
    model = ["--hidden", str(hidden)] if hidden is not None else ["--task", "plain"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--standalone",
           "benchmarks/handwritten_ddp.py", "--steps", str(steps), "--warm", str(WARM), *model,
           "--gbs", str(GBS), "--loop", loop, "--out", str(out)]  # fmt: skip
    t0 = time.time()
    _run(cmd)
    t_exit = time.time()
    t = json.loads(out.read_text())
    return _times(t0, t["first"], t["warm"], t["end"], t_exit, steps)


def _times(t0: float, first: float, warm: float, end: float, t_exit: float, steps: int) -> dict:
    return {
        "samples_per_s": (steps - WARM) * GBS / (end - warm),
        "to_first_step_s": first - t0,
        "to_exit_s": t_exit - t0,
    }


def summarize(values: list[float], digits: int = 3) -> dict:
    return {
        "median": round(statistics.median(values), digits),
        "min": round(min(values), digits),
        "max": round(max(values), digits),
    }


def floor(base: Path, steps: int, repeats: int) -> dict:
    """Ours against the floor on the plain task (2 ranks, 32 samples each): an ideal loop (every batch gathered up
    front: only compute, all-reduce, optimizer) and a fetch loop (``dataset[i]`` and ``default_collate`` each step,
    no DataLoader). Interleaved repeats."""
    runs: dict[str, list[float]] = {"ours": [], "ideal": [], "fetch": []}
    for _ in range(repeats):
        runs["ours"].append(ours(base, 2, steps, None, PLAIN)["samples_per_s"])
        for loop in ("ideal", "fetch"):
            runs[loop].append(handwritten(base, 2, steps, None, loop)["samples_per_s"])
    of_ideal = [o / i for o, i in zip(runs["ours"], runs["ideal"], strict=True)]
    of_fetch = [o / f for o, f in zip(runs["ours"], runs["fetch"], strict=True)]
    return {
        "task": "benchmarks/plain_task.py, 2 ranks x 32 samples", "steps": steps,
        **{f"{k}_samples_per_s": summarize(v, 1) for k, v in runs.items()},
        "ratio_of_ideal": summarize(of_ideal), "ratio_of_fetch": summarize(of_fetch),
        "goal": "ours >= 0.90 of ideal and >= 0.95 of fetch",
        "met": statistics.median(of_ideal) >= 0.90 and statistics.median(of_fetch) >= 0.95,
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--launch-steps", type=int, default=20, help="steps of the launch-latency runs")
    parser.add_argument("--hidden", type=int, nargs="+", default=[64, 512])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "loop.json")
    parser.add_argument(
        "--sections",
        nargs="+",
        default=["overhead", "plain", "floor", "launch", "scaling"],
        help="rerun some; others kept from --out",
    )
    args = parser.parse_args()
    result: dict = {
        "benchmark": "loop",
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "setup": f"quickstart task, global batch {GBS}, gloo/CPU, {args.repeats} interleaved repeats",
        "step_overhead": [],
        "scaling": [],
    }
    sections = ("step_overhead", "plain", "floor", "launch", "scaling")
    if args.out.exists() and set(args.sections) != {"overhead", "plain", "floor", "launch", "scaling"}:
        kept = json.loads(args.out.read_text())
        result.update({k: kept[k] for k in sections if k in kept})
    with tempfile.TemporaryDirectory(prefix="loop-bench-") as tmp:
        base = Path(tmp)
        for hidden in args.hidden if "overhead" in args.sections else []:
            if hidden == args.hidden[0]:
                result["step_overhead"] = []
            pairs = [(ours(base, 2, args.steps, hidden, []), handwritten(base, 2, args.steps, hidden))
                     for _ in range(args.repeats)]  # fmt: skip
            goal = 0.97 if hidden <= 64 else 0.99  # issue 16: a 2.3 ms step may keep 3 %, a real one 1 %
            ratios = [a["samples_per_s"] / b["samples_per_s"] for a, b in pairs]
            result["step_overhead"].append({
                "hidden": hidden, "steps": args.steps,
                "ours_samples_per_s": summarize([a["samples_per_s"] for a, _ in pairs], 1),
                "handwritten_samples_per_s": summarize([b["samples_per_s"] for _, b in pairs], 1),
                "ratio": summarize(ratios), "goal": f">= {goal}", "met": statistics.median(ratios) >= goal,
            })  # fmt: skip
            print(json.dumps(result["step_overhead"][-1]), flush=True)
        if "plain" in args.sections:
            pairs = [(ours(base, 2, args.steps, None, PLAIN), handwritten(base, 2, args.steps, None))
                     for _ in range(args.repeats)]  # fmt: skip
            ratios = [a["samples_per_s"] / b["samples_per_s"] for a, b in pairs]
            result["plain"] = {
                "task": "benchmarks/plain_task.py: nn.Linear(10, 2), TensorDataset, declares nothing "
                "(per-sample seeding on)", "steps": args.steps,
                "ours_samples_per_s": summarize([a["samples_per_s"] for a, _ in pairs], 1),
                "handwritten_samples_per_s": summarize([b["samples_per_s"] for _, b in pairs], 1),
                "ratio": summarize(ratios), "goal": ">= 0.95", "met": statistics.median(ratios) >= 0.95,
            }  # fmt: skip
            print(json.dumps(result["plain"]), flush=True)
        if "floor" in args.sections:
            result["floor"] = floor(base, args.steps, args.repeats)
            print(json.dumps(result["floor"]), flush=True)
        launches = [(ours(base, 2, args.launch_steps, 64, []), handwritten(base, 2, args.launch_steps, 64))
                    for _ in range(args.repeats if "launch" in args.sections else 0)]  # fmt: skip
        if launches:
            first = statistics.median([a["to_first_step_s"] - b["to_first_step_s"] for a, b in launches])
            result["launch"] = {
                "steps": args.launch_steps,
                **{f"ours_{k}": summarize([a[k] for a, _ in launches]) for k in ("to_first_step_s", "to_exit_s")},
                **{f"torchrun_{k}": summarize([b[k] for _, b in launches]) for k in ("to_first_step_s", "to_exit_s")},
                "met": first <= 0,
            }
            print(json.dumps(result["launch"]), flush=True)
        if "scaling" in args.sections:
            result["scaling"] = []
        for hidden in args.hidden if "scaling" in args.sections else []:
            runs: dict[int, list[float]] = {1: [], 2: []}
            for _ in range(args.repeats):  # interleaved
                for ws, rates in runs.items():
                    rates.append(ours(base, ws, args.steps, hidden, [])["samples_per_s"])
            result["scaling"].append({
                "hidden": hidden,
                **{f"ws{ws}_samples_per_s": summarize(v, 1) for ws, v in runs.items()},
                "speedup": round(statistics.median(runs[2]) / statistics.median(runs[1]), 3),
            })  # fmt: skip
            print(json.dumps(result["scaling"][-1]), flush=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
