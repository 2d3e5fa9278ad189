"""Model selection from evaluations: the best checkpoint, the k best kept by retention, early stopping.

Pure bookkeeping (torch-free): the trainer tells it each eval's value of ``eval.metric`` and which steps got a
checkpoint; it says whether the best improved (then that step is checkpointed), which steps retention must keep,
and when ``eval.patience`` evals have passed without an improvement of ``eval.min_delta``. Its state travels in
``train_state.json`` (``selection``), so a resume continues the same selection.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from workers.config import EvalConfig


@dataclass
class ModelSelection:
    cfg: EvalConfig
    best_step: int | None = None
    best_value: float | None = None
    bad_evals: int = 0  # evals since the best improved (the patience counter)
    ranked: list[tuple[int, float]] = field(default_factory=list)  # checkpointed evals, best first (at most k)
    last_eval: tuple[int, float] | None = None

    def better(self, value: float, than: float, delta: float = 0.0) -> bool:
        return value < than - delta if self.cfg.mode == "min" else value > than + delta

    def observe(self, step: int, value: float) -> bool:
        """One eval's value; True when it improves the best by more than ``min_delta`` (checkpoint this step)."""
        self.last_eval = (step, value)
        if self.best_value is None or self.better(value, self.best_value, self.cfg.min_delta):
            self.best_step, self.best_value, self.bad_evals = step, value, 0
            return True
        self.bad_evals += 1
        return False

    def checkpointed(self, step: int) -> None:
        """A checkpoint of ``step`` is being saved: if that step was evaluated, it competes for the k best."""
        if self.last_eval is None or self.last_eval[0] != step or self.cfg.keep_best == 0:
            return
        entries = [e for e in self.ranked if e[0] != step] + [self.last_eval]
        entries.sort(key=lambda e: e[1], reverse=self.cfg.mode == "max")
        self.ranked = entries[: self.cfg.keep_best]

    @property
    def protected_steps(self) -> frozenset[int]:
        """Checkpoints retention must keep: the k best, and the best itself (none with ``keep_best: 0``)."""
        if self.cfg.keep_best == 0:
            return frozenset()
        steps = {s for s, _ in self.ranked}
        return frozenset(steps | ({self.best_step} if self.best_step is not None else set()))

    @property
    def should_stop(self) -> bool:
        return self.cfg.patience is not None and self.bad_evals >= self.cfg.patience

    def state(self) -> dict[str, Any]:
        return {
            "metric": self.cfg.metric, "mode": self.cfg.mode, "best_step": self.best_step,
            "best_value": self.best_value, "bad_evals": self.bad_evals, "ranked": [list(e) for e in self.ranked],
        }  # fmt: skip

    def restore(self, saved: dict[str, Any]) -> bool:
        """Continue the selection saved in a checkpoint; False (starting afresh) when its metric or mode differ."""
        if saved.get("metric") != self.cfg.metric or saved.get("mode") != self.cfg.mode:
            return False
        self.best_step, self.best_value = saved["best_step"], saved["best_value"]
        self.bad_evals, self.ranked = saved["bad_evals"], [(int(s), float(v)) for s, v in saved["ranked"]]
        return True
