"""Sharded training (``train.parallel=fsdp``) against DDP: memory per rank, checkpoint save and load, step speed.

Real gloo process groups of 2 and 3 CPU processes (torch.multiprocessing), our own code paths: workers.parallel's
``shard`` (FSDP2 ``fully_shard`` on each layer, then the root) or DDP, AdamW, and workers.checkpoint's
Checkpointer (sharded: every rank writes its DCP shard; ddp: rank 0 writes everything).

1. memory — bytes each rank holds of parameters + gradients + optimizer state after one AdamW step (the local
   shards of DTensors), fsdp vs ddp at world sizes 2 and 3; the goal is fsdp <= 1/ws + 10 % of ddp. Also the
   process's peak RSS (everything: torch itself, DDP's gradient buckets, FSDP's all-gather buffers).
2. checkpoint — at ~100 MB and ~1 GB of state (model + AdamW moments), world size 2: a blocking save (training
   blocked until committed), an async save (blocked only for the staging copy; then until committed), and a load,
   fsdp vs ddp (rank 0 writes the whole state). Times are the slowest rank's.
3. throughput — steady-state steps/s of a 4-layer MLP (width 1024, batch 64 per rank), fsdp vs ddp, ws 2. On CPU
   FSDP pays an all-gather per layer per forward and backward that DDP does not: reported, not a goal.

    python benchmarks/sharded_bench.py [--sizes-mb 100 1000] [--repeats 3] [--out benchmarks/results/sharded.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import socket
import statistics
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import psutil
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from workers.checkpoint import Checkpointer, HeldState, OptimizerState, SavePlan
from workers.config import TrainConfig
from workers.contract import TrainState
from workers.dist import DistContext
from workers.parallel import parameters_bytes, shard
from workers.rundir import RunDir
from workers.tasks import resolve

WIDTH = 1024


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _model(total_mb: float) -> nn.Sequential:
    """Layers of WIDTH x WIDTH whose parameters plus AdamW's two moments take about ``total_mb`` MB (fp32)."""
    layers = max(2, round(total_mb * 1e6 / 4 / 3 / (WIDTH * WIDTH)))
    return nn.Sequential(*[nn.Linear(WIDTH, WIDTH) for _ in range(layers)])


def _build(mode: str, ctx: DistContext, total_mb: float) -> tuple[nn.Module, nn.Module, torch.optim.Optimizer]:
    """(the model as trained, the bare model, AdamW over it) after one step, so every state tensor exists."""
    torch.manual_seed(0)
    bare = _model(total_mb)
    if mode in ("fsdp", "hsdp"):  # hsdp: groups of 2 ranks
        no_hooks = resolve(SimpleNamespace(model=bare, dataset=[], loss=None))  # default units: the direct children
        trained = shard(bare, no_hooks, ctx, TrainConfig(parallel=mode, shard_size=2 if mode == "hsdp" else None))
    else:
        trained = nn.parallel.DistributedDataParallel(bare)
    opt = torch.optim.AdamW(trained.parameters(), lr=1e-3)
    _step(trained, opt)
    return trained, bare, opt


def _step(model: nn.Module, opt: torch.optim.Optimizer, batch: int = 64) -> None:
    x = torch.randn(batch, WIDTH)
    model(x).square().mean().backward()
    opt.step()
    opt.zero_grad(set_to_none=False)  # keep the gradients allocated: they count, as in training


def _memory(mode: str, ctx: DistContext, total_mb: float) -> dict[str, Any]:
    trained, _, opt = _build(mode, ctx, total_mb)
    params = list(trained.parameters())
    state = [t for s in opt.state.values() for t in s.values() if isinstance(t, torch.Tensor) and t.dim()]
    out = {
        "params": parameters_bytes(params),
        "grads": parameters_bytes(p.grad for p in params if p.grad is not None),
        "optim": parameters_bytes(state),
        "peak_rss": _peak_rss(),
    }
    out["total"] = out["params"] + out["grads"] + out["optim"]
    return out


