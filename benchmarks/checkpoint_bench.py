"""Checkpoint cost: how long training is blocked, and how long until the checkpoint is committed.

Compares, for training states of about 10 MB, 100 MB and 1 GB (model + AdamW moments):
- ``torch.save``: one plain ``torch.save({"model", "optim"}, path)`` (no fsync, no manifest, no atomic commit);
- ``sync``: our Checkpointer, blocking (serialise, checksum (xxh3_128), fsync, rename, ``latest``);
- ``async``: our Checkpointer with ``async_save``: blocked only for the copy to host memory; committed later.
Also the disk's raw sequential write speed (write + fsync of the same number of bytes) and the load time.

    python benchmarks/checkpoint_bench.py [--sizes-mb 10 100 1000] [--repeats 3] \
        [--out benchmarks/results/checkpoint.json]

Single process on CPU (world size 1, no process group): the write path is the same on every rank 0.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from workers.checkpoint import Checkpointer, HeldState, OptimizerState
from workers.contract import TrainState
from workers.dist import DistContext
from workers.rundir import RunDir


def build_state(total_mb: float) -> tuple[nn.Module, torch.optim.Optimizer, object, object]:
    """A model whose parameters plus AdamW's two moments take about ``total_mb`` MB (fp32)."""
    params = int(total_mb * 1e6 / 4 / 3)
    width = 1024
    layers = max(1, params // (width * width))
    model = nn.Sequential(*[nn.Linear(width, width, bias=False) for _ in range(layers)])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()  # materialise exp_avg / exp_avg_sq
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    return model, opt, sched, scaler


def state_bytes(model: nn.Module, opt: torch.optim.Optimizer) -> int:
    n = sum(p.numel() * p.element_size() for p in model.parameters())
    return n + sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if t.dim())


def raw_write_speed(path: Path, nbytes: int) -> float:
    block = os.urandom(1 << 20)
    t0 = time.perf_counter()
    with open(path, "wb") as f:
        for _ in range(max(1, nbytes >> 20)):
            f.write(block)
        f.flush()
        os.fsync(f.fileno())
    dt = time.perf_counter() - t0
    path.unlink()
    return nbytes / dt


def summary(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def bench_size(total_mb: float, repeats: int, base: Path) -> dict:
    model, opt, sched, scaler = build_state(total_mb)
    nbytes = state_bytes(model, opt)
    ctx = DistContext.from_env("cpu", env={})
    train_state = TrainState(step=1, samples_seen=1, world_size=1, global_batch_size=1, seed=0)
    rows: dict[str, dict[str, list[float]]] = {
        k: {"blocked_s": [], "total_s": []} for k in ("torch.save", "sync", "async")
    }
    load_s: list[float] = []
    raw: list[float] = []
    for r in range(repeats):  # interleaved, so drift in the machine hits all three alike
        raw.append(raw_write_speed(base / "raw.bin", nbytes))
        path = base / f"plain-{r}.pt"
        t0 = time.perf_counter()
        torch.save({"model": model.state_dict(), "optim": opt.state_dict()}, path)
        dt = time.perf_counter() - t0
        rows["torch.save"]["blocked_s"].append(dt)
        rows["torch.save"]["total_s"].append(dt)
        path.unlink()
        for mode in ("sync", "async"):
            held = HeldState(dataclasses.replace(train_state, step=r + 1))
            ckpt = Checkpointer(
                RunDir(base / f"{mode}-{r}"), ctx, model=model, optim=OptimizerState(model, opt, sched, scaler),
                progress=held, keep=1, async_save=mode == "async",
            )  # fmt: skip
            t0 = time.perf_counter()
            folder = ckpt.save(r + 1, blocking=mode == "sync")
            blocked = time.perf_counter() - t0
            ckpt.wait()
            total = time.perf_counter() - t0
            ckpt.close()
            rows[mode]["blocked_s"].append(blocked)
            rows[mode]["total_s"].append(total)
            if mode == "sync":
                t0 = time.perf_counter()
                ckpt.restore(folder)
                load_s.append(time.perf_counter() - t0)
            shutil.rmtree(ckpt.paths.root)
    out = {
        "state_mb": round(nbytes / 1e6, 1),
        "raw_write_mb_s": summary([b / 1e6 for b in raw]),
        "load_s": summary(load_s),
    }
    for mode, vals in rows.items():
        out[mode] = {k: summary(v) for k, v in vals.items()}
        out[mode]["write_mb_s"] = round(nbytes / 1e6 / statistics.median(vals["total_s"]), 1)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes-mb", type=float, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=None, help="where to write (default: a temp dir on /tmp)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    base = Path(tempfile.mkdtemp(prefix="ckpt-bench-", dir=args.dir))
    try:
        results = [bench_size(mb, args.repeats, base) for mb in args.sizes_mb]
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print(f"{'state':>8} {'raw MB/s':>9} | {'mode':>10} {'blocked s (min-max)':>24} {'total s':>8} {'MB/s':>7}")
    for res in results:
        for mode in ("torch.save", "sync", "async"):
            b, t = res[mode]["blocked_s"], res[mode]["total_s"]
            print(
                f"{res['state_mb']:>6.0f}MB {res['raw_write_mb_s']['median']:>9.0f} | {mode:>10} "
                f"{b['median']:>8.3f} ({b['min']:.3f}-{b['max']:.3f}) {t['median']:>8.3f} "
                f"{res[mode]['write_mb_s']:>7.0f}"
            )
        print(f"{'':>20} load (sync checkpoint): {res['load_s']['median']:.3f} s")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        meta = {
            "machine": platform.platform(),
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "repeats": args.repeats,
            "dir": str(args.dir or tempfile.gettempdir()),
        }
        args.out.write_text(json.dumps({"meta": meta, "results": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
