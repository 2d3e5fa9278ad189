"""The trainer's progress between steps — the step, the guard's counters, the model selection — as the state a
checkpoint saves (``train_state.json``, a :class:`~workers.contract.TrainState`) and a resume continues from."""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

from workers.checkpoint import SavePlan
from workers.config import BatchPlan, Config
from workers.contract import LEGACY_ORDER, TrainState
from workers.dist import DistContext
from workers.eval.selection import ModelSelection
from workers.train.numerics import NonFiniteGuard

log = logging.getLogger("workers.trainer")


class RunProgress:
    """Where the run is: ``step`` (optimizer steps completed) and the state that travels with it. Implements the
    checkpointer's ``Progress`` protocol; ``tracking_run_id`` is set once the start's tracker exists."""

    def __init__(
        self, cfg: Config, ctx: DistContext, plan: BatchPlan, dataset_len: int, optimizer: torch.optim.Optimizer,
        guard: NonFiniteGuard | None, selection: ModelSelection | None,
    ) -> None:  # fmt: skip
        self.cfg, self.ctx, self.plan, self.dataset_len = cfg, ctx, plan, dataset_len
        self.optimizer_class = type(optimizer).__name__
        self.guard, self.selection = guard, selection
        self.step = 0
        self.order = cfg.data.order  # a resumed run keeps its checkpoint's (workers.data.order)
        self.tracking_run_id: str | None = None

    @property
    def finished(self) -> bool:
        """The run is at ``train.max_steps``, or its model selection stopped it early."""
        stopped = self.selection is not None and self.selection.should_stop
        return self.step >= self.cfg.train.max_steps or stopped

    def state_dict(self) -> TrainState:
        """This step's state; the step competes for the k best checkpoints when it was evaluated."""
        selection = None
        if self.selection is not None:
            self.selection.checkpointed(self.step)
            selection = self.selection.state()
        return TrainState(
            step=self.step,
            samples_seen=self.step * self.plan.global_batch_size,
            world_size=self.ctx.world_size,
            global_batch_size=self.plan.global_batch_size,
            seed=self.cfg.train.seed,
            max_steps=self.cfg.train.max_steps,
            task=self.cfg.task.factory,
            tracking_run_id=self.tracking_run_id,
            dataset_len=self.dataset_len,
            task_args=dict(self.cfg.task.args),
            torch=torch.__version__,
            time=time.time(),
            optimizer=self.optimizer_class,
            selection=selection,
            nonfinite_skipped=self.guard.skipped if self.guard else None,
            nonfinite_streak=self.guard.streak if self.guard else None,
            parallel=self.cfg.train.parallel,
            order=self.order,
        )

    def save_plan(self) -> SavePlan:
        """The best checkpoints are protected from retention and ``best`` names the best one; the full model is
        exported per ``train.export_model`` (``final``: at max_steps or an early stop)."""
        export = {"every": True, "final": self.finished, "never": False}[self.cfg.train.export_model]
        if self.selection is None:
            return SavePlan(export_model=export)
        return SavePlan(self.selection.protected_steps, self.selection.best_step, export)

    def load_state_dict(self, state: TrainState) -> None:
        self.step = state.step
        self.order = state.order or LEGACY_ORDER
        if self.order != self.cfg.data.order:
            log.warning(
                "the checkpoint's sample order is %s; data.order=%s applies to new runs only (the stream continues "
                "as it began)", self.order, self.cfg.data.order,
            )  # fmt: skip
        if self.guard is not None:
            self.guard.restore(state)
        if self.selection is not None and state.selection is not None and not self.selection.restore(state.selection):
            log.warning(
                "eval.metric or eval.mode changed since the checkpoint: model selection starts afresh"
                if self.selection.metric is not None
                else "no eval.metric now (and no loss to default to): the checkpoint's model selection stops"
            )

    def best_text(self) -> str:
        s: Any = self.selection
        return f"best eval/{s.metric} {s.best_value:.6g} at step {s.best_step}"
