"""What a sweep is: the base config, the searched keys (a grid and/or random distributions), the metric, and the
trials it makes — each a dict of overrides with a stable id. Parsed and checked before anything runs; torch-free.

``--grid KEY=[v1,v2]`` (repeatable: the product of the lists), ``--random KEY=DIST`` with DIST one of
``uniform(a,b)``, ``loguniform(a,b)``, ``int(a,b)``, ``choice(a,b,...)``: ``--trials N`` draws from Optuna's random
sampler, seeded by ``--seed`` (crossed with the grid when both are given).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from workers.config import Config, ConfigError, load_config
from workers.config.loader import parse_value

_DIST = re.compile(r"^\s*(uniform|loguniform|int|choice)\s*\((.*)\)\s*$")


@dataclass(frozen=True)
class Dist:
    """One random search dimension."""

    kind: str  # uniform | loguniform | int | choice
    args: tuple[Any, ...]

    def optuna(self) -> Any:
        """The Optuna distribution it draws from."""
        from optuna.distributions import (  # noqa: PLC0415 - only sweeps import Optuna
            CategoricalDistribution,
            FloatDistribution,
            IntDistribution,
        )

        if self.kind == "choice":
            return CategoricalDistribution(list(self.args))
        if self.kind == "int":
            return IntDistribution(int(self.args[0]), int(self.args[1]))
        return FloatDistribution(float(self.args[0]), float(self.args[1]), log=self.kind == "loguniform")

    def text(self) -> str:
        return f"{self.kind}({','.join(map(str, self.args))})"


def parse_grid(item: str) -> tuple[str, list[Any]]:
    """``KEY=[v1,v2,...]`` (YAML values) as (key, values). ConfigError (names the item) when malformed or empty."""
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--grid {item!r}: expected KEY=[v1,v2,...]. HINT: e.g. --grid optim.lr=[1e-3,3e-3]")
    try:
        values = parse_value(text)
    except yaml.YAMLError:
        values = None
    if not isinstance(values, list):
        raise ConfigError(f"--grid {item!r}: the values are not a list. HINT: write {key.strip()}=[v1,v2,...]")
    if not values:
        raise ConfigError(f"--grid {item!r}: the list is empty. HINT: give {key.strip()} at least one value")
    return key.strip(), values


def parse_random(item: str) -> tuple[str, Dist]:
    """``KEY=DIST`` as (key, Dist). ConfigError (names the item) when malformed."""
    key, sep, text = item.partition("=")
    found = _DIST.match(text) if sep and key.strip() else None
    hint = "uniform(a,b), loguniform(a,b), int(a,b) or choice(a,b,...)"
    if found is None:
        raise ConfigError(f"--random {item!r}: expected KEY=DIST. HINT: DIST is {hint}")
    try:
        args = tuple(parse_value(f"[{found[2]}]"))
    except yaml.YAMLError:
        raise ConfigError(f"--random {item!r}: its arguments do not parse. HINT: DIST is {hint}") from None
    kind = found[1]
    numeric = all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in args)
    if kind == "choice":
        ok = len(args) >= 1
    else:
        ok = len(args) == 2 and numeric and args[0] < args[1] and (kind != "loguniform" or args[0] > 0)
        ok = ok and (kind != "int" or all(float(a).is_integer() for a in args))
    if not ok:
        raise ConfigError(f"--random {item!r}: {kind} needs {'values' if kind == 'choice' else 'a < b'}"
                          f"{' > 0' if kind == 'loguniform' else ''}. HINT: DIST is {hint}")  # fmt: skip
    return key.strip(), Dist(kind, args)


def trial_id(overrides: dict[str, Any]) -> str:
    """A stable, readable id: the searched values (last key part) and a hash of every override."""
    digest = hashlib.blake2b(json.dumps(overrides, sort_keys=True).encode(), digest_size=4).hexdigest()
    parts = [f"{k.rsplit('.', 1)[-1]}={_short(v)}" for k, v in sorted(overrides.items())]
    readable = re.sub(r"[^A-Za-z0-9=._-]+", "", ",".join(parts).replace(",", "_"))[:60]
    return f"{readable}-{digest}" if readable else digest


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


@dataclass(frozen=True)
class SweepSpec:
    """A sweep as asked for. ``identity()`` is what makes two invocations the same sweep (a rerun continues it)."""

    config: Path
    grid: dict[str, list[Any]] = field(default_factory=dict)
    random: dict[str, Dist] = field(default_factory=dict)
    trials: int = 1  # random draws (crossed with the grid)
    seed: int = 0
    metric: str = "loss"
    mode: str = "min"
    prune: str | None = None  # None | "halving"
    overrides: tuple[str, ...] = ()  # for every trial

    def identity(self) -> dict[str, Any]:
        return {
            "config": str(self.config.resolve()), "config_digest": _digest(self.config),
            "grid": self.grid, "random": {k: d.text() for k, d in self.random.items()},
            "trials": self.trials if self.random else None, "seed": self.seed if self.random else None,
            "metric": self.metric, "mode": self.mode, "prune": self.prune, "overrides": list(self.overrides),
        }  # fmt: skip

    def grid_points(self) -> list[dict[str, Any]]:
        keys = list(self.grid)
        return [dict(zip(keys, values, strict=True)) for values in itertools.product(*self.grid.values())] or [{}]

    def config_of(self, trial: dict[str, Any], run_dir: Path, extra: list[str] | None = None) -> Config:
        """The trial's full config (ConfigError names the key and value it refuses)."""
        return load_config(str(self.config), self.trial_overrides(trial, run_dir, extra))

    def trial_overrides(self, trial: dict[str, Any], run_dir: Path, extra: list[str] | None = None) -> list[str]:
        """What makes the base config the trial's: every trial's overrides, the searched values, the run dir."""
        pairs = [f"{k}={json.dumps(v)}" for k, v in trial.items()]  # (JSON is YAML: null stays null, strings quoted)
        return [*self.overrides, *pairs, f"run.dir={run_dir}", *(extra or [])]


def _digest(path: Path) -> str:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    except OSError as exc:
        raise ConfigError(f"sweep config {str(path)!r}: cannot be read ({exc.strerror})") from None


def check_keys(spec: SweepSpec) -> None:
    """``run.dir`` is the sweep's to choose (an unknown key is named by the config loader, with a suggestion)."""
    for key in [*spec.grid, *spec.random, *(o.partition("=")[0] for o in spec.overrides)]:
        if key.strip() == "run.dir":
            raise ConfigError(f"sweep key {key!r}: each trial's run.dir is DIR/<trial id>. HINT: leave it out")
