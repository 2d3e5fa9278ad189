"""Optimizer state keyed by parameter *name* (the ``optimizer`` entry of ``optim.pt``; workers.checkpoint owns
the file, this module the entry's layout).

torch's ``optimizer.state_dict()`` keys each parameter's state by its position in the optimizer (0, 1, 2, ...):
a model or group change shifts the positions and a resume silently pairs state with the wrong parameter, or
fails deep inside torch. Here the positions become the model's parameter names:

    {"state": {"net.0.weight": {"step": ..., "exp_avg": ...}, ...},
     "param_groups": [{"lr": ..., "weight_decay": ..., "params": ["net.0.weight", ...]}, ...]}

so a resume checks names and groups first and names the first mismatch. Checkpoints of the first format (positions;
tests/fixtures/format1) still load: their positions are the built-in optimizer's, the model's trainable parameters
in order, in one group.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from workers.errors import CheckpointError, IncompatibleCheckpointError

log = logging.getLogger("workers.optim_state")

_HINT = (
    "HINT: restore the model and optimizer settings of this run, or start a new run.dir with train.init_from set to "
    "this checkpoint to take its weights alone"
)


def _param_names(model: nn.Module) -> dict[int, str]:
    return {id(p): n for n, p in model.named_parameters()}


def to_named(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's state dict with positions replaced by the model's parameter names. ``model`` unwrapped."""
    names = _param_names(model)
    sd = optimizer.state_dict()
    position_names = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    groups = [{**group, "params": [position_names[i] for i in group["params"]]} for group in sd["param_groups"]]
    return {"state": {position_names[i]: s for i, s in sd["state"].items()}, "param_groups": groups}


def is_named(saved: Mapping[str, Any]) -> bool:
    """Whether the entry names its parameters (else it is of the first format, or malformed: the loaders judge)."""
    groups = saved.get("param_groups")
    return isinstance(groups, list) and any(
        isinstance(g, Mapping) and isinstance(g.get("params"), list) and any(isinstance(p, str) for p in g["params"])
        for g in groups
    )


def from_named(
    where: str, model: nn.Module, optimizer: torch.optim.Optimizer, saved: Mapping[str, Any]
) -> dict[str, Any]:
    """A state dict that ``optimizer.load_state_dict`` pairs with the right parameters, from the named layout.

    IncompatibleCheckpointError (exit 2) naming the first parameter whose place differs (added, removed, moved to
    another group), CheckpointError when the entry is malformed."""
    saved_groups = _groups(where, saved, str)
    names = _param_names(model)
    now = [[names[id(p)] for p in g["params"]] for g in optimizer.param_groups]
    then = [list(g["params"]) for g in saved_groups]
    problem = _first_layout_mismatch(then, now)
    if problem:
        raise IncompatibleCheckpointError(f"checkpoint '{where}': the optimizer state does not fit: {problem}. {_HINT}")
    position = {name: i for i, name in enumerate(n for group in now for n in group)}
    state = _state(where, saved, position)
    groups = [{**g, "params": [position[n] for n in names]} for g, names in zip(saved_groups, now, strict=True)]
    return {"state": {position[n]: s for n, s in state.items()}, "param_groups": groups}


def from_positions(
    where: str, model: nn.Module, optimizer: torch.optim.Optimizer, saved: Mapping[str, Any]
) -> dict[str, Any]:
    """A first-format entry (positions of the built-in optimizer: the model's trainable parameters in order, one
    group) as a named one, then loaded like one. The groups' settings are today's optimizer's (a resume applies the
    current settings anyway); the per-parameter state is the checkpoint's."""
    saved_groups = _groups(where, saved, int)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    count = sum(len(g["params"]) for g in saved_groups)
    if count != len(trainable):
        raise IncompatibleCheckpointError(
            f"checkpoint '{where}' holds optimizer state for {count} parameters, the model trains {len(trainable)}. "
            f"{_HINT}"
        )
    by_position = dict(enumerate(trainable))
    state = _state(where, saved, by_position)
    if len(optimizer.param_groups) > len(saved_groups) and any(g.get("weight_decay") for g in saved_groups):
        log.warning(
            "checkpoint '%s' (first format) decayed every parameter in one group; this run leaves biases, norms and "
            "embeddings out of weight decay (optim.no_decay=auto). HINT: set optim.no_decay=none to continue exactly "
            "as saved", where,
        )  # fmt: skip
    names = _param_names(model)
    settings = optimizer.state_dict()["param_groups"]  # today's groups, without their parameters
    groups = [
        {**{k: v for k, v in s.items() if k != "params"}, "params": [names[id(p)] for p in g["params"]]}
        for s, g in zip(settings, optimizer.param_groups, strict=True)
    ]
    named = {"state": {by_position[i]: s for i, s in state.items()}, "param_groups": groups}
    return from_named(where, model, optimizer, named)


