"""Model selection from evaluations: the best checkpoint, the k best kept by retention, early stopping.

Pure bookkeeping (torch-free): the trainer tells it each eval's value of ``eval.metric`` and which steps got a
checkpoint; it says whether the best improved (then that step is checkpointed), which steps retention must keep,
and when ``eval.patience`` evals have passed without an improvement of ``eval.min_delta``. Its state travels in
``train_state.json`` (``selection``), so a resume continues the same selection.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from workers.config import EvalConfig


@dataclass
class ModelSelection:
    cfg: EvalConfig
    best_step: int | None = None
    best_value: float | None = None  # the strict best: names checkpoints/best, always checkpointed
    ref_value: float | None = None  # the patience reference: the last value that improved by more than min_delta
    bad_evals: int = 0  # evals since the reference improved (the patience counter)
    ranked: list[tuple[int, float]] = field(default_factory=list)  # checkpointed evals, best first (at most k)
    last_eval: tuple[int, float] | None = None

    def better(self, value: float, than: float, delta: float = 0.0) -> bool:
        return value < than - delta if self.cfg.mode == "min" else value > than + delta

    def observe(self, step: int, value: float) -> bool:
        """One eval's value; True when it is a new best (then this step is checkpointed). A non-finite value is
        never a best and counts against patience. ``min_delta`` only decides patience, not the best."""
        self.last_eval = (step, value)
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

    @property
    def should_stop(self) -> bool:
        return self.cfg.patience is not None and self.bad_evals >= self.cfg.patience

    def state(self) -> dict[str, Any]:
        return {
            "metric": self.cfg.metric, "mode": self.cfg.mode, "best_step": self.best_step,
            "best_value": self.best_value, "ref_value": self.ref_value, "bad_evals": self.bad_evals,
            "ranked": [list(e) for e in self.ranked],
            "last_eval_step": self.last_eval[0] if self.last_eval else None,
        }  # fmt: skip

    def pending_eval(self, step: int, due: bool) -> bool:
        """After a resume at ``step``: an eval that was due there but did not run (a stop saved first) runs now."""
        return due and (self.last_eval is None or self.last_eval[0] < step)

    def restore(self, saved: dict[str, Any]) -> bool:
        """Continue the selection saved in a checkpoint; False (starting afresh) when its metric or mode differ."""
        if saved.get("metric") != self.cfg.metric or saved.get("mode") != self.cfg.mode:
            return False
        self.best_step, self.best_value = saved["best_step"], saved["best_value"]
        self.ref_value = saved.get("ref_value", saved["best_value"])
        self.bad_evals, self.ranked = saved["bad_evals"], [(int(s), float(v)) for s, v in saved["ranked"]]
        last = saved.get("last_eval_step")
        self.last_eval = (last, float("nan")) if last is not None else None
        return True
