"""A sweep trial's pruning, inside the run: after each eval, rank 0 reports the sweep's metric to the trial in the
sweep's Optuna journal and asks its pruner (successive halving); every rank gets the answer (one broadcast), so a
pruned trial stops at that eval's step on every rank — saved, like an early stop — and rank 0 marks the trial
pruned in the journal. The sweep (orchestrator/sweep) sets ``ORCH_SWEEP_TRIAL`` for its trials; a plain launch
has no such variable and never imports Optuna. Decisions live in the journal: a resumed sweep sees them, and a
trial resumed from an older checkpoint makes the same ones (the pruner records each rung the trial completed, kept
or pruned, and never decides it again)."""

from __future__ import annotations

import json
import logging
import math
import os
import warnings
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist

from workers.contract import ENV_SWEEP_TRIAL
from workers.dist import DistContext

log = logging.getLogger("workers.eval")


class Pruning:
    """``decide(step, metrics)`` after each eval, on every rank; True: the trial is pruned (stop now)."""

    def __init__(self, spec: Mapping[str, Any], ctx: DistContext, every: int = 1, last_step: int = 0) -> None:
        """``every``: steps between evals (the first rung of successive halving: no completed trial is needed to
        start pruning, as with Optuna's "auto"); ``last_step``: an eval there is never pruned (the trial is done)."""
        self.every, self.last_step = max(1, every), last_step
        self.journal, self.study_name = str(spec["journal"]), str(spec["study"])
        self.number, self.metric, self.ctx = int(spec["number"]), str(spec["metric"]), ctx
        self.prunes = bool(spec.get("prune"))  # else only the metric is checked (the sweep reads it afterwards)
        self._trial: Any = None

    @classmethod
    def from_env(cls, ctx: DistContext, every: int = 1, last_step: int = 0) -> Pruning | None:
        text = os.environ.get(ENV_SWEEP_TRIAL)
        return cls(json.loads(text), ctx, every, last_step) if text else None

    def decide(self, step: int, metrics: Mapping[str, float]) -> bool:
        if step >= self.last_step:
            return False  # the trial has trained to the end: nothing is left to save by stopping it
        prune = self._ask(step, metrics.get(self.metric)) if self.ctx.is_main else False
        if self.ctx.distributed and self.ctx.world_size > 1:
            flag = torch.tensor([int(prune)], device=self.ctx.device)
            dist.broadcast(flag, src=0)
            prune = bool(flag.item())
        return prune

    def _ask(self, step: int, value: float | None) -> bool:
        """Rank 0: report, ask, and on a prune mark the trial pruned in the journal."""
        if value is None or not math.isfinite(value):
            return False  # nothing to compare: the pruner would only guess
        from optuna.trial import TrialState  # noqa: PLC0415 - only sweep trials import Optuna

        trial = self._open()
        with warnings.catch_warnings():  # (a step reported before a resume keeps its first value: Optuna warns)
            warnings.simplefilter("ignore", UserWarning)
            trial.report(value, step)
        if not trial.should_prune():
            return False
        trial.study.tell(self.number, state=TrialState.PRUNED)
        log.info("the sweep's pruner stopped this trial at step %d (eval/%s %.6g)", step, self.metric, value)
        return True

    def _open(self) -> Any:
        if self._trial is None:
            import optuna  # noqa: PLC0415
            from optuna.storages import JournalStorage  # noqa: PLC0415
            from optuna.storages.journal import JournalFileBackend  # noqa: PLC0415

            optuna.logging.set_verbosity(optuna.logging.WARNING)
            storage = JournalStorage(JournalFileBackend(self.journal))
            pruner = optuna.pruners.SuccessiveHalvingPruner(min_resource=self.every)
            study = optuna.load_study(study_name=self.study_name, storage=storage, pruner=pruner)
            trial_id = next(t._trial_id for t in study.get_trials(deepcopy=False) if t.number == self.number)
            self._trial = optuna.trial.Trial(study, trial_id)
        return self._trial
