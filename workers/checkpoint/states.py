"""What a checkpoint saves, as objects the manager is handed when it is built (torchtitan's ``states``): the model,
the optimizer state (optimizer, LR scheduler, AMP grad scaler, in ``optim.pt``) and the trainer's own progress (a
``TrainState`` in ``train_state.json``). Each has ``state_dict`` / ``load_state_dict``; the manager decides where
and how their states are written, and in which order they are loaded."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from workers.checkpoint.compat import check_optimizer_fits, laid_out_like, schedule_kind
from workers.checkpoint.optim_state import from_named, from_positions, is_named, to_named
from workers.checkpoint.weights import unwrap
from workers.contract import TrainState
from workers.errors import CheckpointError, IncompatibleCheckpointError
from workers.rundir import OPTIM_FILE


@dataclass(frozen=True)
class SavePlan:
    """What the trainer decides about one save beyond its state: the steps retention keeps besides the newest
    (the best checkpoints), the step ``checkpoints/best`` names after the commit, and whether the full model is
    exported beside a sharded checkpoint (``train.export_model``)."""

    keep_also: frozenset[int] = field(default_factory=frozenset)
    best_step: int | None = None
    export_model: bool = True


class Progress(Protocol):
    """The trainer's state between steps (step, guard counters, model selection, ...), one per process."""

    def state_dict(self) -> TrainState:
        """The state to save now (rank 0's is written); may note that this step is checkpointed."""
        ...

    def load_state_dict(self, state: TrainState) -> None:
        """Continue from a checkpoint's state (after the model and optimizer were loaded)."""
        ...

    def save_plan(self) -> SavePlan:
        """Retention, ``best`` and export for the save being made (asked after :meth:`state_dict`)."""
        ...


@dataclass(frozen=True)
class OptimizerState:
    """The optimizer with its LR scheduler and AMP grad scaler: ``optim.pt``'s entries. The optimizer's state is
    keyed by the parameter names of ``model`` (workers.checkpoint.optim_state), so it loads onto any wrapping,
    sharding and world size."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: Any

    @property
    def bare(self) -> nn.Module:
        return unwrap(self.model)

    def named_optimizer(self) -> dict[str, Any]:
        """The optimizer's entry alone: its state keyed by parameter name (every rank's shards, when sharded)."""
        return to_named(self.bare, self.optimizer)

    def state_dict(self, optimizer: dict[str, Any] | None = None) -> dict[str, Any]:
        """``optim.pt``'s entries; ``optimizer``: the optimizer's entry when the caller already made it (the
        sharded save keeps its tensors apart)."""
        return {
            "optimizer": to_named(self.bare, self.optimizer) if optimizer is None else optimizer,
            "scheduler": self.scheduler.state_dict(),
            "scheduler_class": schedule_kind(self.scheduler),
            "scaler": self.scaler.state_dict(),
        }

    def check_fits(self, folder: Path, state: Any, saved_class: str | None) -> None:
        """``state`` (optim.pt's contents) is of this optimizer's kind: CheckpointError when malformed,
        IncompatibleCheckpointError when of another optimizer. Before anything is loaded."""
        if not (isinstance(state, Mapping) and isinstance(state.get("optimizer"), Mapping) and "scheduler" in state):
            raise CheckpointError(f"'{folder / OPTIM_FILE}' does not hold optimizer and scheduler state")
        check_optimizer_fits(folder, self.optimizer, state["optimizer"], saved_class)

    def load_state_dict(self, state: Mapping[str, Any], folder: Path | None = None) -> None:
        """Load ``state`` (its optimizer entry by names or, in the first format, by positions; tensors full or
        laid out like the parameters). ``folder`` names the checkpoint in errors."""
        where = str(folder) if folder is not None else "the checkpoint"
        named = state["optimizer"]
        convert = from_named if is_named(named) else from_positions
        self.optimizer.load_state_dict(laid_out_like(convert(where, self.bare, self.optimizer, named), self.optimizer))
        then, now = state.get("scheduler_class"), schedule_kind(self.scheduler)
        if isinstance(then, str) and then != now:
            raise IncompatibleCheckpointError(
                f"checkpoint '{where}' holds {then} state, this run's schedule is {now} (was task.scheduler added "
                "or removed?). HINT: restore the task's scheduler, or start a new run.dir with train.init_from set to "
                "this checkpoint to take its weights alone"
            )
        self.scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])


@dataclass
class HeldState:
    """The simplest :class:`Progress`: a train state held as given (tools, benchmarks and tests that save outside a
    trainer). Set ``state`` before each save; a restore puts the checkpoint's there."""

    state: TrainState
    plan: SavePlan = field(default_factory=SavePlan)

    def state_dict(self) -> TrainState:
        return self.state

    def load_state_dict(self, state: TrainState) -> None:
        self.state = state

    def save_plan(self) -> SavePlan:
        return self.plan
