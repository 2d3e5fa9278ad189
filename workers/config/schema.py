"""The config schema: one frozen, typed tree of nested dataclasses, each field with its check.

Each section checks its own values in ``__post_init__`` (types are checked by the loader, workers.config.loader);
a bad value raises ConfigError naming the key, the value and a HINT. Torch-free.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from workers.contract import ORDER_SCHEMES
from workers.errors import ConfigError


def fail(key: str, value: Any, problem: str, hint: str = "") -> typing.NoReturn:
    msg = f"config key '{key}' = {value!r}: {problem}"
    raise ConfigError(msg + (f". HINT: {hint}" if hint else ""))


def check_choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        fail(key, value, f"must be one of {', '.join(choices)}")


# Line breaks, tabs and the other C0/C1 control characters (and DEL): never part of a name a user means.
CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_DAY_S = 86400.0
_BIG = 2**31  # far above any real batch, worker or accumulation count


def _check_finite(key: str, value: float | int | None) -> None:
    if isinstance(value, float) and not math.isfinite(value):  # NaN passes every comparison: refuse it first
        fail(key, value, "must be a finite number")


def check_min(key: str, value: float | int | None, low: float | int) -> None:
    """``value >= low`` and finite; None passes (an optional key left unset)."""
    _check_finite(key, value)
    if value is not None and value < low:
        fail(key, value, f"must be >= {low}")


def check_range(
    key: str, value: float | int | None, low: float | int, high: float | int, high_open: bool = False
) -> None:
    """``low <= value <= high`` (``< high`` when ``high_open``) and finite; None passes."""
    _check_finite(key, value)
    if value is None:
        return
    if value < low or value > high or (high_open and value == high):
        fail(key, value, f"must be in [{low}, {high}{')' if high_open else ']'}")


@dataclass(frozen=True)
class RunConfig:
    """Where the run lives. ``dir`` holds the config, checkpoints, logs, metrics and wandb files (workers.rundir)."""

    dir: str = "runs/default"
    # Resume automatically from the newest valid checkpoint in ``dir``. With false, a run dir that
    # already holds checkpoints is refused (nothing is overwritten): pick a new ``dir`` instead.
    resume: bool = True

    def __post_init__(self) -> None:
        if not self.dir.strip():
            fail("run.dir", self.dir, "must name a folder", "e.g. run.dir=runs/my-run")
        control = CONTROL_CHARS.search(self.dir)
        if control:  # a line break in the path splits log and status lines, and SLURM batch scripts that name it
            fail("run.dir", self.dir, f"holds a control character ({control.group()!r})",
                 "name the folder without line breaks, tabs or other control characters")  # fmt: skip
        # `run.dir=~/runs/x`: the shell leaves a ~ after `=` alone; the home folder is meant, not a folder named ~.
        object.__setattr__(self, "dir", os.path.expanduser(self.dir))
        try:
            root = Path(self.dir).expanduser().resolve()
        except (RuntimeError, ValueError, OSError) as exc:  # ~nosuchuser, a symlink loop, a NUL byte
            fail("run.dir", self.dir, f"is not a usable path ({exc})")
        if root == Path("/"):
            fail("run.dir", self.dir, "is the file system's root: a run would write into it", "use a folder of its own")


@dataclass(frozen=True)
class TaskConfig:
    """Bring your own model and data: ``factory`` is "module.path:function", called with ``args``."""

    factory: str = "workers.tasks.quickstart:build"
    args: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        module, sep, attr = self.factory.partition(":")
        if not (module and sep and attr):
            fail(
                "task.factory",
                self.factory,
                "expected 'package.module:function'",
                "e.g. workers.tasks.quickstart:build",
            )


@dataclass(frozen=True)
class DataConfig:
    """How samples are batched. ``global_batch_size`` is constant across world sizes."""

    global_batch_size: int = 32
    # Per-rank micro-batch. When set, gradient accumulation is derived from it and the world size
    # (memory per worker stays the same when a run resumes on fewer workers); when null,
    # ``train.grad_accum_steps`` is used.
    micro_batch_size: int | None = None
    num_workers: int = 0  # DataLoader worker processes per rank
    # Debug/audit: append the sample indices each rank consumes to ``run.dir/samples/rank-<r>.jsonl``.
    record_indices: bool = False
    # The global order's scheme for a new run: "feistel" (computed per position: any dataset size, O(1) memory) or
    # "randperm" (the scheme before it, materialised per epoch). A resumed run keeps its checkpoint's.
    order: str = "feistel"

    def __post_init__(self) -> None:
        check_choice("data.order", self.order, ORDER_SCHEMES)
        check_range("data.global_batch_size", self.global_batch_size, 1, _BIG)
        check_range("data.micro_batch_size", self.micro_batch_size, 1, _BIG)
        check_range("data.num_workers", self.num_workers, 0, 256)


@dataclass(frozen=True)
class OptimConfig:
    """Optimizer and learning-rate schedule; the schedule is a function of the *global* step."""

    name: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    momentum: float = 0.0  # sgd only
    warmup_steps: int = 0  # linear warmup from 0 to ``lr``
    schedule: str = "cosine"  # after warmup: constant | linear | cosine decay to ``min_lr_ratio * lr``
    min_lr_ratio: float = 0.1
    # Parameters without weight decay (the built-in optimizers; a task's own optimizer sets its own groups):
    # auto: biases, norm layers' weights, embeddings and any other 1-d parameter; none: every parameter decays;
    # or a list of glob patterns of parameter names ("*.bias", "embed.*").
    no_decay: str | tuple[str, ...] = "auto"

    def __post_init__(self) -> None:
        check_choice("optim.name", self.name, ("adamw", "adam", "sgd"))
        if isinstance(self.no_decay, str):
            check_choice("optim.no_decay", self.no_decay, ("auto", "none"))
        elif not self.no_decay or not all(p.strip() for p in self.no_decay):
            fail("optim.no_decay", list(self.no_decay), "must be auto, none or a list of glob patterns",
                 'e.g. ["*.bias", "*norm*"]')  # fmt: skip
        check_choice("optim.schedule", self.schedule, ("constant", "linear", "cosine"))
        check_min("optim.lr", self.lr, 0.0)
        check_min("optim.weight_decay", self.weight_decay, 0.0)
        for i, beta in enumerate(self.betas):  # Adam's running averages: a beta of 1 or more never forgets
            check_range(f"optim.betas[{i}]", beta, 0.0, 1.0, high_open=True)
        check_range("optim.momentum", self.momentum, 0.0, 1.0, high_open=True)
        check_min("optim.warmup_steps", self.warmup_steps, 0)
        check_range("optim.min_lr_ratio", self.min_lr_ratio, 0.0, 1.0)


@dataclass(frozen=True)
class TrainConfig:
    """The training loop: length, seed, precision, clipping, accumulation, checkpoints."""

    max_steps: int = 100
    seed: int = 0
    checkpoint_every: int = 50  # steps; the final step is always checkpointed
    keep_checkpoints: int = 2  # retention: the newest k committed checkpoints are kept
    init_from: str | None = None  # a weights file (plain or module./_orig_mod.-prefixed state_dict)
    grad_accum_steps: int = 1  # used when data.micro_batch_size is null
    grad_clip: float | None = 1.0  # max global grad norm; null or 0 disables clipping
    precision: str = "fp32"  # fp32 | bf16 | fp16 (fp16 needs CUDA; uses a GradScaler)
    log_every: int = 10  # steps between metric lines (the metrics file, console)
    compile: bool = False  # torch.compile the model (checkpoints are saved unwrapped either way)
    # Periodic checkpoints block training only while state is copied to host memory; the write and commit
    # run in the background (at most one in flight). The final and the stop saves stay synchronous.
    async_checkpoint: bool = False
    # torch.use_deterministic_algorithms + cuBLAS/cuDNN settings: bitwise-reproducible GPU runs (slower).
    deterministic: bool = False
    # A step whose (all-reduced) gradient norm is NaN/inf: skip it on every rank (no optimizer or scheduler step,
    # its samples consumed), halt the run at once, or do nothing (off). fp16's GradScaler handles its own overflows.
    nonfinite: str | bool = "skip"  # YAML reads a bare `off` as false: that is "off" too
    max_nonfinite: int = 5  # consecutive skipped steps before the run fails (exit 1)
    sync_batchnorm: bool = False  # BatchNorm -> SyncBatchNorm across ranks (CUDA only: torch has no CPU kernel)
    # ddp: every rank holds the whole model, gradients and optimizer state. fsdp: FSDP2 shards all three over the
    # ranks (task.shard_units names the units; default: the model's direct children holding parameters) and
    # checkpoints are sharded (torch.distributed.checkpoint under dcp/), resumable on any world size in either mode.
    # hsdp: FSDP2 over a 2-D mesh (replicate x shard): sharded within groups of train.shard_size ranks (default:
    # the ranks of one node), replicated across them (gradients all-reduced between the groups); checkpoints as fsdp.
    parallel: str = "ddp"
    shard_size: int | None = None  # hsdp: ranks per shard group (must divide the world size; default: per node)
    reshard_after_forward: bool = True  # fsdp: free the gathered parameters after forward (less memory, more comms)
    # fsdp: when the full, unwrapped model.pt is written beside the shards: every checkpoint, the final one, never.
    export_model: str = "final"

    @property
    def sharded(self) -> bool:
        """FSDP2 holds the model (fsdp, hsdp): parameters are DTensors, checkpoints are sharded."""
        return self.parallel in ("fsdp", "hsdp")

    def __post_init__(self) -> None:
        check_min("train.max_steps", self.max_steps, 1)
        check_range("train.seed", self.seed, 0, 2**63 - 1)
        check_min("train.checkpoint_every", self.checkpoint_every, 1)
        check_range("train.keep_checkpoints", self.keep_checkpoints, 1, 100_000)
        check_range("train.grad_accum_steps", self.grad_accum_steps, 1, _BIG)
        check_min("train.grad_clip", self.grad_clip, 0.0)
        check_min("train.log_every", self.log_every, 1)
        check_choice("train.precision", self.precision, ("fp32", "bf16", "fp16"))
        if self.nonfinite is False:
            object.__setattr__(self, "nonfinite", "off")
        check_choice("train.nonfinite", self.nonfinite, ("skip", "halt", "off"))
        check_range("train.max_nonfinite", self.max_nonfinite, 1, 1_000_000)
        check_choice("train.parallel", self.parallel, ("ddp", "fsdp", "hsdp"))
        check_range("train.shard_size", self.shard_size, 1, _BIG)
        if self.shard_size is not None and self.parallel != "hsdp":
            fail("train.shard_size", self.shard_size, f"applies to train.parallel=hsdp only (this is {self.parallel})",
                 "set train.parallel=hsdp, or leave train.shard_size out")  # fmt: skip
        check_choice("train.export_model", self.export_model, ("every", "final", "never"))
        if self.sharded and self.precision == "fp16":  # GradScaler's inf check would see one shard only
            fail("train.precision", "fp16", f"is not supported with train.parallel={self.parallel} (each rank would "
                 "find overflows in its own shard only)", "use train.precision=bf16")  # fmt: skip
        if self.sharded and self.sync_batchnorm:
            fail("train.sync_batchnorm", True, f"is not supported with train.parallel={self.parallel}",
                 "set train.sync_batchnorm=false, or train.parallel=ddp")  # fmt: skip


@dataclass(frozen=True)
class LaunchConfig:
    """How workers are started locally."""

    nproc: int = 1
    max_restarts: int = 0
    device: str = "auto"  # auto (CUDA when available) | cpu | cuda
    collective_timeout_s: float = 600.0  # no collective blocks longer than this
    grace_period_s: float = 5.0  # SIGTERM → SIGKILL delay when workers are torn down
    # A rank whose heartbeat stops, or whose step stops advancing, for this long is hung: the group is torn
    # down (and restarted when launch.max_restarts allows). 0 disables the watch.
    hang_timeout_s: float = 300.0
    # Elastic capacity (local): a device slot whose worker fails two attempts in a row is dropped and the group
    # restarts on the others, down to this many workers. None: --nproc (never drop).
    min_nproc: int | None = None

    def __post_init__(self) -> None:
        check_range("launch.nproc", self.nproc, 1, 1024)
        if self.min_nproc is not None:
            check_range("launch.min_nproc", self.min_nproc, 1, 1024)
            if self.min_nproc > self.nproc:
                fail("launch.min_nproc", self.min_nproc, f"is above launch.nproc ({self.nproc}, --nproc)",
                     f"use at most {self.nproc}, or more workers")  # fmt: skip
        check_range("launch.max_restarts", self.max_restarts, 0, 100_000)
        check_choice("launch.device", self.device, ("auto", "cpu", "cuda"))
        check_range("launch.collective_timeout_s", self.collective_timeout_s, 1.0, 7 * _DAY_S)
        check_range("launch.grace_period_s", self.grace_period_s, 0.0, _DAY_S)
        check_range("launch.hang_timeout_s", self.hang_timeout_s, 0.0, 7 * _DAY_S)


@dataclass(frozen=True)
class EvalConfig:
    """Evaluation on the task's ``eval_dataset``: exact over the whole set on any world size."""

    every: int = 0  # steps between evals; 0: never during training
    batch_size: int = 32  # samples per eval batch on each rank
    at_end: bool = False  # also evaluate after the final step
    # The metric that selects the best checkpoint (a name the eval produces). None: ``loss`` when the eval produces
    # it; else the evals run and are reported, and selection (keep_best > 1, patience) asks for this key at start.
    metric: str | None = None
    mode: str = "min"  # min | max: which direction of ``metric`` is better
    keep_best: int = 1  # the best k checkpoints are never deleted by retention
    patience: int | None = None  # early stopping: evals without an improvement of min_delta; null: off
    min_delta: float = 0.0

    def __post_init__(self) -> None:
        check_min("eval.every", self.every, 0)
        check_range("eval.batch_size", self.batch_size, 1, _BIG)
        check_choice("eval.mode", self.mode, ("min", "max"))
        if self.metric is not None and not self.metric.strip():
            fail("eval.metric", self.metric, "must name a metric", "e.g. loss")
        check_range("eval.keep_best", self.keep_best, 1, 100_000)  # the best itself is always kept
        check_range("eval.patience", self.patience, 1, 1_000_000)
        check_min("eval.min_delta", self.min_delta, 0.0)

    @property
    def enabled(self) -> bool:
        return self.every > 0 or self.at_end


