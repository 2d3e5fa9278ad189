"""workers/dist.py: the context read from each launcher's environment, its collectives (no-ops at world size 1,
real on a 2-rank gloo group) — and this tier's own 2-rank helper, which must fail clearly."""

from __future__ import annotations

import re
import time

import pytest
import torch

from workers.dist import DistContext, check_precision, cpu_threads_per_worker
from workers.errors import ConfigError

from .helpers import run_on_ranks


def test_world_size_one_needs_no_process_group(ctx: DistContext):
    assert ctx.is_main and ctx.device == torch.device("cpu") and ctx.backend == "gloo"
    ctx.init_process_group(timeout_s=1)  # a single process launch: nothing to join
    assert not ctx.distributed
    t = torch.tensor([2.0, 4.0])
    assert ctx.all_reduce_mean(t) is t and t.tolist() == [2.0, 4.0] and ctx.all_reduce_sum(t).tolist() == [2.0, 4.0]
    assert ctx.broadcast_object({"a": 1}) == {"a": 1} and ctx.all_gather_object(3) == [3]
    ctx.barrier()
    ctx.destroy()


def test_the_context_of_each_launcher():
    torchrun = DistContext.from_env(
        "cpu",
        env={
            "RANK": "3",
            "WORLD_SIZE": "4",
            "LOCAL_RANK": "1",
            "LOCAL_WORLD_SIZE": "2",
            "MASTER_ADDR": "h1",
            "MASTER_PORT": "1234",
        },
    )
    assert (torchrun.rank, torchrun.local_rank, torchrun.world_size, torchrun.local_world_size) == (3, 1, 4, 2)
    assert (torchrun.master_addr, torchrun.master_port, torchrun.source) == ("h1", 1234, "torchrun")
    assert not torchrun.is_main
    ours = DistContext.from_env("cpu", env={"RANK": "0", "WORLD_SIZE": "2", "ORCH_LAUNCHER": "launcher"})
    assert ours.source == "launcher" and ours.local_world_size == 2 and ours.master_port == 29500
    slurm = DistContext.from_env(
        "cpu",
        env={
            "SLURM_PROCID": "5",
            "SLURM_NTASKS": "8",
            "SLURM_LOCALID": "1",
            "SLURM_NTASKS_PER_NODE": "4(x2)",
            "SLURM_JOB_NODELIST": "gpu[3-4,7],cpu1",
            "SLURM_JOB_ID": "1234",
        },
    )
    assert (slurm.rank, slurm.local_rank, slurm.world_size, slurm.local_world_size) == (5, 1, 8, 4)
    assert (slurm.master_addr, slurm.master_port, slurm.source) == ("gpu3", 21234, "slurm")
    with pytest.raises(ConfigError, match="environment variable WORLD_SIZE='two' is not an integer"):
        DistContext.from_env("cpu", env={"RANK": "0", "WORLD_SIZE": "two"})


@pytest.mark.skipif(torch.cuda.is_available(), reason="asks for CUDA where none is visible")
def test_asking_for_cuda_without_one_is_a_config_error():
    with pytest.raises(ConfigError, match=re.escape("'launch.device' = 'cuda': no CUDA device is visible")):
        DistContext.from_env("cuda", env={})
    assert DistContext.from_env("auto", env={}).device == torch.device("cpu")


def test_precision_and_threads(monkeypatch):
    with pytest.raises(ConfigError, match=re.escape("'train.precision' = 'fp16': fp16 needs CUDA")):
        check_precision("fp16", "cpu")
    check_precision("bf16", "cpu")
    check_precision("fp16", "cuda")
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert cpu_threads_per_worker(8) == 3  # the user's (or torchrun's) choice
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "6")
    assert cpu_threads_per_worker(1, slurm=True) == 6
    assert cpu_threads_per_worker(10**6) == 1  # never below one


def _collectives(ctx: DistContext):
    mean = ctx.all_reduce_mean(torch.tensor([float(ctx.rank), 10.0]))
    total = ctx.all_reduce_sum(torch.tensor([ctx.rank + 1.0]))
    ctx.barrier()
    return {
        "mean": mean.tolist(),
        "sum": total.tolist(),
        "broadcast": ctx.broadcast_object({"from": ctx.rank}),
        "gathered": ctx.all_gather_object(("rank", ctx.rank)),
        "distributed": ctx.distributed,
    }


def test_the_collectives_of_two_ranks():
    ranks = run_on_ranks(_collectives)
    for r in ranks:
        assert r["mean"] == [0.5, 10.0] and r["sum"] == [3.0] and r["distributed"]
        assert r["broadcast"] == {"from": 0} and r["gathered"] == [("rank", 0), ("rank", 1)]


def _raise_on_rank_1(ctx: DistContext):
    if ctx.rank == 1:
        raise ValueError("rank one's own failure")
    ctx.barrier()  # rank 0 waits in a collective its failed peer never joins


def _rank_1_hangs(ctx: DistContext):
    if ctx.rank == 1:
        time.sleep(60)
    ctx.barrier()


def test_the_helper_reports_a_failing_rank_and_a_hang_clearly():
    started = time.monotonic()
    with pytest.raises(AssertionError, match=r"(?s)rank 1 raised:.*ValueError: rank one's own failure"):
        run_on_ranks(_raise_on_rank_1)
    assert time.monotonic() - started < 20  # the stuck peer is not waited for the whole timeout
    started = time.monotonic()
    with pytest.raises(AssertionError, match=r"rank\(s\) \[0, 1\] did not finish within 2 s"):
        run_on_ranks(_rank_1_hangs, timeout=2)
    assert time.monotonic() - started < 10  # the hung ranks are killed, not waited for
    assert run_on_ranks(lambda ctx, x: x * (ctx.rank + 1), 21) == [21, 42]
