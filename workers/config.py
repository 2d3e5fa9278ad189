"""One frozen, typed config tree: loaded from YAML plus dotted ``key=value`` overrides, validated once.

This module must not import torch: config errors are found before torch is imported, so a bad command
answers in well under a second. Values derived from the config and the world size (per-rank batch,
accumulation) live in :class:`BatchPlan`, never written back into the config.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A user error in the config or the command line: reported as one line, exit code 2."""


def _fail(key: str, value: Any, problem: str, hint: str = "") -> typing.NoReturn:
    msg = f"config key '{key}' = {value!r}: {problem}"
    raise ConfigError(msg + (f". HINT: {hint}" if hint else ""))


def _check_choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        _fail(key, value, f"must be one of {', '.join(choices)}")


def _check_min(key: str, value: float | int | None, low: float | int) -> None:
    if value is not None and value < low:
        _fail(key, value, f"must be >= {low}")


@dataclass(frozen=True)
class RunConfig:
    """Where the run lives. ``dir`` holds config.yaml, checkpoints/, logs/, metrics.jsonl, wandb/."""

    dir: str = "runs/default"
    # Resume automatically from the newest valid checkpoint in ``dir``. With false, a run dir that
    # already holds checkpoints is refused (nothing is overwritten): pick a new ``dir`` instead.
    resume: bool = True


