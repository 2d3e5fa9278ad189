"""Evaluation: our exact distributed eval against a hand-written ``torch.no_grad()`` loop, and what evals cost
training.

- eval throughput: 2 ranks (gloo, one thread each) evaluate the same model on the same eval set — ours through
  :class:`workers.eval.evaluator.Evaluator` (what training and ``orchestrator eval`` run), the hand-written loop the
  way a user writes it: a ``DataLoader`` over the rank's contiguous slice, ``model.eval()``, ``torch.no_grad()``,
  the loss times the batch size summed, one all-reduce at the end. The two alternate in the same processes; each
  is timed from a barrier to the end of its all-reduce (the slower rank's time); ratio = hand-written time / ours
  per pair (goal ≥ 0.95).
- training cost of ``eval.every``: ``orchestrator launch configs/quickstart.yaml --nproc 2`` (its held-out set of
  512 samples, eval batch 32) with ``eval.every`` = 0, 100 and 10; training samples/s over the run (the wall clock
  from the end of step 10 to the end of the last step, evals included), runs interleaved, ratio to ``every=0``.

    python benchmarks/eval_bench.py [--repeats 3] [--out benchmarks/results/eval.json]
"""

from __future__ import annotations

import argparse
import gc
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
sys.path.insert(0, str(ROOT))

from benchmarks.loop_bench import summarize  # noqa: E402
from workers.contract import ENV_LAUNCHER  # noqa: E402
from workers.rundir import RunDir  # noqa: E402

GBS, WARM = 64, 10


# ---------------------------------------------------------------- eval throughput (2 ranks, in-process)


def _rank_main(rank: int, world: int, port: int, args: dict, out: str) -> None:
    import torch  # noqa: PLC0415
    import torch.distributed as dist  # noqa: PLC0415
    from torch.utils.data import DataLoader, Subset  # noqa: PLC0415

    from workers.dist import DistContext, autocast_for  # noqa: PLC0415
    from workers.eval.evaluator import Evaluator  # noqa: PLC0415
    from workers.tasks import resolve  # noqa: PLC0415
    from workers.tasks.quickstart import build  # noqa: PLC0415

    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
                       "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                       ENV_LAUNCHER: "bench"})  # fmt: skip
    torch.set_num_threads(1)
    ctx = DistContext.from_env("cpu")
    ctx.init_process_group(300)
    torch.manual_seed(0)
    task = resolve(build(n=256, hidden=args["hidden"], eval_n=args["eval_n"]))
    model, batch_size, n = task.model, args["batch"], len(task.eval_dataset)
    ours = Evaluator(task, model, ctx, batch_size, 0, lambda: autocast_for("fp32", ctx.device))
    ours.probe("loss")

    def hand_written() -> float:
        start, end = rank * n // world, (rank + 1) * n // world
        loader = DataLoader(Subset(task.eval_dataset, range(start, end)), batch_size=batch_size)
        sums = torch.zeros(2, dtype=torch.float64)
        model.eval()
        with torch.no_grad():
            for batch in loader:
                sums[0] += float(task.loss(model, batch)) * len(batch[0])
                sums[1] += len(batch[0])
        model.train()
        dist.all_reduce(sums)
        return float(sums[0] / sums[1])

    def timed(fn) -> float:
        gc.collect()  # both start from the same collector state: a full collection costs ~50 ms here at random
        dist.barrier()
        t0 = time.perf_counter()
        fn()
        took = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
        dist.all_reduce(took, op=dist.ReduceOp.MAX)
        return float(took)

    check = (ours.run().metrics["loss"], hand_written())  # warm both; and they agree
    pairs = []
    for i in range(args["repeats"]):  # alternate which goes first: neither always gets the warmer caches
        if i % 2:
            hand = timed(hand_written)
            pairs.append((timed(ours.run), hand))
        else:
            pairs.append((timed(ours.run), timed(hand_written)))
    if rank == 0:
        Path(out).write_text(json.dumps({"pairs": pairs, "ours_loss": check[0], "hand_loss": check[1]}))
    dist.destroy_process_group()


def eval_throughput(hidden: int, eval_n: int, batch: int, repeats: int, tmp: Path) -> dict:
    import torch.multiprocessing as mp  # noqa: PLC0415

    from orchestrator.launcher import free_port  # noqa: PLC0415

    out = tmp / f"eval-{hidden}.json"
    args = {"hidden": hidden, "eval_n": eval_n, "batch": batch, "repeats": repeats}
    mp.start_processes(_rank_main, args=(2, free_port(), args, str(out)), nprocs=2, start_method="spawn")
    got = json.loads(out.read_text())
    ratios = [hand / ours for ours, hand in got["pairs"]]
    return {
        "hidden": hidden, "eval_samples": eval_n, "batch_size": batch, "pairs": repeats,
        "ours_samples_per_s": summarize([eval_n / o for o, _ in got["pairs"]], 0),
        "handwritten_samples_per_s": summarize([eval_n / h for _, h in got["pairs"]], 0),
        "ratio": summarize(ratios), "goal": ">= 0.95", "met": statistics.median(ratios) >= 0.95,
        "same_loss": abs(got["ours_loss"] - got["hand_loss"]) <= 1e-6 * abs(got["hand_loss"]),
    }  # fmt: skip


# ---------------------------------------------------------------- training cost of eval.every


def train_rate(base: Path, every: int, steps: int) -> float:
    run = base / f"every{every}-{time.monotonic_ns()}"
    cmd = [sys.executable, "-m", "orchestrator", "launch", "configs/quickstart.yaml", "--nproc", "2",
           f"run.dir={run}", f"train.max_steps={steps}", f"train.checkpoint_every={steps}", "train.log_every=10",
           "tracking.mode=disabled", f"eval.every={every}"]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    env.pop("OMP_NUM_THREADS", None)
    subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    rows = {r["step"]: r for r in map(json.loads, RunDir(run).metrics.read_text().splitlines()) if "time" in r}
    return (steps - WARM) * GBS / (rows[steps]["time"] - rows[WARM]["time"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3, help="training runs per eval.every value")
    parser.add_argument("--eval-pairs", type=int, default=20, help="timed eval pairs per model size")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "eval.json")
    args = parser.parse_args()
    result: dict = {
        "benchmark": "eval",
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "throughput": [], "training_cost": {},
    }  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="eval-bench-") as tmp:
        for hidden, eval_n, batch in ((64, 65536, 256), (512, 65536, 256)):
            result["throughput"].append(eval_throughput(hidden, eval_n, batch, args.eval_pairs, Path(tmp)))
            print(json.dumps(result["throughput"][-1]), flush=True)
        everies = (0, 100, 10)
        rates: dict[int, list[float]] = {e: [] for e in everies}
        for _ in range(args.repeats):
            for every in everies:
                rates[every].append(train_rate(Path(tmp), every, args.steps))
        base = rates[0]
        result["training_cost"] = {
            "steps": args.steps, "eval_samples": 512, "eval_batch_size": 32,
            "runs": [{"every": e, "samples_per_s": summarize(rates[e], 0),
                      "ratio_to_off": summarize([r / b for r, b in zip(rates[e], base, strict=True)])}
                     for e in everies],
        }  # fmt: skip
        print(json.dumps(result["training_cost"]), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
