"""What a worker trains with, built in one piece before anything runs: the task, the model (SyncBatchNorm and
FSDP applied), the optimizer state, the numerics checks, the evaluation and model selection, the progress and the
checkpointer handed all of them. Anything the config or the task gets wrong is found here, before the first step."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import nn

from workers.checkpoint import Checkpointer, OptimizerState
from workers.config import BatchPlan, Config, dump_config, plan_batches
from workers.dist import DistContext, autocast_for
from workers.errors import ConfigError
from workers.eval.evaluator import Evaluator
from workers.eval.pruning import Pruning
from workers.eval.selection import ModelSelection, selection_metric
from workers.optim import Built
from workers.optim import build as build_optim
from workers.parallel import is_sharded, shard
from workers.rundir import CONFIG_FILE, RunDir
from workers.tasks import Task, build_task
from workers.train.numerics import NonFiniteGuard, Numerics
from workers.train.progress import RunProgress

log = logging.getLogger("workers.trainer")


@dataclass(frozen=True)
class Parts:
    """One worker's training parts. The set is fixed once built; the parts themselves hold the changing state
    (weights, optimizer state, ``progress.step``)."""

    cfg: Config
    plan: BatchPlan
    task: Task  # the task contract, resolved (workers.tasks.spec)
    model: nn.Module  # the bare model: SyncBatchNorm converted, sharded in place under fsdp; never wrapped
    sharded: bool  # FSDP2 sharded the model (fsdp with a process group)
    optim: Built  # the optimizer and its schedule, and whether the task made them
    state: OptimizerState  # optimizer, scheduler and AMP grad scaler, as checkpoints hold them
    numerics: Numerics
    evaluator: Evaluator | None  # None: evaluation off
    selection: ModelSelection | None  # with the evaluator
    progress: RunProgress
    ckpt: Checkpointer
    autocast: Callable[[], Any]  # the forward's autocast context (training and evaluation)


def build_parts(cfg: Config, ctx: DistContext, paths: RunDir) -> Parts:
    """Build everything, in the order the contract needs: factories run with torch seeded by ``train.seed``; the
    model is sharded before the optimizer is built (it must hold the sharded parameters)."""
    torch.manual_seed(cfg.train.seed)
    task = build_task(cfg.task.factory, dict(cfg.task.args))
    if len(task.dataset) == 0:  # (found at the first batch otherwise, as a crash that restarts would repeat)
        raise ConfigError(
            f"config key 'task.factory' = {cfg.task.factory!r}: the task's dataset is empty. HINT: check task.args "
            "(a data path, a filter or a split that leaves nothing)"
        )
    model = _sync_batchnorm(cfg, ctx, task.model.to(ctx.device))
    sharded = False
    if cfg.train.sharded:
        model = shard(model, task, ctx, cfg.train)
        sharded = is_sharded(model)
    optim = build_optim(cfg.optim, task, model, cfg.train.max_steps)
    fp16 = cfg.train.precision == "fp16" and ctx.device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=fp16)
    plan = plan_batches(cfg, ctx.world_size)
    # fp16's GradScaler skips its own overflow steps; the guard watches every other run.
    guard = NonFiniteGuard(cfg, plan.global_batch_size) if not fp16 else None
    if fp16 and cfg.train.nonfinite != "skip":
        log.warning("train.nonfinite=%s has no effect with fp16: its GradScaler skips overflowing steps itself",
                    cfg.train.nonfinite)  # fmt: skip
    # A sharded model computes in its MixedPrecisionPolicy's dtype (workers.parallel): no autocast around it.
    autocast = partial(autocast_for, "fp32" if sharded else cfg.train.precision, ctx.device)
    evaluator, selection = _evaluation(cfg, ctx, task, model, autocast, sharded)
    state = OptimizerState(model, optim.optimizer, optim.scheduler, scaler)
    progress = RunProgress(cfg, ctx, plan, len(task.dataset), optim.optimizer, guard, selection)
    ckpt = Checkpointer(
        paths, ctx, model=model, optim=state, progress=progress, keep=cfg.train.keep_checkpoints,
        async_save=cfg.train.async_checkpoint, sharded=cfg.train.sharded,
        extra_files={CONFIG_FILE: dump_config(cfg).encode()},  # each checkpoint knows how it was made
    )  # fmt: skip
    numerics = Numerics(model, ctx, sharded, paths, guard, optim)
    return Parts(
        cfg, plan, task, model, sharded, optim, state, numerics, evaluator, selection, progress, ckpt, autocast
    )


def _sync_batchnorm(cfg: Config, ctx: DistContext, model: nn.Module) -> nn.Module:
    """``train.sync_batchnorm``: BatchNorm statistics over the global batch. torch's SyncBatchNorm has CUDA
    kernels only, so on any other device it is a config error (found before the first step)."""
    if not cfg.train.sync_batchnorm:
        return model
    if ctx.device.type != "cuda":
        raise ConfigError(
            f"config key 'train.sync_batchnorm' = True: torch's SyncBatchNorm runs on CUDA GPUs only, this run is "
            f"on {ctx.device.type}. HINT: set train.sync_batchnorm=false (each rank then normalises over "
            "its own samples)"
        )
    if not ctx.distributed:
        log.info("train.sync_batchnorm: one process, BatchNorm already sees the whole batch")
        return model
    converted = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    count = sum(isinstance(m, nn.SyncBatchNorm) for m in converted.modules())
    log.info("train.sync_batchnorm: %d BatchNorm layer(s) now SyncBatchNorm", count)
    return converted  # the task's hooks (optimizer, evaluate) are given this model


def _evaluation(
    cfg: Config, ctx: DistContext, task: Task, model: nn.Module, autocast: Callable[[], Any], sharded: bool
) -> tuple[Evaluator | None, ModelSelection | None]:
    """The task's evaluation and its model selection, when the config asks for evals. The metric names are
    checked on one batch now, before the first training step: an unknown ``eval.metric``, or selection asked
    for (patience, keep_best) with no metric to select by, is a usage error found at once."""
    ecfg = cfg.eval
    if not ecfg.enabled:
        return None, None
    if task.eval_dataset is None:
        key, value = ("eval.every", ecfg.every) if ecfg.every else ("eval.at_end", ecfg.at_end)
        raise ConfigError(
            f"config key '{key}' = {value!r}: the task has no eval_dataset. HINT: give the task an eval_dataset "
            "(and optionally evaluate(model, batch)), or turn evaluation off"
        )
    evaluator = Evaluator(task, model, ctx, ecfg.batch_size, cfg.train.seed, autocast, lockstep=sharded)
    names = evaluator.probe(ecfg.metric)
    # A sweep's trial: its metric must be one the eval makes.
    pruning = Pruning.from_env(ctx, ecfg.every, cfg.train.max_steps)
    if pruning is not None and pruning.metric not in names:
        raise ConfigError(
            f"sweep --metric {pruning.metric!r}: the task's eval does not produce it. HINT: use one of "
            f"{', '.join(names)}"
        )
    pruning = pruning if pruning is not None and pruning.prunes else None
    return evaluator, ModelSelection(ecfg, selection_metric(ecfg, names), pruning=pruning)
