"""The step sync on a real 2-process gloo group: one background collective carries the stop agreement, the pace
and the log values; every rank must see the same things at the same steps."""

from __future__ import annotations

import json
import math
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from workers.dist import DistContext
from workers.stop import NONE, PREEMPT, StopFlag
from workers.tracking.stepsync import StepSync

LOG_EVERY, STOP_AT = 10, 23


def _values(rank: int, step: int) -> list[float]:
    """Distinct per rank and step; rank 1 reports a NaN loss at step 20 and an infinite RSS at step 30."""
    loss = float("nan") if (rank, step) == (1, 20) else step + rank / 8
    rss = float("inf") if (rank, step) == (1, 30) else 100.0 * rank + step
    return [loss, rss, -1.5 * step]


def _worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    ctx = DistContext(rank, rank, 2, 2, "127.0.0.1", port, torch.device("cpu"), "gloo", "launcher")
    stop, tables, paces, exchanges = StopFlag(), {}, {}, []
    sync = StepSync(ctx, stop, LOG_EVERY, tables.setdefault)
    stopped_at = None
    for step in range(1, 61):
        if rank == 1 and step == STOP_AT:
            stop.code = PREEMPT  # as the signal handler would
        # the first 12 steps "take" 1 ms (exchange only at log steps), later ones 20 ms (every 2 steps)
        step_time = 0.001 if step <= 12 else 0.020
        logging = step % LOG_EVERY == 0 or step == 1
        code = sync.step(step, step_time, _values(rank, step) if logging else None)
        paces[step] = sync.every
        if sync.pending is not None and sync.pending.step == step:
            exchanges.append(step)
        if step == 40:
            sync.flush()  # as before a checkpoint: the row of step 40 is complete now
            assert 40 in tables
        if code != NONE and stopped_at is None:
            stopped_at = (step, code)
    sync.flush()
    with open(os.path.join(out, f"rank-{rank}.json"), "w") as f:
        json.dump({"stopped_at": stopped_at, "tables": tables, "paces": paces, "exchanges": exchanges}, f)
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_stop_pace_and_log_values_agree_on_every_rank(tmp_path):
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=2)
    seen = [json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in range(2)]
    # the same collectives at the same steps on both ranks: all log steps, plus paced ones
    assert seen[0]["exchanges"] == seen[1]["exchanges"] and seen[0]["paces"] == seen[1]["paces"]
    exchanges = seen[0]["exchanges"]
    assert {1, 10, 20, 30, 40, 50, 60} <= set(exchanges)
    # 1 ms steps: 50 per 50 ms → exchanges only at log steps; 20 ms steps: every 2 steps (the log interval in 5)
    assert seen[0]["paces"]["11"] == LOG_EVERY and seen[0]["paces"]["45"] == 2
    assert [s for s in exchanges if 40 <= s <= 50] == [40, 42, 44, 46, 48, 50]
    # the stop: the same step and code on both ranks — the second exchange after rank 1 asked
    assert seen[0]["stopped_at"] == seen[1]["stopped_at"]
    step, code = seen[0]["stopped_at"]
    assert code == PREEMPT and step == [s for s in exchanges if s >= STOP_AT][1]
    # the log values: every log step exactly once, each rank's row bit for bit (NaN and inf pass through)
    for s in seen:
        assert sorted(map(int, s["tables"])) == [1, 10, 20, 30, 40, 50, 60]
        for step_s, table in s["tables"].items():
            for rank, row in enumerate(table):
                want = _values(rank, int(step_s))
                assert all(a == b or (math.isnan(a) and math.isnan(b)) for a, b in zip(row, want, strict=True))
    assert math.isnan(seen[0]["tables"]["20"][1][0]) and math.isinf(seen[0]["tables"]["30"][1][1])
