"""Chaos test: SIGKILL a random rank at a random moment — including in the middle of a checkpoint write, sync or
async — of a run with launch.max_restarts, and check that it still finishes bitwise equal to an uninterrupted run.

    python scripts/chaos.py --trials 50 [--seed 0] [--parallel ddp|fsdp] [--out benchmarks/results/chaos.json]

With ``--parallel fsdp`` every rank writes its own shard of each checkpoint, and a mid-save kill may hit rank 1
while it writes its shard (after its first bytes); the comparison covers the sharded optimizer state too.

Prints one line per trial and ``survived/total``; writes the trials as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from workers.checkpoint import dcp_io
from workers.rundir import RunDir

ROOT = Path(__file__).resolve().parents[1]
SUPPORT = ROOT / "tests" / "support"  # test tasks: slow steps and the mid-save kill hook
MAX_STEPS, EVERY = 16, 4
COMMON = [
    "task.factory=orch_test_tasks:quick", "task.args={n: 200, hidden: 32}", f"train.max_steps={MAX_STEPS}",
    f"train.checkpoint_every={EVERY}", "data.global_batch_size=24", "train.grad_accum_steps=2",
    "tracking.mode=disabled", "train.log_every=4", "launch.grace_period_s=1", "launch.max_restarts=3",
]  # fmt: skip


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(SUPPORT), str(ROOT), env.get("PYTHONPATH", "")])
    env["ORCH_HEARTBEAT_INTERVAL_S"] = "0.02"  # fine-grained step reports, so kills land on the chosen step
    return env


def _cmd(run: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "orchestrator",
        "launch",
        "configs/quickstart.yaml",
        "--nproc",
        "2",
        f"run.dir={run}",
        *COMMON,
        *extra,
    ]


def _load(run: Path, name: str) -> dict:
    return torch.load(RunDir(run).step_dir(MAX_STEPS) / name, map_location="cpu", weights_only=True)


def _final_state(run: Path) -> tuple:
    """Model, optimizer file and (sharded runs) the gathered optimizer tensors of the final checkpoint."""
    folder = RunDir(run).step_dir(MAX_STEPS)
    shards = dcp_io.read_full(folder / "dcp", dcp_io.OPTIM_PREFIX) if (folder / "dcp").is_dir() else {}
    return _load(run, "model.pt"), _load(run, "optim.pt"), shards


def _equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def _heartbeat(run: Path, rank: int) -> dict | None:
    try:
        return json.loads(RunDir(run).heartbeat_file(rank).read_text())
    except (OSError, ValueError):
        return None


def trial(rng: random.Random, base: Path, index: int, ref: tuple, parallel: str) -> dict:
    run = base / f"trial-{index}"
    mode = rng.choice(["step", "step", "mid-save"])
    use_async = rng.random() < 0.5
    extra = ["task.args.step_sleep_s=0.05", f"train.parallel={parallel}"]
    extra += ["train.async_checkpoint=true"] if use_async else []
    record = {"trial": index, "mode": mode, "async": use_async}
    if mode == "mid-save":  # a rank kills itself inside a random checkpoint write (fsdp: rank 1 in its shard too)
        step = rng.choice(range(EVERY, MAX_STEPS + 1, EVERY))
        rank = rng.randrange(2) if parallel == "fsdp" else 0
        extra += [f"task.args.die_in_save={base / f'died-{index}'}", f"task.args.die_in_save_step={step}",
                  f"task.args.die_in_save_rank={rank}"]  # fmt: skip
        record.update(rank=rank, step=step)
    t0 = time.monotonic()
    proc = subprocess.Popen(
        _cmd(run, *extra),
        cwd=ROOT,
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    if mode == "step":
        rank, step = rng.randrange(2), rng.randrange(MAX_STEPS - 1)
        record.update(rank=rank, step=step)
        while proc.poll() is None:
            beat = _heartbeat(run, rank)
            if beat and beat["step"] >= step:
                time.sleep(rng.uniform(0, 0.1))  # anywhere inside the step, or its checkpoint
                try:
                    os.kill(beat["pid"], signal.SIGKILL)
                    record["killed"] = True
                except ProcessLookupError:
                    record["killed"] = False  # the rank was already gone: the run had finished
                break
            time.sleep(0.005)
    try:
        _, err = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        _, err = proc.communicate()
    record["restarts"] = err.count("restarting the group")
    record["seconds"] = round(time.monotonic() - t0, 1)
    record["exit"] = proc.returncode
    record.setdefault("killed", mode == "mid-save" and (base / f"died-{index}").exists())
    ok = proc.returncode == 0 and (record["restarts"] >= 1 or not record["killed"])
    ok = ok and _equal(_final_state(run), ref)
    record["survived"] = bool(ok)
    if not ok:
        record["stderr_tail"] = err[-2000:]
    return record


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--parallel", choices=("ddp", "fsdp"), default="ddp", help="train.parallel of every run")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory(prefix="chaos-") as tmp:
        base = Path(tmp)
        reference = _cmd(base / "reference", f"train.parallel={args.parallel}")
        subprocess.run(reference, cwd=ROOT, env=_env(), check=True, capture_output=True)
        ref = _final_state(base / "reference")
        trials = []
        for i in range(args.trials):
            rec = trial(rng, base, i, ref, args.parallel)
            trials.append(rec)
            print(
                f"trial {i:3d}: {rec['mode']:8s} async={rec['async']!s:5s} rank {rec['rank']} step {rec['step']:2d} "
                f"restarts {rec['restarts']} {rec['seconds']:5.1f}s -> {'survived' if rec['survived'] else 'LOST'}",
                flush=True,
            )
    survived = sum(t["survived"] for t in trials)
    killed = sum(bool(t.get("killed")) for t in trials)
    print(
        f"{survived}/{len(trials)} survived (final weights and optimizer bitwise equal to an uninterrupted run); "
        f"{killed} trials really killed a rank (the others' target had already finished)"
    )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        summary = {
            "survived": survived,
            "total": len(trials),
            "killed": killed,
            "seed": args.seed,
            "parallel": args.parallel,
            "machine": platform.platform(),
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "trials": trials,
        }
        args.out.write_text(json.dumps(summary, indent=1) + "\n")
    return 0 if survived == len(trials) else 1


if __name__ == "__main__":
    sys.exit(main())
