"""Evaluate saved weights outside training (``orchestrator eval``): the task's model with those weights, through the
very :class:`~workers.eval.evaluator.Evaluator` that training uses — the same exact, distributed code path, so the
numbers match the run's eval rows on any number of ranks. Reads the weights; writes nothing. Also
:func:`metric_names`: the metric names a task's evaluation produces, without training (a sweep's check).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from workers.checkpoint import first_mismatch, load_weights
from workers.config import Config
from workers.dist import DistContext, autocast_for
from workers.errors import CheckpointError, ConfigError
from workers.eval.evaluator import EvalResult, Evaluator
from workers.tasks import build_task


def evaluate_weights(cfg: Config, weights: Path, ctx: DistContext) -> EvalResult:
    """Build the task (torch seeded by ``train.seed``, as in training), load ``weights`` into its model and evaluate
    every metric over the whole eval set. Collective: must be called on all ranks. Usage problems (no eval set,
    weights that do not fit the model, an ``eval.metric`` the evaluation does not produce, metric names that differ
    between ranks or take a name of the row's own) raise ConfigError."""
    torch.manual_seed(cfg.train.seed)
    task = build_task(cfg.task.factory, dict(cfg.task.args))
    if task.eval_dataset is None:
        raise ConfigError(
            f"config key 'task.factory' = {cfg.task.factory!r}: the task has no eval_dataset, so there is nothing "
            "to evaluate. HINT: give the task an eval_dataset (and optionally evaluate(model, batch))"
        )
    try:
        state = load_weights(weights)
    except CheckpointError as exc:
        raise ConfigError(str(exc)) from None
    problem = first_mismatch(task.model, state)
    if problem:
        raise ConfigError(
            f"'{weights}' does not fit the task's model: {problem}. HINT: pass the config the weights were trained "
            "with (--config), or fix task.args"
        )
    task.model.load_state_dict(state, strict=True)
    model = task.model.to(ctx.device)
    evaluator = Evaluator(
        task, model, ctx, cfg.eval.batch_size, cfg.train.seed, lambda: autocast_for(cfg.train.precision, ctx.device)
    )
    evaluator.probe(cfg.eval.metric)  # a chosen metric the evaluation does not produce is a usage error here too
    return evaluator.run()


def metric_names(cfg: Config, batch_size: int = 2) -> list[str]:
    """The metric names the task's evaluation produces, learnt the way training learns them (the evaluator's probe
    of one batch), here in this process: the task built once on the CPU (torch seeded by ``train.seed``), no process
    group, a batch of at most ``batch_size`` samples. What a sweep checks its ``--metric`` against before anything
    runs. ConfigError for a task with no eval set and for every usage error the probe finds (an ``eval.metric``
    that is not produced, names that clash with the row's own)."""
    torch.manual_seed(cfg.train.seed)
    task = build_task(cfg.task.factory, dict(cfg.task.args))
    if task.eval_dataset is None:
        raise ConfigError(
            f"config key 'task.factory' = {cfg.task.factory!r}: the task has no eval_dataset, so there is no eval "
            "metric to compare trials by. HINT: give the task an eval_dataset (and optionally evaluate(model, batch))"
        )
    ctx = DistContext.from_env("cpu", env={})
    evaluator = Evaluator(task, task.model, ctx, max(1, min(batch_size, cfg.eval.batch_size)), cfg.train.seed,
                          contextlib.nullcontext)  # fmt: skip
    return evaluator.probe(cfg.eval.metric)
