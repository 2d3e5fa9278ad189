"""The DDP loop a user writes by hand: the baseline our loop and launcher are measured against.

Same model and data as ``configs/quickstart.yaml`` (workers.tasks.quickstart), same global batch, AdamW with a
warmup + cosine LR schedule, gradient clipping, a loss print every 10 steps (a host sync, as hand-written loops
do); no checkpoints, no resume, no fault handling. Run it with torchrun:

    torchrun --nproc-per-node 2 benchmarks/handwritten_ddp.py --steps 1000 --out times.json

Rank 0 writes wall-clock times (``time.time()``) of the first, the ``--warm``-th and the last step to ``--out``.
``--device cuda --bf16`` runs it on GPUs (NCCL, bf16 autocast) for scripts/gpu_check.py's benchmark.
"""

import argparse
import json
import math
import os
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler, default_collate

from workers.tasks.quickstart import build

p = argparse.ArgumentParser()
p.add_argument("--steps", type=int, default=1000)
p.add_argument("--warm", type=int, default=10)
p.add_argument("--hidden", type=int, default=64)
p.add_argument("--gbs", type=int, default=64)
p.add_argument("--samples", type=int, default=4096, help="dataset size (the quickstart's task.args.n)")
p.add_argument("--out", required=True)
p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
p.add_argument("--bf16", action="store_true", help="forward under bf16 autocast")
p.add_argument("--task", choices=("quickstart", "plain"), default="quickstart", help="plain: benchmarks/plain_task.py")
p.add_argument(
    "--loop", choices=("dataloader", "ideal", "fetch"), default="dataloader",
    help="dataloader: a DataLoader with DistributedSampler (the usual loop); ideal: every batch gathered into tensors "
    "up front (only compute, all-reduce, optimizer); fetch: dataset[i] per sample and default_collate each step",
)  # fmt: skip
args = p.parse_args()

dist.init_process_group("nccl" if args.device == "cuda" else "gloo")
rank, world = dist.get_rank(), dist.get_world_size()
device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if args.device == "cuda" else torch.device("cpu")
if device.type == "cuda":
    torch.cuda.set_device(device)
torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // world))
torch.manual_seed(0)
if args.task == "plain":
    from plain_task import build as build_plain

    task = build_plain(n=args.samples)
else:
    task = build(n=args.samples, hidden=args.hidden)
model = DDP(task.model.to(device), device_ids=[device.index] if device.type == "cuda" else None)
opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
warmup = 20
sched = torch.optim.lr_scheduler.LambdaLR(
    opt, lambda s: (s + 1) / warmup if s < warmup else 0.1 + 0.45 * (1 + math.cos(math.pi * s / args.steps))
)
sampler = DistributedSampler(task.dataset, seed=0, drop_last=True)
loader = DataLoader(
    task.dataset, batch_size=args.gbs // world, sampler=sampler, drop_last=True, pin_memory=device.type == "cuda"
)


def batches():
    """This rank's (x, y) batches, epoch after epoch, as ``--loop`` makes them."""
    epoch = 0
    while True:
        sampler.set_epoch(epoch)
        if args.loop == "dataloader":
            yield from loader
        else:
            order = list(sampler)
            per_rank = args.gbs // world
            chunks = [order[i : i + per_rank] for i in range(0, len(order) - per_rank + 1, per_rank)]
            if args.loop == "fetch":
                for chunk in chunks:
                    yield default_collate([task.dataset[i] for i in chunk])
            else:  # ideal: made here too, but all of them before the first step (below)
                yield from [default_collate([task.dataset[i] for i in chunk]) for chunk in chunks]
        epoch += 1


if args.loop == "ideal":  # every batch of the run, gathered before the first step
    source = batches()
    ready = [next(source) for _ in range(args.steps)]
    stream = iter(ready)
else:
    stream = batches()

times, step = {}, 0
while step < args.steps:
    for xb, yb in stream:
        x, y = xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
            loss = torch.nn.functional.mse_loss(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        step += 1
        if step % 10 == 0 and rank == 0:
            print(f"step {step} loss {loss.item():.4f}", flush=True)
        if step in (1, args.warm, args.steps):
            times[step] = time.time()
        if step == args.steps:
            break
if rank == 0:
    with open(args.out, "w") as f:
        json.dump({"first": times[1], "warm": times[args.warm], "end": times[args.steps], "steps": args.steps}, f)
dist.destroy_process_group()
