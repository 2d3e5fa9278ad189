"""Tasks: bring your own model and data.

``task.factory: "mypkg.tasks:build"`` names a function; it is called with ``task.args`` as keyword arguments on
every rank, after torch has been seeded with ``train.seed``, and returns any object with:

- ``model``: an ``nn.Module``;
- ``dataset``: map-style (``__len__``, ``__getitem__``);
- ``loss(model, batch) -> Tensor``: the *mean* loss over the micro-batch (a scalar); ``batch`` is what the
  collate function makes of the samples, already moved to the worker's device;
- optionally ``collate_fn(samples) -> batch`` (default: torch's ``default_collate``);
- optionally ``eval_dataset`` and ``evaluate(model, batch) -> {name: per-sample values}`` (workers.eval.evaluator);
- optionally ``optimizer(model) -> torch.optim.Optimizer`` over the *unwrapped* model's own parameters, and
  ``scheduler(optimizer, max_steps)``, stepped once per optimizer step (workers.optim);
- optionally ``random_samples = False``: ``__getitem__`` draws no randomness (no per-sample RNG seeding);
- optionally ``shard_units(model) -> [submodules]``: with ``train.parallel: fsdp``, the units that each get their
  own ``fully_shard`` (workers.parallel; default: the model's direct children holding parameters);
- optionally ``tokens_per_sample`` (metrics get ``tokens_per_s``) and ``flops_per_sample`` (a training step's FLOPs
  per sample, e.g. 6 x parameters x tokens: ``mfu`` on a GPU whose peak is known).

:func:`build_task` resolves the object into a frozen :class:`~workers.tasks.spec.Task` once (workers.tasks.spec):
every other module reads its typed attributes, ``None`` for a hook the task does not define.

This package must stay free of torch imports: the launcher checks a factory's module before torch loads.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import inspect
import types
import typing
from collections.abc import Callable
from typing import Any

from workers.errors import ConfigError
from workers.tasks.spec import Task, resolve

__all__ = ["Task", "build_task", "check_factory_args", "check_factory_module", "resolve", "resolve_factory"]


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


def check_factory_args(spec: str, factory: Callable[..., Any], args: dict[str, Any]) -> None:
    """``task.args`` against the factory's signature: unknown names, missing required ones, and values whose type
    contradicts a plain annotation (int, float, str, bool, or None-able ones). ConfigError naming the key."""
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):  # a builtin or an odd callable: nothing to check against
        return
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    named = {n: p for n, p in params.items() if p.kind in kinds}
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    listing = ", ".join(named) or "none"
    for key, value in args.items():
        if key not in named and not takes_any:
            close = difflib.get_close_matches(key, list(named), n=1)
            hint = f"did you mean 'task.args.{close[0]}'? " if close else ""
            raise ConfigError(
                f"config key 'task.args.{key}' = {value!r}: {spec} takes no parameter '{key}'. "
                f"HINT: {hint}its parameters: {listing}"
            )
    missing = [n for n, p in named.items() if p.default is inspect.Parameter.empty and n not in args]
    if missing:
        raise ConfigError(
            f"config key 'task.args' lacks {', '.join(missing)}, which {spec} requires. HINT: its parameters: {listing}"
        )
    try:  # a class factory: its __init__'s annotations, not the class attributes'
        hints = typing.get_type_hints(factory.__init__ if inspect.isclass(factory) else factory)
    except Exception:  # annotations that do not resolve: the factory is still called; it will say what it needs
        return
    for key, value in args.items():
        allowed = _plain_types(hints.get(key))
        if allowed and not _is_instance(value, allowed):
            names = " or ".join("None" if t is type(None) else t.__name__ for t in allowed)
            raise ConfigError(f"config key 'task.args.{key}' = {value!r}: {spec} expects {names}")


def _plain_types(hint: Any) -> tuple[type, ...] | None:
    """The types a simple annotation admits (``int``, ``float | None``, ...); None for anything richer."""
    simple = (int, float, str, bool, type(None))
    if hint in simple:
        return (hint,)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        return args if all(a in simple for a in args) else None
    return None


def _is_instance(value: Any, allowed: tuple[type, ...]) -> bool:
    if isinstance(value, bool):
        return bool in allowed
    if isinstance(value, int) and float in allowed:
        return True  # an int where a float is expected is fine (YAML writes 1 for 1.0)
    return isinstance(value, allowed)


def build_task(spec: str, args: dict[str, Any]) -> Task:
    """Call the factory and resolve what it returned against the task contract (:func:`workers.tasks.spec.resolve`):
    the typed :class:`~workers.tasks.spec.Task` every worker module reads."""
    return resolve(resolve_factory(spec)(**args), spec)