def _groups(where: str, saved: Mapping[str, Any], key: type) -> list[Mapping[str, Any]]:
    """The saved groups, each listing its parameters as ``key`` (names: str; first format: int positions), every
    parameter once. Anything else is a CheckpointError (a corrupt or forged file), never a crash later."""
    groups = saved.get("param_groups")
    if not isinstance(groups, list) or not all(
        isinstance(g, Mapping) and isinstance(g.get("params"), list) for g in groups
    ):
        raise CheckpointError(f"'{where}': the optimizer's parameter groups are malformed")
    listed = [p for g in groups for p in g["params"]]
    if not all(type(p) is key for p in listed) or len(set(listed)) != len(listed):
        raise CheckpointError(
            f"'{where}': the optimizer's parameter groups must list each parameter once, by "
            f"{'name' if key is str else 'position'}"
        )
    return groups


def _state(where: str, saved: Mapping[str, Any], known: Mapping[Any, Any]) -> Mapping[Any, Mapping[str, Any]]:
    """The per-parameter state: keyed by parameters the groups list, each a mapping of names to values."""
    state = saved.get("state")
    if not isinstance(state, Mapping) or not all(type(k) in (str, int) and k in known for k in state):
        raise CheckpointError(f"'{where}': the optimizer state is keyed by parameters its groups do not list")
    for key, value in state.items():
        if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
            raise CheckpointError(f"'{where}': the optimizer state of {key!r} is not a mapping of names to values")
    return state


def _first_layout_mismatch(then: list[list[str]], now: list[list[str]]) -> str | None:
    """The first parameter whose group differs between the checkpoint and the optimizer built now."""
    group_then = {n: g for g, names in enumerate(then) for n in names}
    group_now = {n: g for g, names in enumerate(now) for n in names}
    for g, names in enumerate(now):
        for name in names:
            if name not in group_then:
                return f"'{name}' (group {g} now) has no state in the checkpoint — a parameter the model gained?"
            if group_then[name] != g:
                return f"'{name}' is in group {group_then[name]} in the checkpoint, group {g} now"
    for g, names in enumerate(then):
        for name in names:
            if name not in group_now:
                return f"the checkpoint has state for '{name}' (group {g}), which this optimizer does not hold"
    if len(then) != len(now):
        return f"the checkpoint has {len(then)} parameter group(s), this optimizer {len(now)}"
    return None


def split_tensors(named: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """A named entry as (the entry without its tensors, ``{"<param name>/<state key>": tensor}``): a sharded
    checkpoint keeps the tensors in DCP (each rank its shards) and the rest in ``optim.pt``. The entry records which
    keys it left out (``tensor_keys``), so :func:`join_tensors` can tell a missing tensor from one never saved."""
    tensors: dict[str, torch.Tensor] = {}
    state: dict[str, dict[str, Any]] = {}
    keys: dict[str, list[str]] = {}
    for name, values in named["state"].items():
        state[name] = {k: v for k, v in values.items() if not isinstance(v, torch.Tensor)}
        keys[name] = [k for k, v in values.items() if isinstance(v, torch.Tensor)]
        tensors.update({f"{name}/{k}": values[k] for k in keys[name]})
    return {"state": state, "param_groups": named["param_groups"], "tensor_keys": keys}, tensors


def tensor_keys(where: str, entry: Mapping[str, Any]) -> dict[str, list[str]]:
    """The ``tensor_keys`` of a split entry, checked (CheckpointError when malformed)."""
    keys = entry.get("tensor_keys")
    if not isinstance(keys, Mapping) or not all(
        isinstance(n, str) and isinstance(ks, list) and all(isinstance(k, str) for k in ks) for n, ks in keys.items()
    ):
        raise CheckpointError(f"'{where}': the optimizer entry does not say which state its shards hold")
    return {n: list(ks) for n, ks in keys.items()}


def join_tensors(where: str, entry: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """The named entry again, from :func:`split_tensors`' two parts."""
    state = entry.get("state")
    if not isinstance(state, Mapping):
        raise CheckpointError(f"'{where}': the optimizer state is malformed")
    joined = {n: dict(v) if isinstance(v, Mapping) else v for n, v in state.items()}
    for name, ks in tensor_keys(where, entry).items():
        if not isinstance(joined.get(name), dict):
            raise CheckpointError(f"'{where}': the optimizer state of {name!r} is malformed")
        for k in ks:
            if f"{name}/{k}" not in tensors:
                raise CheckpointError(f"'{where}': the shards lack the optimizer's {k!r} of {name!r}")
            joined[name][k] = tensors[f"{name}/{k}"]
    return {"state": joined, "param_groups": entry.get("param_groups")}
