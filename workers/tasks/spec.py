"""The task contract, resolved once: :func:`resolve` reads the object a factory returned into a frozen :class:`Task`
— the required parts, and each optional hook or ``None`` — so the rest of the workers read typed attributes and no
module looks a hook up on the user's object itself (this is the one place that does).

Free of torch imports, like the whole package: the launcher imports it before torch loads.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from workers.errors import ConfigError

REQUIRED = ("model", "dataset", "loss")


@dataclass(frozen=True)
class Task:
    """One task, as the workers use it (workers.tasks's docstring is the contract). A hook the task does not define
    is ``None``; a hook the task defines is its own (bound) callable, called exactly as before — ``optimizer(model)``,
    ``scheduler(optimizer, max_steps)``, ``evaluate(model, batch)``, ``shard_units(model)``. A hook that is not a
    function is kept as it is: ``optimizer`` and ``scheduler`` are named by workers.optim (``the task's 'optimizer'
    is int, not a function``), the others fail where they are called."""

    model: Any  # an nn.Module (no torch here)
    dataset: Any  # map-style: __len__, __getitem__
    loss: Callable[[Any, Any], Any]  # loss(model, batch) -> the micro-batch's mean loss
    raw: Any  # the object the factory returned, for anything a hook's closure needs
    collate_fn: Callable[[list[Any]], Any] | None = None  # None: torch's default_collate
    eval_dataset: Any | None = None
    evaluate: Callable[[Any, Any], Any] | None = None  # checked: per-sample values on the model's device
    optimizer: Callable[[Any], Any] | None = None  # over the unwrapped model's own parameters
    scheduler: Callable[[Any, int], Any] | None = None  # stepped once per optimizer step
    shard_units: Callable[[Any], Any] | None = None  # train.parallel=fsdp: the units that get fully_shard
    random_samples: bool = True  # False: __getitem__ draws no randomness (no per-sample RNG seeding)
    tokens_per_sample: float | None = None  # metrics get tokens_per_s
    flops_per_sample: float | None = None  # a training step's FLOPs per sample (e.g. 6 x params x tokens): mfu


def resolve(obj: Any, factory: str | None = None) -> Task:
    """Check ``obj`` against the task contract and read it into a :class:`Task` (an already resolved one is returned
    as it is). ``factory`` (``task.factory``) is named in the error when a required part is missing. The task's
    ``evaluate`` is wrapped to check that its values lie on the model's device; the user's object is left alone."""
    if isinstance(obj, Task):
        return obj
    missing = [name for name in REQUIRED if not hasattr(obj, name)]
    if missing:
        where = f"config key 'task.factory' = {factory!r}: the object it returned" if factory else "the task object"
        raise ConfigError(
            f"{where} ({type(obj).__name__}) lacks "
            f"{', '.join(missing)}. HINT: return an object with model, dataset and loss(model, batch)"
        )
    evaluate = getattr(obj, "evaluate", None)
    return Task(
        model=obj.model,
        dataset=obj.dataset,
        loss=obj.loss,
        raw=obj,
        collate_fn=getattr(obj, "collate_fn", None),
        eval_dataset=getattr(obj, "eval_dataset", None),
        evaluate=_on_the_models_device(evaluate) if callable(evaluate) else evaluate,
        optimizer=getattr(obj, "optimizer", None),
        scheduler=getattr(obj, "scheduler", None),
        shard_units=getattr(obj, "shard_units", None),
        random_samples=bool(getattr(obj, "random_samples", True)),
        tokens_per_sample=_positive(obj, "tokens_per_sample", factory),
        flops_per_sample=_positive(obj, "flops_per_sample", factory),
    )


def _positive(obj: Any, name: str, factory: str | None) -> float | None:
    """An optional positive number the task declares; anything else is a ConfigError naming it."""
    value = getattr(obj, name, None)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        where = f"config key 'task.factory' = {factory!r}: " if factory else ""
        raise ConfigError(
            f"{where}the task's {name} is {value!r}: it must be a positive number. HINT: leave it out if unknown"
        )
    return float(value)


def _on_the_models_device(evaluate: Callable[..., Any]) -> Callable[..., Any]:
    """``evaluate`` whose per-sample values must lie on the model's device: else a ConfigError naming the metric
    and both devices. The evaluation sums them there (and the probe calls evaluate once before the first training
    step, so the mistake is found before training); a value left on the CPU under a GPU model, or on 'meta', would
    fail in the middle of training instead (or, on a GPU, cost a copy per batch)."""

    @functools.wraps(evaluate)
    def checked(model: Any, batch: Any) -> Any:
        out = evaluate(model, batch)
        device = _device_of(model)
        if device is None or not isinstance(out, Mapping):  # the evaluation names a malformed result itself
            return out
        for name, value in out.items():
            where = getattr(value, "device", None)
            if where is not None and where != device:
                raise ConfigError(
                    f"the task's evaluate() returned {name!r} on device {where}, the model is on {device}. HINT: "
                    "compute per-sample values from the model's outputs and leave them on its device (no .cpu() or "
                    ".to(), no new tensor without device=)"
                )
        return out

    return checked


def _device_of(model: Any) -> Any:
    """The device of the model's first parameter (or buffer); None for a model without either (nothing to check)."""
    tensors = itertools.chain(model.parameters(), model.buffers()) if hasattr(model, "parameters") else iter(())
    first = next(tensors, None)
    return getattr(first, "device", None)
