"""All rank and environment logic lives here: one frozen :class:`DistContext`, built once per process.

The context is read from whichever launcher started the process — our local launcher and torchrun both set
``RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT``; srun sets ``SLURM_PROCID/SLURM_NTASKS/...`` — and is
passed explicitly to everything else. Collectives here are no-ops when no process group is initialised, so
world size 1 without a launcher runs the same code.
"""

from __future__ import annotations

import datetime
import os
import re
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from workers.contract import ENV_LAUNCHER
from workers.errors import ConfigError


@dataclass(frozen=True)
class DistContext:
    """Who this process is in the job. Frozen; build with :meth:`from_env`."""

    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    master_addr: str
    master_port: int
    device: torch.device
    backend: str  # "nccl" | "gloo"
    source: str  # "launcher" | "torchrun" | "slurm" | "single"

    @property
    def is_main(self) -> bool:
        """True on global rank 0, the only rank that writes files or talks to trackers."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return dist.is_available() and dist.is_initialized()

    @classmethod
    def from_env(cls, device_pref: str = "auto", env: dict[str, str] | None = None) -> DistContext:
        """Read rank, world size and master address from the environment; choose device and backend."""
        env = dict(os.environ if env is None else env)
        rank, local_rank, world, local_world, addr, port, source = _read_ranks(env)
        device = _pick_device(device_pref, local_rank, local_world)
        backend = "nccl" if device.type == "cuda" else "gloo"
        return cls(rank, local_rank, world, local_world, addr, port, device, backend, source)

    def init_process_group(self, timeout_s: float) -> None:
        """Join the process group (all ranks must call it). Does nothing for a single process launch."""
        if self.source == "single" or self.distributed:
            return
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        # env:// so torchrun's own store arrangements (TORCHELASTIC_USE_AGENT_STORE) keep working;
        # launchers that don't set the variables (srun) get them from this context.
        os.environ.setdefault("MASTER_ADDR", self.master_addr)
        os.environ.setdefault("MASTER_PORT", str(self.master_port))
        dist.init_process_group(
            backend=self.backend,
            init_method="env://",
            rank=self.rank,
            world_size=self.world_size,
            timeout=datetime.timedelta(seconds=timeout_s),
            # NCCL: bind to this device so barriers don't guess it (and don't allocate on cuda:0).
            device_id=self.device if self.device.type == "cuda" else None,
        )

    def barrier(self) -> None:
        """Block until every rank gets here. Must be called on all ranks; no-op without a process group."""
        if self.distributed:
            if self.backend == "nccl":
                dist.barrier(device_ids=[self.device.index])
            else:
                dist.barrier()

    def all_reduce_mean(self, tensor: torch.Tensor) -> torch.Tensor:
        """Average ``tensor`` over ranks, in place. Must be called on all ranks."""
        if self.distributed and self.world_size > 1:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
            tensor /= self.world_size
        return tensor

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over ranks, in place. Must be called on all ranks; no-op at world size 1."""
        if self.distributed and self.world_size > 1:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def broadcast_object(self, obj: object) -> object:
        """Rank 0's ``obj`` on every rank. Must be called on all ranks."""
        if not (self.distributed and self.world_size > 1):
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, device=self.device if self.backend == "nccl" else None)
        return box[0]

    def all_gather_object(self, obj: object) -> list[object]:
        """Every rank's ``obj`` (picklable), in rank order, on every rank. Must be called on all ranks."""
        if not (self.distributed and self.world_size > 1):
            return [obj]
        out: list[object] = [None] * self.world_size
        dist.all_gather_object(out, obj)  # NCCL: on the current device, which init_process_group set
        return out

    def destroy(self) -> None:
        """Leave the process group (safe to call when none was joined)."""
        if self.distributed:
            dist.destroy_process_group()


def _int(env: dict[str, str], name: str) -> int:
    try:
        return int(env[name])
    except ValueError:
        raise ConfigError(f"environment variable {name}={env[name]!r} is not an integer") from None


