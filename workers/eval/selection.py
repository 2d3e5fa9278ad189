"""Model selection from evaluations: the best checkpoint, the k best kept by retention, early stopping.

Pure bookkeeping (torch-free): the trainer tells it each eval's value of the selection metric and which steps got
a checkpoint; it says whether the best improved (then that step is checkpointed), which steps retention must keep,
and when ``eval.patience`` evals have passed without an improvement of ``eval.min_delta``. Its state travels in
``train_state.json`` (``selection``), so a resume continues the same selection.

The metric is ``eval.metric``, else ``loss`` when the eval produces it (:func:`selection_metric`); with neither, the
evals still run and are reported, and nothing is selected (only which step was evaluated last is kept).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from workers.config import EvalConfig
from workers.errors import ConfigError

if TYPE_CHECKING:
    from workers.eval.pruning import Pruning

DEFAULT_METRIC = "loss"  # selects when eval.metric is unset and the eval produces it (the loss, without evaluate)


def selection_metric(cfg: EvalConfig, names: Sequence[str]) -> str | None:
    """The metric that selects, given the ``names`` the eval produces (the probe has checked a set ``eval.metric``
    is one of them): ``eval.metric``, else ``loss`` when produced, else None (no selection). ConfigError, before
    training, when there is none and the config asks for selection (``eval.patience``, ``eval.keep_best`` > 1)."""
    if cfg.metric is not None:
        return cfg.metric
    if DEFAULT_METRIC in names:
        return DEFAULT_METRIC
    asked = [("eval.patience", cfg.patience, "early stopping")] if cfg.patience is not None else []
    if cfg.keep_best > 1:
        asked.append(("eval.keep_best", cfg.keep_best, "keeping the best checkpoints"))
    if asked:
        key, value, what = asked[0]
        raise ConfigError(
            f"config key '{key}' = {value!r}: {what} needs eval.metric, and the task's evaluate() produces no "
            f"{DEFAULT_METRIC!r}. HINT: set eval.metric to one of {', '.join(names)} (and eval.mode: min or max)"
        )
    return None


@dataclass
class ModelSelection:
    """The selection of one run: the best, the k best, the patience counter, the step evaluated last."""

    cfg: EvalConfig
    metric: str | None = None  # what selects (see selection_metric); None here: eval.metric. None there: nothing
    best_step: int | None = None
    best_value: float | None = None  # the strict best: names checkpoints/best, always checkpointed
    ref_value: float | None = None  # the patience reference: the last value that improved by more than min_delta
    bad_evals: int = 0  # evals since the reference improved (the patience counter)
    ranked: list[tuple[int, float]] = field(default_factory=list)  # checkpointed evals, best first (at most k)
    last_eval: tuple[int, float] | None = None
    pruning: Pruning | None = None  # a sweep trial's pruner (workers.eval.pruning)
    pruned: bool = False  # the sweep's pruner stopped this trial (the same on every rank)

    def __post_init__(self) -> None:
        self.metric = self.metric or self.cfg.metric

    def better(self, value: float, than: float, delta: float = 0.0) -> bool:
        return value < than - delta if self.cfg.mode == "min" else value > than + delta

    def observe(self, step: int, value: float | None) -> bool:
        """One eval's value; True when it is a new best (then this step is checkpointed). A non-finite value is
        never a best and counts against patience. ``min_delta`` only decides patience, not the best. None (no
        metric selects): only that ``step`` was evaluated is kept — never a best, no patience."""
        self.last_eval = (step, math.nan if value is None else value)
        if value is None:
            return False
        if not math.isfinite(value):
            self.bad_evals += 1
            return False
        if self.ref_value is None or self.better(value, self.ref_value, self.cfg.min_delta):
            self.ref_value, self.bad_evals = value, 0
        else:
            self.bad_evals += 1
        if self.best_value is None or self.better(value, self.best_value):
            self.best_step, self.best_value = step, value
            return True
        return False

    def checkpointed(self, step: int) -> None:
        """A checkpoint of ``step`` is being saved: if that step was evaluated, it competes for the k best."""
        if self.last_eval is None or self.last_eval[0] != step or not math.isfinite(self.last_eval[1]):
            return
        entries = [e for e in self.ranked if e[0] != step] + [self.last_eval]
        entries.sort(key=lambda e: e[1], reverse=self.cfg.mode == "max")
        self.ranked = entries[: self.cfg.keep_best]

    @property
    def protected_steps(self) -> frozenset[int]:
        """Checkpoints retention must keep: the k best, and the best itself."""
        steps = {s for s, _ in self.ranked}
        return frozenset(steps | ({self.best_step} if self.best_step is not None else set()))

    def judge(self, step: int, metrics: Mapping[str, float]) -> None:
        """After each eval, on every rank: a sweep's pruner may stop the trial here (collective when it is one)."""
        if self.pruning is not None and not self.pruned:
            self.pruned = self.pruning.decide(step, metrics)

    @property
    def should_stop(self) -> bool:
        return self.pruned or (self.cfg.patience is not None and self.bad_evals >= self.cfg.patience)

    def leaving(self, step: int) -> str:
        """Why the run stops at ``step`` without a stop request."""
        if self.pruned:
            return f"pruned at step {step}: the sweep's pruner stopped this trial (its checkpoints are kept)"
        return (
            f"early stopping at step {step}: eval/{self.metric} did not improve by "
            f"eval.min_delta={self.cfg.min_delta:g} in {self.bad_evals} evals"
        )

    def state(self) -> dict[str, Any]:
        return {
            "metric": self.metric, "mode": self.cfg.mode, "best_step": self.best_step,
            "best_value": self.best_value, "ref_value": self.ref_value, "bad_evals": self.bad_evals,
            "ranked": [list(e) for e in self.ranked],
            "last_eval_step": self.last_eval[0] if self.last_eval else None,
        }  # fmt: skip

    def pending_eval(self, step: int, due: bool) -> bool:
        """After a resume at ``step``: an eval that was due there but did not run (a stop saved first) runs now."""
        return due and (self.last_eval is None or self.last_eval[0] < step)

    def restore(self, saved: dict[str, Any]) -> bool:
        """Continue the selection saved in a checkpoint; False (starting afresh) when its metric or mode differ.
        Which step was evaluated last is kept either way: that eval's row is written, and a resume at that step
        must not evaluate it again (:meth:`pending_eval`) whatever selects now."""
        last = saved.get("last_eval_step")
        self.last_eval = (last, math.nan) if last is not None else None
        if saved.get("metric") != self.metric or (self.metric is not None and saved.get("mode") != self.cfg.mode):
            return False  # (with no metric, the mode means nothing)
        self.best_step, self.best_value = saved["best_step"], saved["best_value"]
        self.ref_value = saved.get("ref_value", saved["best_value"])
        self.bad_evals, self.ranked = saved["bad_evals"], [(int(s), float(v)) for s, v in saved["ranked"]]
        return True
