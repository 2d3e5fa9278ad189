"""Evaluate saved weights outside training (``orchestrator eval``): the task's model with those weights, through the
very :class:`~workers.eval.evaluator.Evaluator` that training uses — the same exact, distributed code path, so the
numbers match the run's eval rows on any number of ranks. Reads the weights; writes nothing.
"""

from __future__ import annotations

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