@dataclass(frozen=True)
class TaskConfig:
    """Bring your own model and data: ``factory`` is "module.path:function", called with ``args``."""

    factory: str = "workers.tasks.quickstart:build"
    args: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        module, sep, attr = self.factory.partition(":")
        if not (module and sep and attr):
            _fail(
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

    def __post_init__(self) -> None:
        _check_min("data.global_batch_size", self.global_batch_size, 1)
        _check_min("data.micro_batch_size", self.micro_batch_size, 1)
        _check_min("data.num_workers", self.num_workers, 0)


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

    def __post_init__(self) -> None:
        _check_choice("optim.name", self.name, ("adamw", "adam", "sgd"))
        _check_choice("optim.schedule", self.schedule, ("constant", "linear", "cosine"))
        _check_min("optim.lr", self.lr, 0.0)
        _check_min("optim.weight_decay", self.weight_decay, 0.0)
        _check_min("optim.warmup_steps", self.warmup_steps, 0)
        _check_min("optim.min_lr_ratio", self.min_lr_ratio, 0.0)


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
    log_every: int = 10  # steps between metric lines (metrics.jsonl, console)
    compile: bool = False  # torch.compile the model (checkpoints are saved unwrapped either way)
    # Periodic checkpoints block training only while state is copied to host memory; the write and commit
    # run in the background (at most one in flight). The final and the stop saves stay synchronous.
    async_checkpoint: bool = False
    # torch.use_deterministic_algorithms + cuBLAS/cuDNN settings: bitwise-reproducible GPU runs (slower).
    deterministic: bool = False

    def __post_init__(self) -> None:
        _check_min("train.max_steps", self.max_steps, 1)
        _check_min("train.seed", self.seed, 0)
        _check_min("train.checkpoint_every", self.checkpoint_every, 1)
        _check_min("train.keep_checkpoints", self.keep_checkpoints, 1)
        _check_min("train.grad_accum_steps", self.grad_accum_steps, 1)
        _check_min("train.grad_clip", self.grad_clip, 0.0)
        _check_min("train.log_every", self.log_every, 1)
        _check_choice("train.precision", self.precision, ("fp32", "bf16", "fp16"))


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

    def __post_init__(self) -> None:
        _check_min("launch.nproc", self.nproc, 1)
        _check_min("launch.max_restarts", self.max_restarts, 0)
        _check_choice("launch.device", self.device, ("auto", "cpu", "cuda"))
        _check_min("launch.collective_timeout_s", self.collective_timeout_s, 1.0)
        _check_min("launch.grace_period_s", self.grace_period_s, 0.0)
        _check_min("launch.hang_timeout_s", self.hang_timeout_s, 0.0)


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
        _check_choice("tracking.mode", self.mode, ("auto", "offline", "online", "disabled"))


@dataclass(frozen=True)
class SlurmConfig:
    """How ``orchestrator submit`` asks SLURM for an allocation (one task per GPU, or per CPU worker)."""

    nodes: int = 1
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
        for key in ("nodes", "tasks_per_node", "cpus_per_task", "time_min"):
            _check_min(f"slurm.{key}", getattr(self, key), 1)
        _check_min("slurm.gpus_per_node", self.gpus_per_node, 0)
        _check_min("slurm.mem_gb", self.mem_gb, 0.0)
        _check_min("slurm.signal_delay_s", self.signal_delay_s, 0)
        _check_min("slurm.max_timeouts", self.max_timeouts, 0)
        _check_choice("slurm.signal", self.signal, ("USR1", "USR2"))

    @property
    def world_size(self) -> int:
        return self.nodes * self.tasks_per_node


@dataclass(frozen=True)
class Config:
    """The whole run. Build it with :func:`load_config`; never mutate it (it is frozen)."""

    run: RunConfig = field(default_factory=RunConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    slurm: SlurmConfig = field(default_factory=SlurmConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.run.dir)

    def to_dict(self) -> dict[str, Any]:
        """Plain, YAML/JSON/pickle-friendly nested dict (tuples become lists)."""
        return _plain(dataclasses.asdict(self))


# ---------------------------------------------------------------- loading


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _all_keys(cls: type, prefix: str = "") -> list[str]:
    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        keys.append(key)
        if dataclasses.is_dataclass(hints[f.name]):
            keys.extend(_all_keys(hints[f.name], key + "."))
    return keys


def _first_leaf(key: str, value: Any) -> str:
    """``trian`` with value ``{max_steps: 3}`` → ``trian.max_steps``: suggestions then match the whole path."""
    while isinstance(value, dict) and value:
        first = next(iter(value))
        key, value = f"{key}.{first}", value[first]
    return key


def _unknown_key(key: str, value: Any = None) -> typing.NoReturn:
    key = _first_leaf(key, value)
    valid = _all_keys(Config)
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    if not close:  # a misspelled leaf under a right section: compare leaf names too
        leaf = key.rsplit(".", 1)[-1]
        by_leaf = {k.rsplit(".", 1)[-1]: k for k in valid}
        close = [by_leaf[m] for m in difflib.get_close_matches(leaf, list(by_leaf), n=1, cutoff=0.6)]
    hint = (
        f"did you mean '{close[0]}'?"
        if close
        else "valid sections: " + ", ".join(f.name for f in dataclasses.fields(Config))
    )
    raise ConfigError(f"unknown config key '{key}'. HINT: {hint}")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check ``value`` against the annotation ``tp``; return it in the field's canonical form."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(key, value, arg)
            except ConfigError:
                continue
        _fail(key, value, f"expected {' or '.join(_type_name(a) for a in args)}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            _fail(key, value, "expected a mapping (a section)")
        return _build(tp, value, key + ".")
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            _fail(key, value, f"expected a list, got {type(value).__name__}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(f"{key}[{i}]", v, args[0]) for i, v in enumerate(value))
        if len(value) != len(args):
            _fail(key, value, f"expected a list of {len(args)} items")
        return tuple(_coerce(f"{key}[{i}]", v, a) for i, (v, a) in enumerate(zip(value, args, strict=True)))
    if origin is dict:
        if not isinstance(value, dict):
            _fail(key, value, f"expected a mapping, got {type(value).__name__}")
        return dict(value)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is Any or (isinstance(value, tp) and not (tp is int and isinstance(value, bool))):
        return value
    _fail(key, value, f"expected {_type_name(tp)}, got {type(value).__name__}")


def _build(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key, value in data.items():
        if key not in names:
            _unknown_key(f"{prefix}{key}", value)
    kwargs = {k: _coerce(f"{prefix}{k}", v, hints[k]) for k, v in data.items()}
    return cls(**kwargs)


def _parse_override(item: str) -> tuple[list[str], Any]:
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override '{item}' is not key=value. HINT: e.g. train.max_steps=200")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw  # not YAML: keep the literal string
    return key.strip().split("."), value


def _apply_override(data: dict[str, Any], path: list[str], value: Any) -> None:
    node = data
    for i, part in enumerate(path[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            _fail(".".join(path[: i + 1]), child, "is not a section, cannot set a sub-key")
        node = child
    node[path[-1]] = value


def config_from_dict(data: dict[str, Any] | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Build and validate the config tree from a nested dict plus dotted overrides."""
    data = _plain(data or {})
    if not isinstance(data, dict):
        raise ConfigError(f"the config must be a YAML mapping, got {type(data).__name__}")
    for item in overrides:
        path, value = _parse_override(item)
        _apply_override(data, path, value)
    return _build(Config, data)


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML config file and apply overrides. Raises ConfigError on any problem."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file '{path}' not found. HINT: e.g. configs/quickstart.yaml")
    try:
        data = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"config file '{path}' is not valid YAML: {first}") from None
    return config_from_dict(data, overrides)


def dump_config(cfg: Config) -> str:
    """The resolved config as YAML (what ``run.dir/config.yaml`` holds)."""
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


# ---------------------------------------------------------------- derived values


@dataclass(frozen=True)
class BatchPlan:
    """Per-rank batching derived from ``data.global_batch_size`` and the world size at start."""

    world_size: int
    global_batch_size: int
    per_rank_batch: int  # samples each rank consumes per optimizer step
    micro_batch: int  # samples per forward/backward
    accum_steps: int  # micro-steps per optimizer step


def plan_batches(cfg: Config, world_size: int) -> BatchPlan:
    """Derive the per-rank batch plan; raises ConfigError when the numbers do not divide."""
    gbs = cfg.data.global_batch_size
    if cfg.data.micro_batch_size is not None:
        micro = cfg.data.micro_batch_size
        if gbs % (world_size * micro):
            _fail(
                "data.global_batch_size",
                gbs,
                f"not divisible by world size {world_size} x data.micro_batch_size {micro}",
                f"use a multiple of {world_size * micro} or another micro batch",
            )
        return BatchPlan(world_size, gbs, gbs // world_size, micro, gbs // (world_size * micro))
    accum = cfg.train.grad_accum_steps
    if gbs % (world_size * accum):
        _fail(
            "data.global_batch_size",
            gbs,
            f"not divisible by world size {world_size} x train.grad_accum_steps {accum}",
            f"use a multiple of {world_size * accum}, or change --nproc / train.grad_accum_steps",
        )
    return BatchPlan(world_size, gbs, gbs // world_size, gbs // (world_size * accum), accum)


def check_resume_compatible(cfg: Config, saved: dict[str, Any], where: str, dataset_len: int | None = None) -> None:
    """Refuse a resume whose config would silently change what the run consumes (raises ConfigError).

    ``saved`` is a checkpoint's train_state.json. The data position is ``step x global batch`` in the global order
    of ``train.seed``, so both must match; the run can be extended (larger max_steps) but not cut below its step.
    """
    hint = "HINT: put it back, or start a new run.dir (train.init_from can take these weights)"
    for key, now, then in (
        ("train.seed", cfg.train.seed, saved.get("seed")),
        ("data.global_batch_size", cfg.data.global_batch_size, saved.get("global_batch_size")),
        ("task.factory", cfg.task.factory, saved.get("task")),
        ("task.factory (its dataset's length)", dataset_len, saved.get("dataset_len") if dataset_len else None),
    ):
        if then is not None and now != then:
            _fail(key, now, f"the checkpoint in {where} was saved with {then!r}; resuming would change the data", hint)
    if saved.get("step", 0) > cfg.train.max_steps:
        _fail(
            "train.max_steps",
            cfg.train.max_steps,
            f"the run in {where} is already at step {saved['step']}",
            "raise train.max_steps to continue it, or use a new run.dir",
        )