@dataclass(frozen=True)
class TrackingConfig:
    """Experiment tracking (wandb on rank 0)."""

    # auto: online when a wandb API key is configured (WANDB_API_KEY or ~/.netrc), else offline; WANDB_MODE wins.
    mode: str = "auto"  # auto | offline | online | disabled
    project: str = "orchestrator"
    entity: str | None = None
    name: str | None = None
    group: str | None = None
    tags: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        check_choice("tracking.mode", self.mode, ("auto", "offline", "online", "disabled"))


@dataclass(frozen=True)
class SlurmConfig:
    """How ``orchestrator submit`` asks SLURM for an allocation (one task per GPU, or per CPU worker)."""

    # nodes: N, or a range "MIN-MAX" (SLURM's syntax): the job runs on whatever SLURM grants in it, and a requeued
    # job on whatever it gets then (elastic capacity); every world size in the range must divide the batch.
    nodes: int | str = 1
    tasks_per_node: int = 1  # = workers per node; with GPUs, one per GPU
    gpus_per_node: int = 0
    cpus_per_task: int = 1  # also the intra-op threads of each worker
    mem_gb: float | None = None  # per node; null: the partition's default
    time_min: int = 60  # wall-clock limit of each job (a requeued job gets it afresh)
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    job_name: str | None = None  # default: the run dir's name
    # The preemption / time-limit notice: SLURM sends it ``signal_delay_s`` before the end. Ranks agree at the next
    # step, save together, rank 0 requeues the job, and the requeued job resumes from that checkpoint.
    signal: str = "USR2"  # USR1 | USR2
    signal_delay_s: int = 90
    # Notices that arrive because the time limit is near (not a preemption) requeue at most this many times.
    max_timeouts: int = 3
    additional: dict[str, Any] = field(default_factory=dict)  # extra sbatch options, e.g. {exclusive: true}
    setup: tuple[str, ...] = ()  # shell lines run in the batch script before srun (module load ..., source venv)

    def __post_init__(self) -> None:
        check_range("slurm.nodes", node_range(self.nodes)[1], 1, 100_000)
        for key, top in (("tasks_per_node", 1024), ("cpus_per_task", 4096), ("time_min", 525_600)):
            check_range(f"slurm.{key}", getattr(self, key), 1, top)
        check_range("slurm.gpus_per_node", self.gpus_per_node, 0, 64)
        check_range("slurm.mem_gb", self.mem_gb, 0.0, 1e6)
        check_range("slurm.signal_delay_s", self.signal_delay_s, 0, int(_DAY_S))
        check_range("slurm.max_timeouts", self.max_timeouts, 0, 1000)
        check_choice("slurm.signal", self.signal, ("USR1", "USR2"))

    @property
    def min_nodes(self) -> int:
        return node_range(self.nodes)[0]

    @property
    def max_nodes(self) -> int:
        return node_range(self.nodes)[1]

    @property
    def world_size(self) -> int:
        """The world size of a job granted every node it may get (``max_nodes``)."""
        return self.max_nodes * self.tasks_per_node

    @property
    def world_sizes(self) -> tuple[int, ...]:
        """Every world size a job of this node range may run with, smallest first."""
        return tuple(n * self.tasks_per_node for n in range(self.min_nodes, self.max_nodes + 1))


