"""The optimizer and the LR schedule: the task's own (``task.optimizer`` / ``task.scheduler``) or the built-ins.

Contract (DESIGN.md, "Optimizers and numerics"): a task's ``optimizer(model)`` gets the *unwrapped* model (the
DDP / compile wrapper is only for forward and backward) and may return any ``torch.optim.Optimizer`` with any
parameter groups, as long as every parameter it holds is one of the model's (checkpoints name optimizer state by
the model's parameter names). ``scheduler(optimizer, max_steps)`` is stepped once per optimizer step. Without it,
the built-in warmup + decay multiplies each group's own initial lr. The built-in optimizers put biases, norm
weights and embeddings (``optim.no_decay``) in a group without weight decay.
"""

from __future__ import annotations

import fnmatch
import inspect
import logging
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from workers.config import OptimConfig
from workers.errors import ConfigError
from workers.tasks import Task

log = logging.getLogger("workers.optim")

# Modules whose weights are scales, shifts or lookup rows, not projections: weight decay pulls them toward 0 for
# no benefit (the standard transformer recipe leaves them out).
_NO_DECAY_MODULES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,  # BatchNorm*, InstanceNorm*, SyncBatchNorm
    nn.LayerNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
    nn.Embedding,
    nn.EmbeddingBag,
    *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()),
)


@dataclass(frozen=True)
class Built:
    """The optimizer and schedule of a run, and where they came from."""

    optimizer: torch.optim.Optimizer
    scheduler: Any  # an LRScheduler (or anything with step/state_dict/load_state_dict)
    task_optimizer: bool  # the task built the optimizer (optim.name / lr / betas ... do not apply)
    task_scheduler: bool  # the task built the schedule (the built-in warmup/decay does not apply)


def lr_factor(cfg: OptimConfig, max_steps: int, step: int) -> float:
    """Multiplier of each group's initial lr at optimizer step ``step``: linear warmup, then the decay schedule."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, max_steps - cfg.warmup_steps))
    shape = 1.0 - progress if cfg.schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * shape


def no_decay_names(model: nn.Module, rule: str | tuple[str, ...]) -> set[str]:
    """The names of the trainable parameters that get no weight decay under ``optim.no_decay = rule``."""
    if rule == "none":
        return set()
    if rule == "auto":
        # By identity: a weight tied between an embedding and a head has one name (the first module's), whichever
        # module registered it first.
        plain = {id(p) for m in model.modules() if isinstance(m, _NO_DECAY_MODULES) for p in m.parameters(False)}
        return {n for n, p in model.named_parameters() if id(p) in plain or p.ndim < 2}
    return {name for name, _ in model.named_parameters() if any(fnmatch.fnmatchcase(name, p) for p in rule)}


def builtin_optimizer(cfg: OptimConfig, model: nn.Module) -> torch.optim.Optimizer:
    """``optim.name`` over the model's trainable parameters: a decay group and a no-decay group (either is left
    out when empty), each in the model's parameter order."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not params:
        raise ConfigError(
            f"config key 'task.factory': the model has no trainable parameters. HINT: {type(model).__name__} "
            "needs at least one parameter with requires_grad=True"
        )
    skip = no_decay_names(model, cfg.no_decay)
    if isinstance(cfg.no_decay, tuple) and not skip:
        raise ConfigError(
            f"config key 'optim.no_decay' = {list(cfg.no_decay)!r}: matches no parameter of the model. "
            f"HINT: names look like {', '.join(n for n, _ in params[:3])}"
        )
    decay = [p for n, p in params if n not in skip]
    plain = [p for n, p in params if n in skip]
    groups = [g for g in ({"params": decay}, {"params": plain, "weight_decay": 0.0}) if g["params"]]
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    cls = torch.optim.AdamW if cfg.name == "adamw" else torch.optim.Adam
    return cls(groups, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)


def build(cfg: OptimConfig, task: Task, model: nn.Module, max_steps: int) -> Built:
    """The run's optimizer and schedule (the task's when it has them). ``model`` is the unwrapped model, already
    on its device. A task hook that returns something unusable is a ConfigError naming it."""
    own = task.optimizer
    if own is not None and not callable(own):
        raise ConfigError(f"the task's 'optimizer' is {type(own).__name__}, not a function. HINT: {_HOOK_HINT}")
    optimizer = _task_optimizer(own, model) if own is not None else builtin_optimizer(cfg, model)
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise ConfigError(
            f"the task's optimizer(model) returned {type(optimizer).__name__}, not a torch.optim.Optimizer. "
            f"HINT: {_HOOK_HINT}"
        )
    check_params_of(model, optimizer)
    check_steps_without_closure(optimizer)
    own_schedule = task.scheduler
    if own_schedule is not None and not callable(own_schedule):
        raise ConfigError(
            f"the task's 'scheduler' is {type(own_schedule).__name__}, not a function. HINT: task.scheduler("
            "optimizer, max_steps) must return e.g. torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max_steps)"
        )
    if own_schedule is not None:
        scheduler = own_schedule(optimizer, max_steps)
        missing = [m for m in ("step", "state_dict", "load_state_dict") if not callable(getattr(scheduler, m, None))]
        if missing:
            raise ConfigError(
                f"the task's scheduler(optimizer, max_steps) returned {type(scheduler).__name__}, which lacks "
                f"{', '.join(missing)}. HINT: return a torch.optim.lr_scheduler.LRScheduler"
            )
    else:
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(cfg, max_steps))
        scheduler.builtin_schedule = True  # tells it from a task's own LambdaLR (checkpoint.py records which)
    return Built(optimizer, scheduler, own is not None, own_schedule is not None)


