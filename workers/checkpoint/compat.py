"""Whether a checkpoint fits this run: the model's keys and shapes, the optimizer's class and group settings, the
scheduler's kind. A mismatch is the user's to fix (IncompatibleCheckpointError, exit 2), never a crash.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from workers.checkpoint.weights import first_mismatch, is_state_dict, load_full_weights
from workers.errors import CheckpointError, IncompatibleCheckpointError
from workers.parallel import (
    any_sharded,
    like,
)
from workers.rundir import MODEL_FILE, OPTIM_FILE


def check_model_fits(folder: Path, bare: nn.Module, weights: Mapping[str, torch.Tensor]) -> None:
    problem = first_mismatch(bare, weights)
    if problem:  # another architecture than the one saved: the user's to fix, not a crash
        raise IncompatibleCheckpointError(
            f"checkpoint '{folder}' does not fit the model that task.factory/task.args build: {problem}. "
            "HINT: restore the task settings of this run, or use a new run.dir"
        )


def load_full_model(folder: Path, bare: nn.Module, weights: Any) -> None:
    """Load a full state dict into ``bare``, sliced to its shards when it is sharded (no communication)."""
    if not is_state_dict(weights):
        raise CheckpointError(f"'{folder / MODEL_FILE}' holds no model state_dict (names to tensors)")
    check_model_fits(folder, bare, weights)
    load_full_weights(bare, weights)


def laid_out_like(state: dict[str, Any], optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Optimizer state (positions) with each full tensor of a parameter's shape sharded like that parameter."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if not any_sharded(params):
        return state
    for index, values in state["state"].items():
        p = params[index]
        state["state"][index] = {k: like(v, p) if isinstance(v, torch.Tensor) else v for k, v in values.items()}
    return state


# Group settings a newer torch adds (and fills in on load) or an optimizer defaults: their absence is no mismatch.
_DEFAULTED_GROUP_KEYS = {
    "foreach", "maximize", "capturable", "differentiable", "fused", "decoupled_weight_decay", "nesterov", "amsgrad",
    "initial_lr", "param_names",
}  # fmt: skip


def check_optimizer_fits(
    folder: Path, optimizer: torch.optim.Optimizer, saved: Mapping[str, Any], saved_class: str | None
) -> None:
    """The saved optimizer state must be of the same kind as the current optimizer (same class): else
    IncompatibleCheckpointError instead of a KeyError later. Checkpoints that predate the recorded class are judged by
    the settings their groups lack. The layout (which parameter in which group) is judged by
    workers.checkpoint.optim_state."""
    hint = (
        "HINT: restore optim.name, or start a new run.dir with train.init_from set to this checkpoint to take its "
        "weights alone"
    )
    now_class = type(optimizer).__name__
    if saved_class is not None and saved_class != now_class:
        raise IncompatibleCheckpointError(
            f"checkpoint '{folder}' holds {saved_class} state, this run builds {now_class} "
            f"(was optim.name changed?). {hint}"
        )
    groups = saved.get("param_groups")
    if not isinstance(groups, list) or not groups:
        raise CheckpointError(f"'{folder / OPTIM_FILE}' holds no optimizer parameter groups")
    settings = set(optimizer.defaults)  # every group has the optimizer's settings; a task may add keys to some
    for i, then in enumerate(groups):
        if not isinstance(then, Mapping) or not isinstance(then.get("params"), list):
            raise CheckpointError(f"'{folder / OPTIM_FILE}': parameter group {i} is malformed")
        lacking = sorted(settings - set(then) - _DEFAULTED_GROUP_KEYS - {"params"})
        if lacking:
            raise IncompatibleCheckpointError(
                f"checkpoint '{folder}' holds optimizer state that does not fit this optimizer (group {i} lacks "
                f"{', '.join(lacking)}; was optim.name changed?). {hint}"
            )


def schedule_kind(scheduler: Any) -> str:
    """The scheduler's class, and whether it is the task's (a task's own LambdaLR is not the built-in one)."""
    return type(scheduler).__name__ + ("" if getattr(scheduler, "builtin_schedule", False) else " (the task's)")