_NODE_RANGE = re.compile(r"^\s*(\d+)\s*(?:-\s*(\d+)\s*)?$")


def node_range(nodes: int | str) -> tuple[int, int]:
    """``slurm.nodes`` as (MIN, MAX): an int N is (N, N); ``"MIN-MAX"`` is SLURM's range. ConfigError otherwise."""
    if isinstance(nodes, int):
        check_range("slurm.nodes", nodes, 1, 100_000)
        return nodes, nodes
    found = _NODE_RANGE.match(nodes)
    if found is None:
        fail("slurm.nodes", nodes, "is not a node count or a range MIN-MAX", "write e.g. 2 or 1-4")
    low, high = int(found[1]), int(found[2] or found[1])
    if low < 1:
        fail("slurm.nodes", nodes, "asks for 0 nodes", f"a range starts at 1 or more, e.g. 1-{max(high, 1)}")
    if low > high:
        fail("slurm.nodes", nodes, "runs backwards (MIN above MAX)", f"write {high}-{low}")
    return low, high


@dataclass(frozen=True)
class ProfileConfig:
    """``profile``: a torch.profiler window of ``steps`` steps from ``start_step`` on the ``ranks`` listed; each
    writes a Chrome trace (JSON, opens in Perfetto) under ``run.dir/profile/``. ``start_step: null``: off."""

    start_step: int | None = None  # the first profiled step (1 = the run's first)
    steps: int = 5
    ranks: tuple[int, ...] = (0,)

    def __post_init__(self) -> None:
        if self.start_step is not None:
            check_range("profile.start_step", self.start_step, 1, _BIG)
        check_range("profile.steps", self.steps, 1, 100_000)
        for i, rank in enumerate(self.ranks):
            check_range(f"profile.ranks[{i}]", rank, 0, 1_000_000)


@dataclass(frozen=True)
class Config:
    """The whole run. Build it with :func:`load_config`; never mutate it (it is frozen)."""

    run: RunConfig = field(default_factory=RunConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    slurm: SlurmConfig = field(default_factory=SlurmConfig)
    profile: ProfileConfig = field(default_factory=ProfileConfig)

    def __post_init__(self) -> None:
        start = self.profile.start_step
        if start is not None and start > self.train.max_steps:
            fail(
                "profile.start_step", start, f"past train.max_steps={self.train.max_steps}",
                "profile a step the run takes, or set profile.start_step=null",
            )  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        """Plain, YAML/JSON/pickle-friendly nested dict (tuples become lists)."""
        return plain(dataclasses.asdict(self))


def plain(value: Any) -> Any:
    """Nested dicts/lists/tuples as plain dicts and lists (YAML/JSON/pickle-friendly)."""
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value