def _first_slurm_host(nodelist: str) -> str:
    """First host of a SLURM nodelist such as ``n[1-3,7],gpu2`` (enough for MASTER_ADDR)."""
    match = re.match(r"([^,\[]+)(?:\[([0-9]+))?", nodelist)
    if not match:
        return "127.0.0.1"
    return match.group(1) + (match.group(2) or "")


def _read_ranks(env: dict[str, str]) -> tuple[int, int, int, int, str, int, str]:
    if "RANK" in env and "WORLD_SIZE" in env:
        world = _int(env, "WORLD_SIZE")
        source = env.get(ENV_LAUNCHER, "torchrun")
        local_world = _int(env, "LOCAL_WORLD_SIZE") if "LOCAL_WORLD_SIZE" in env else world
        return (
            _int(env, "RANK"),
            _int(env, "LOCAL_RANK") if "LOCAL_RANK" in env else 0,
            world,
            local_world,
            env.get("MASTER_ADDR", "127.0.0.1"),
            _int(env, "MASTER_PORT") if "MASTER_PORT" in env else 29500,
            source,
        )
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        job = _int(env, "SLURM_JOB_ID") if "SLURM_JOB_ID" in env else 0
        port = _int(env, "MASTER_PORT") if "MASTER_PORT" in env else 20000 + job % 40000
        ntasks_node = env.get("SLURM_NTASKS_PER_NODE", env.get("SLURM_TASKS_PER_NODE", "1"))
        local_world = int(re.match(r"\d+", ntasks_node).group(0)) if re.match(r"\d+", ntasks_node) else 1
        addr = env.get("MASTER_ADDR") or _first_slurm_host(env.get("SLURM_JOB_NODELIST", "127.0.0.1"))
        return (
            _int(env, "SLURM_PROCID"),
            _int(env, "SLURM_LOCALID") if "SLURM_LOCALID" in env else 0,
            _int(env, "SLURM_NTASKS"),
            local_world,
            addr,
            port,
            "slurm",
        )
    return 0, 0, 1, 1, "127.0.0.1", 0, "single"


def _pick_device(pref: str, local_rank: int, local_world: int) -> torch.device:
    cuda = torch.cuda.is_available()
    if pref == "cuda" and not cuda:
        raise ConfigError("config key 'launch.device' = 'cuda': no CUDA device is visible. HINT: use auto or cpu")
    if pref == "cpu" or not cuda:
        return torch.device("cpu")
    count = torch.cuda.device_count()
    if count == 1 and local_world > 1 and os.environ.get("SLURM_STEP_GPUS", os.environ.get("SLURM_JOB_GPUS")):
        return torch.device("cuda", 0)  # SLURM gave each task its own GPU (--gpus-per-task): it sees only that one
    if local_world > count:
        raise ConfigError(
            f"{local_world} workers on this node but only {count} visible GPU(s). "
            "HINT: lower --nproc or launch.device=cpu"
        )
    return torch.device("cuda", local_rank)


def check_precision(precision: str, device_type: str) -> None:
    """fp16 needs CUDA (its GradScaler is CUDA-only); bf16 and fp32 run anywhere. Raises ConfigError."""
    if precision == "fp16" and device_type != "cuda":
        raise ConfigError("config key 'train.precision' = 'fp16': fp16 needs CUDA. HINT: use bf16 or fp32 on CPU")


def autocast_for(precision: str, device: torch.device) -> Any:
    """The forward's autocast context for ``train.precision`` (a fresh one per use): none for fp32."""
    if precision == "fp32":
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def cpu_threads_per_worker(local_world_size: int, slurm: bool = False) -> int:
    """Intra-op threads per worker so that N workers don't oversubscribe this machine's cores."""
    # The user (or torchrun) chose, or SLURM allotted CPUs to each task of this job: respect it. (Only as a task
    # of a SLURM job: a launch inside an allocation shares its CPUs among --nproc workers.)
    for name in ("OMP_NUM_THREADS", "SLURM_CPUS_PER_TASK") if slurm else ("OMP_NUM_THREADS",):
        try:
            return max(1, int(os.environ[name]))
        except (KeyError, ValueError):
            continue
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // max(1, local_world_size))
