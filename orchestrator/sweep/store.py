"""A sweep's own state in its DIR: ``sweep.json`` (ours: what the sweep is, its trials, the failures) and
``optuna.journal`` (Optuna's file journal: the trials as Optuna knows them, their reported eval values, the pruner's
decisions) — the journal is append-only and safe on a shared file system, ``sweep.json`` is written atomically.
Each trial's run dir is ``DIR/<trial id>/``. :class:`SweepDir` is the one owner of this layout."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.sweep.spec import SweepSpec, trial_id
from workers.config import ConfigError
from workers.fsutil import atomic_write

STUDY = "sweep"


class SweepDir:
    """DIR's layout."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    @property
    def state(self) -> Path:
        return self.root / "sweep.json"

    @property
    def journal(self) -> Path:
        return self.root / "optuna.journal"

    def trial_dir(self, tid: str) -> Path:
        return self.root / tid

    @property
    def slurm(self) -> Path:
        """The sweep's SLURM array scripts and per-task logs (``<array>_<task>/``)."""
        return self.root / "slurm"


@dataclass
class Trial:
    id: str
    overrides: dict[str, Any]
    number: int  # its Optuna trial number


@dataclass
class SweepState:
    """``sweep.json``: the sweep's identity (a rerun must match it), its trials, the failures recorded."""

    identity: dict[str, Any]
    trials: list[Trial]
    failed: dict[str, str] = field(default_factory=dict)  # trial id -> why (a rerun tries it again)
    slurm_jobs: list[str] = field(default_factory=list)  # the sweep's SLURM array job ids

    def save(self, sdir: SweepDir) -> None:
        data = {"identity": self.identity, "trials": [vars(t) for t in self.trials], "failed": self.failed,
                "slurm_jobs": self.slurm_jobs}  # fmt: skip
        atomic_write(sdir.state, json.dumps(data, indent=1) + "\n")

    @classmethod
    def load(cls, sdir: SweepDir) -> SweepState:
        try:
            data = json.loads(sdir.state.read_text())
            trials = [Trial(**t) for t in data["trials"]]
            return cls(data["identity"], trials, dict(data.get("failed", {})), list(data.get("slurm_jobs", [])))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"sweep dir '{sdir.root}': {sdir.state.name} does not read ({exc})") from None


def open_study(spec: SweepSpec, sdir: SweepDir, sampler: Any = None) -> Any:
    """The sweep's Optuna study in DIR's journal (created on first use)."""
    import optuna  # noqa: PLC0415 - only sweeps import Optuna
    from optuna.storages import JournalStorage  # noqa: PLC0415
    from optuna.storages.journal import JournalFileBackend  # noqa: PLC0415

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = JournalStorage(JournalFileBackend(str(sdir.journal)))
    pruner = optuna.pruners.NopPruner()  # (the trials prune themselves: workers.eval.pruning)
    try:  # (loading writes nothing to the journal; creating again would append an entry)
        return optuna.load_study(study_name=STUDY, storage=storage, sampler=sampler, pruner=pruner)
    except KeyError:
        direction = "minimize" if spec.mode == "min" else "maximize"
        return optuna.create_study(
            study_name=STUDY, storage=storage, sampler=sampler, pruner=pruner, direction=direction
        )


def draw_trials(spec: SweepSpec) -> list[dict[str, Any]]:
    """Every trial's searched values: the grid's points, each crossed with ``spec.trials`` draws of the random keys
    from Optuna's random sampler (seeded: the same sweep draws the same values). In memory: nothing is written."""
    import optuna  # noqa: PLC0415

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=spec.seed))
    dists = {k: d.optuna() for k, d in spec.random.items()}
    out = []
    for point in spec.grid_points():
        for _ in range(spec.trials if spec.random else 1):
            drawn = study.ask(dists).params if dists else {}
            out.append({**point, **drawn})
    return out


def register(spec: SweepSpec, sdir: SweepDir, values: list[dict[str, Any]]) -> SweepState:
    """Create DIR's journal with one Optuna trial per set of values, then ``sweep.json`` (last: it marks the sweep
    as created). A DIR whose journal was left without ``sweep.json`` (interrupted here) starts over."""
    from optuna.distributions import CategoricalDistribution  # noqa: PLC0415

    sdir.root.mkdir(parents=True, exist_ok=True)
    sdir.journal.unlink(missing_ok=True)
    study = open_study(spec, sdir)
    dists = {
        **{k: CategoricalDistribution(v) for k, v in spec.grid.items()},
        **{k: d.optuna() for k, d in spec.random.items()},
    }
    trials, seen = [], set()
    for params in values:
        tid = trial_id(params)
        if tid in seen:  # (a random draw that repeats another: one run of it is enough)
            continue
        seen.add(tid)
        study.enqueue_trial(params)  # (asked next with these values)
        trials.append(Trial(tid, params, study.ask(dists).number))
    state = SweepState(spec.identity(), trials)
    state.save(sdir)
    return state


def check_same_sweep(spec: SweepSpec, state: SweepState, sdir: SweepDir) -> None:
    """A rerun continues the sweep in DIR only when it is the same sweep; else ConfigError naming the difference."""
    now = spec.identity()
    for key, then in state.identity.items():
        if now.get(key) != then:
            shown = "its content changed" if key == "config_digest" else f"was {then!r}, now {now.get(key)!r}"
            raise ConfigError(
                f"sweep dir '{sdir.root}' holds another sweep: {key} {shown}. HINT: use another --dir, or the same "
                "command as before to continue that sweep"
            )
