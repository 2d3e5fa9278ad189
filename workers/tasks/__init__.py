"""Tasks: bring your own model and data.

``task.factory: "mypkg.tasks:build"`` names a function; it is called with ``task.args`` as keyword arguments on
every rank, after torch has been seeded with ``train.seed``, and returns any object with:

- ``model``: an ``nn.Module``;
- ``dataset``: map-style (``__len__``, ``__getitem__``);
- ``loss(model, batch) -> Tensor``: the *mean* loss over the micro-batch (a scalar); ``batch`` is what the
  collate function makes of the samples, already moved to the worker's device;
- optionally ``collate_fn(samples) -> batch`` (default: torch's ``default_collate``).

This package must stay free of torch imports: the launcher checks a factory's module before torch loads.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from typing import Any

from workers.errors import ConfigError


def check_factory_module(spec: str) -> None:
    """Cheap pre-flight: the factory's module exists (its parent packages get imported, not the module)."""
    module = spec.partition(":")[0]
    try:
        found = importlib.util.find_spec(module)
    except (ImportError, ValueError) as exc:
        found, reason = None, str(exc)
    else:
        reason = "no such module"
    if found is None:
        raise ConfigError(
            f"config key 'task.factory' = {spec!r}: cannot import module '{module}' ({reason}). "
            "HINT: is its package installed or on PYTHONPATH?"
        )


def resolve_factory(spec: str) -> Callable[..., Any]:
    """Import ``module:function`` and return the function; ConfigError (one line) when it can't be found."""
    module_name, _, attr = spec.partition(":")
    check_factory_module(spec)
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        raise ConfigError(
            f"config key 'task.factory' = {spec!r}: importing '{module_name}' failed: {type(exc).__name__}: {exc}"
        ) from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        names = sorted(n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n)))
        raise ConfigError(
            f"config key 'task.factory' = {spec!r}: '{module_name}' has no function '{attr}'. "
            f"HINT: callables there: {', '.join(names[:8]) or 'none'}"
        )
    return factory


def build_task(spec: str, args: dict[str, Any]) -> Any:
    """Call the factory and check the returned object against the task contract."""
    task = resolve_factory(spec)(**args)
    missing = [name for name in ("model", "dataset", "loss") if not hasattr(task, name)]
    if missing:
        raise ConfigError(
            f"config key 'task.factory' = {spec!r}: the object it returned lacks "
            f"{', '.join(missing)}. HINT: return an object with model, dataset and loss(model, batch)"
        )
    return task