_HOOK_HINT = "task.optimizer(model) must return e.g. torch.optim.AdamW(model.parameters(), lr=...)"
_TWO_GROUPS = "some parameters appear in more than one parameter group"  # torch's ValueError, word for word


def _task_optimizer(own: Callable[[nn.Module], Any], model: nn.Module) -> Any:
    """Call the task's ``optimizer(model)``. torch refuses arguments it cannot use with a ValueError (a parameter in
    two groups, a negative lr): the same on every call, so a ConfigError (exit 2), never a restart. torch only
    warns of a parameter twice in one group: that warning is silenced here, :func:`check_params_of` names it."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="optimizer contains a parameter group with duplicate parameters")
        try:
            return own(model)
        except ValueError as exc:
            if _TWO_GROUPS in str(exc):
                raise ConfigError(
                    f"the task's optimizer holds a parameter in more than one parameter group (torch: {exc}). "
                    "HINT: put each parameter in one group only"
                ) from None
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise ConfigError(f"the task's optimizer(model) failed: ValueError: {first}. HINT: {_HOOK_HINT}") from None


def check_steps_without_closure(optimizer: torch.optim.Optimizer) -> None:
    """The loop calls ``optimizer.step()`` once per optimizer step, after backward, with no closure: an optimizer
    whose step needs one (LBFGS re-evaluates the loss itself, several times a step) is a ConfigError."""
    try:
        closure = inspect.signature(optimizer.step).parameters.get("closure")
    except (TypeError, ValueError):  # a step without a signature to read: it is tried as it is
        closure = None
    needs = isinstance(optimizer, torch.optim.LBFGS) or (
        closure is not None and closure.default is inspect.Parameter.empty
    )
    if needs:
        raise ConfigError(
            f"the task's optimizer is {type(optimizer).__name__}, whose step() needs a closure (it evaluates the "
            "loss itself); the training loop steps once per batch from the gradients of its own backward. "
            "HINT: return an optimizer that steps from the gradients alone (SGD, Adam, AdamW, ...)"
        )


def _schedule(cfg: OptimConfig, max_steps: int) -> Callable[[int], float]:
    return lambda step: lr_factor(cfg, max_steps, step)


def check_params_of(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Every parameter the optimizer holds belongs to ``model``, once: else ConfigError (the seed's lesson: an
    optimizer built over another copy of the model trains nothing that is saved)."""
    names = {id(p): n for n, p in model.named_parameters()}
    seen: set[int] = set()
    for g, group in enumerate(optimizer.param_groups):
        for i, param in enumerate(group["params"]):
            if id(param) not in names:
                raise ConfigError(
                    f"the task's optimizer holds a parameter (group {g}, #{i}, shape {list(param.shape)}) that is "
                    "not one of the model's. HINT: build it from the model that optimizer(model) is given "
                    "(not a copy, not the DDP wrapper)"
                )
            if id(param) in seen:
                raise ConfigError(
                    f"the task's optimizer holds '{names[id(param)]}' twice (group {g}). HINT: put each parameter "
                    "in one group only"
                )
            seen.add(id(param))


def describe(built: Built, cfg: OptimConfig) -> str:
    """One log line: the optimizer, the schedule, and each group's size and settings (logged once training starts,
    so that a run refused before then prints only its one-line error). A group's lr is the configured one (its
    ``initial_lr``), not the warmup's scaled-down value at this step."""
    parts = []
    for g, group in enumerate(built.optimizer.param_groups):
        count = sum(p.numel() for p in group["params"])
        parts.append(
            f"group {g}: {len(group['params'])} tensors, {count:,} parameters, "
            f"lr {group.get('initial_lr', group['lr']):g}, weight_decay {group.get('weight_decay', 0.0):g}"
        )
    schedule = (
        "the task's" if built.task_scheduler else f"built-in ({cfg.warmup_steps} warmup steps, then {cfg.schedule})"
    )
    whose = {True: "the task's", False: "built-in"}
    return f"optimizer {type(built.optimizer).__name__} ({whose[built.task_optimizer]}), schedule {schedule}: " + (
        "; ".join(parts)
    )


def apply_on_resume(built: Built, fresh_groups: list[dict[str, Any]], cfg: OptimConfig, max_steps: int) -> None:
    """After a resume with the built-in schedule, the settings of the optimizer as built now (from the config, or
    by the task) win over the saved ones, with a warning when they differ, and each group's lr is recomputed for
    the schedule's step: an edited ``optim.lr`` or ``train.max_steps`` takes effect at once. Unchanged settings
    reproduce the saved values bit for bit. With the task's own scheduler, the saved state is the truth (a schedule
    may move other settings too, e.g. OneCycleLR's momentum) and nothing is touched."""
    if built.task_scheduler:
        return
    optimizer, scheduler = built.optimizer, built.scheduler
    factor = lr_factor(cfg, max_steps, scheduler.last_epoch)
    for group, fresh in zip(optimizer.param_groups, fresh_groups, strict=True):
        for key, value in fresh.items():
            if key in ("params", "lr", "param_names"):
                continue
            if key in group and group[key] != value:
                log.warning("optimizer %s changed on resume: %r -> %r (the current settings win)", key, group[key],
                            value)  # fmt: skip
            group[key] = value
        group["lr"] = group["initial_lr"] * factor
    scheduler.base_lrs = [g["initial_lr"] for g in optimizer.param_groups]
    scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]


def group_settings(optimizer: torch.optim.Optimizer) -> list[dict[str, Any]]:
    """A copy of each group's settings (not its parameters), taken before a checkpoint is loaded."""
    return [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