def _peak_rss() -> int:
    """This process's peak resident set (Linux: VmHWM), else its current RSS."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return psutil.Process().memory_info().rss


def _slowest(seconds: float) -> float:
    t = torch.tensor([seconds], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def _checkpoint(mode: str, ctx: DistContext, total_mb: float, repeats: int, base: Path) -> dict[str, Any]:
    trained, _, opt = _build(mode, ctx, total_mb)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    state = TrainState(step=1, samples_seen=1, world_size=ctx.world_size, global_batch_size=1, seed=0, parallel=mode)
    times: dict[str, list[float]] = {k: [] for k in ("sync_s", "async_blocked_s", "async_total_s", "load_s")}
    for r in range(repeats):
        for use_async in (False, True):
            root = base / f"{mode}-{total_mb}-{r}-{int(use_async)}"
            held = HeldState(dataclasses.replace(state, step=r + 1), SavePlan(export_model=False))
            ckpt = Checkpointer(
                RunDir(root), ctx, model=trained, optim=OptimizerState(trained, opt, sched, scaler), progress=held,
                keep=1, async_save=use_async, sharded=mode != "ddp",
            )  # fmt: skip
            dist.barrier()
            t0 = time.perf_counter()
            folder = ckpt.save(r + 1, blocking=not use_async)
            blocked = time.perf_counter() - t0
            ckpt.wait()
            ctx.barrier()  # committed on every rank
            total = time.perf_counter() - t0
            if use_async:
                times["async_blocked_s"].append(_slowest(blocked))
                times["async_total_s"].append(_slowest(total))
            else:
                times["sync_s"].append(_slowest(total))
                dist.barrier()
                t0 = time.perf_counter()
                ckpt.restore(folder)
                times["load_s"].append(_slowest(time.perf_counter() - t0))
            ckpt.close()
            dist.barrier()
            if ctx.rank == 0:
                shutil.rmtree(root)
    return {k: statistics.median(v) for k, v in times.items()}


def _throughput(mode: str, ctx: DistContext, steps: int = 30, warmup: int = 5) -> float:
    trained, _, opt = _build(mode, ctx, 4 * WIDTH * WIDTH * 12 / 1e6)  # 4 layers
    for _ in range(warmup):
        _step(trained, opt)
    dist.barrier()
    t0 = time.perf_counter()
    for _ in range(steps):
        _step(trained, opt)
    return steps / _slowest(time.perf_counter() - t0)


def _worker(rank: int, ws: int, port: int, job: dict[str, Any], queue: Any) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(ws), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(ws),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))  # fmt: skip
    torch.set_num_threads(1)
    ctx = DistContext.from_env("cpu")
    ctx.init_process_group(timeout_s=600)
    try:
        if job["kind"] == "memory":
            result = _memory(job["mode"], ctx, job["mb"])
        elif job["kind"] == "checkpoint":
            result = _checkpoint(job["mode"], ctx, job["mb"], job["repeats"], Path(job["dir"]))
        else:
            result = _throughput(job["mode"], ctx)
        queue.put((rank, result))
    finally:
        dist.destroy_process_group()


def run_job(ws: int, **job: Any) -> list[Any]:
    """Run ``job`` on ``ws`` fresh processes; their results, by rank."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    mp.start_processes(_worker, args=(ws, _free_port(), job, queue), nprocs=ws, start_method="spawn")
    results = dict(queue.get() for _ in range(ws))
    return [results[r] for r in range(ws)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes-mb", type=float, nargs="+", default=[100, 1000])
    parser.add_argument("--memory-mb", type=float, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=None, help="where checkpoints go (default: a temp dir on /tmp)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    out: dict[str, Any] = {"memory": [], "checkpoint": [], "throughput": {}}

    for ws in (2, 3):
        per_mode = {m: run_job(ws, kind="memory", mode=m, mb=args.memory_mb) for m in ("ddp", "fsdp")}
        worst = max(r["total"] for r in per_mode["fsdp"])
        ddp = per_mode["ddp"][0]["total"]
        row = {"world_size": ws, "ddp": per_mode["ddp"], "fsdp": per_mode["fsdp"], "fsdp_over_ddp": worst / ddp,
               "goal": 1 / ws * 1.10}  # fmt: skip
        row["met"] = row["fsdp_over_ddp"] <= row["goal"]
        out["memory"].append(row)
        rss = {m: per_mode[m][0]["peak_rss"] / 1e6 for m in per_mode}
        print(f"memory ws={ws}: params+grads+optim per rank ddp {ddp / 1e6:.1f} MB, fsdp (largest rank) "
              f"{worst / 1e6:.1f} MB = {row['fsdp_over_ddp']:.3f} of ddp (goal <= {row['goal']:.3f}); "
              f"RSS ddp {rss['ddp']:.0f} MB, fsdp {rss['fsdp']:.0f} MB")  # fmt: skip

    base = Path(tempfile.mkdtemp(prefix="sharded-bench-", dir=args.dir))
    try:
        for mb in args.sizes_mb:
            row = {"state_mb": mb}
            for mode in ("ddp", "fsdp"):
                row[mode] = run_job(2, kind="checkpoint", mode=mode, mb=mb, repeats=args.repeats, dir=str(base))[0]
            out["checkpoint"].append(row)
            for mode in ("ddp", "fsdp"):
                r = row[mode]
                print(f"checkpoint {mb:.0f} MB ws=2 {mode:4s}: sync {r['sync_s']:.3f} s, async blocked "
                      f"{r['async_blocked_s']:.3f} s / committed {r['async_total_s']:.3f} s, "
                      f"load {r['load_s']:.3f} s")  # fmt: skip
    finally:
        shutil.rmtree(base, ignore_errors=True)

    for mode in ("ddp", "fsdp"):
        out["throughput"][mode] = run_job(2, kind="throughput", mode=mode)[0]
    print(f"throughput ws=2 (4 x {WIDTH} MLP, batch 64/rank): ddp {out['throughput']['ddp']:.1f} steps/s, "
          f"fsdp {out['throughput']['fsdp']:.1f} steps/s")  # fmt: skip

    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        out["meta"] = {"machine": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                       "repeats": args.repeats, "dir": str(args.dir or tempfile.gettempdir())}  # fmt: skip
        args.out.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
