"""Helpers of the in-process tier: a real 2-rank gloo group in two forked processes, the quickstart task."""

from __future__ import annotations

import datetime
import multiprocessing
import queue
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

QUICK = "workers.tasks.quickstart:build"


def quick_task(n: int = 32, eval_n: int = 10, hidden: int = 8, **args: Any):
    """The quickstart task through the task contract (``build_task``), tiny."""
    from workers.tasks import build_task

    return build_task(QUICK, {"n": n, "eval_n": eval_n, "hidden": hidden, **args})


def cpu_context(rank: int = 0, world_size: int = 1):
    """A CPU ``DistContext`` of ``rank`` in ``world_size`` (read the way a launch reads it: from the environment)."""
    from workers.dist import DistContext

    if world_size == 1:
        return DistContext.from_env("cpu", env={})
    env = {"RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank), "MASTER_PORT": "0"}
    return DistContext.from_env("cpu", env=env)


def _rank_main(rank: int, world: int, store: str, fn: Callable[..., Any], args: tuple, results: Any) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)  # two ranks on a 2-core machine; and no OpenMP pool inherited across the fork
    try:
        dist.init_process_group(
            "gloo", init_method=f"file://{store}", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60)
        )
        ctx = cpu_context(rank, world)
        assert ctx.distributed and ctx.world_size == world and ctx.rank == rank
        out = fn(ctx, *args)
        results.put((rank, True, out))
    except BaseException:
        results.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_on_ranks(fn: Callable[..., Any], *args: Any, world: int = 2, timeout: float = 60.0) -> list[Any]:
    """``fn(ctx, *args)`` on every rank of a real ``world``-rank gloo group (forked processes, a FileStore); each
    rank's return value (picklable), in rank order. AssertionError with each failed rank's traceback when one raises
    (its peers, likely stuck in a collective then, get a few seconds, not the whole ``timeout``), and naming the ranks
    that did not answer when one dies or the group does not finish within ``timeout`` seconds."""
    mp = multiprocessing.get_context("fork")
    results = mp.Queue()
    answers: dict[int, tuple[bool, Any]] = {}
    problem = ""
    with tempfile.TemporaryDirectory(prefix="gloo-") as tmp:
        store = str(Path(tmp) / "store")
        procs = [
            mp.Process(target=_rank_main, args=(r, world, store, fn, args, results), daemon=True) for r in range(world)
        ]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout
        try:
            while len(answers) < world:
                try:
                    rank, ok, value = results.get(timeout=0.2)
                    answers[rank] = (ok, value)
                    if not ok:
                        deadline = min(deadline, time.monotonic() + 3.0)
                    continue
                except queue.Empty:
                    pass
                silent = [r for r in range(world) if r not in answers]
                dead = [r for r in silent if not procs[r].is_alive() and procs[r].exitcode not in (None, 0)]
                if dead:
                    problem = f"rank(s) {dead} died without an answer (exit codes {[procs[r].exitcode for r in dead]})"
                    break
                if time.monotonic() > deadline:
                    problem = f"rank(s) {silent} did not finish within {timeout:.0f} s"
                    break
        finally:
            for r, p in enumerate(procs):
                p.join(timeout=10 if r in answers else 0)  # a rank that answered is leaving its group
                if p.is_alive():
                    p.kill()
                    p.join()
    failed = [f"rank {r} raised:\n{v}" for r, (ok, v) in sorted(answers.items()) if not ok]
    if failed or problem:
        raise AssertionError("\n".join([*failed, *([problem] if problem else [])]))
    return [answers[r][1] for r in range(world)]
