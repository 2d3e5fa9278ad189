"""orchestrator/sweep/spec.py, store.py and report.py: parsing the search space, stable trial ids, seeded draws,
the check that a rerun continues the same sweep, and a trial's state read from its run dir."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.sweep.report import pruned_numbers, trial_info
from orchestrator.sweep.spec import SweepSpec, parse_grid, parse_random, trial_id
from orchestrator.sweep.store import SweepDir, SweepState, check_same_sweep, draw_trials, register
from workers.config import ConfigError
from workers.contract import ErrorRecord
from workers.preflight import save_resolved_config
from workers.rundir import RunDir

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "quickstart.yaml"


def test_grid_and_random_dimensions_parse_or_say_what_is_wrong():
    assert parse_grid("optim.lr=[1e-3, 3e-3]") == ("optim.lr", [1e-3, 3e-3])
    assert parse_grid("optim.name=[adamw, sgd]") == ("optim.name", ["adamw", "sgd"])
    for bad, said in (("optim.lr=[]", "the list is empty"), ("optim.lr=3", "not a list"), ("=[1]", "KEY=[")):
        with pytest.raises(ConfigError, match=said.replace("[", r"\[")):
            parse_grid(bad)
    key, dist = parse_random("optim.lr=loguniform(1e-4, 1e-2)")
    assert key == "optim.lr" and dist.kind == "loguniform" and dist.optuna().log
    assert parse_random("train.seed=int(0,9)")[1].optuna().high == 9
    assert parse_random("optim.name=choice(adamw,sgd)")[1].optuna().choices == ("adamw", "sgd")
    for bad in ("optim.lr=uniform(2,1)", "optim.lr=loguniform(0,1)", "optim.lr=gauss(0,1)", "optim.lr=int(0.5,2)"):
        with pytest.raises(ConfigError, match="--random"):
            parse_random(bad)


def test_trial_ids_are_stable_readable_and_distinct():
    a = trial_id({"optim.lr": 0.001, "train.seed": 1})
    assert a == trial_id({"train.seed": 1, "optim.lr": 0.001}) and a.startswith("lr=0.001_seed=1-")
    assert a != trial_id({"optim.lr": 0.001, "train.seed": 2}) and "/" not in trial_id({"task.args.path": "/a/b"})


def test_random_draws_are_seeded_and_crossed_with_the_grid():
    spec = SweepSpec(CONFIG, grid={"optim.lr": [0.1, 0.2]}, random=dict([parse_random("train.seed=int(0,1000)")]),
                     trials=3, seed=7)  # fmt: skip
    drawn = draw_trials(spec)
    assert len(drawn) == 6 and drawn == draw_trials(spec) and [d["optim.lr"] for d in drawn] == [0.1] * 3 + [0.2] * 3
    assert drawn != draw_trials(SweepSpec(CONFIG, spec.grid, spec.random, 3, seed=8))


def test_a_rerun_must_be_the_same_sweep(tmp_path):
    spec = SweepSpec(CONFIG, grid={"optim.lr": [0.1, 0.2]})
    sdir = SweepDir(tmp_path / "sweep")
    state = register(spec, sdir, draw_trials(spec))
    assert [t.number for t in SweepState.load(sdir).trials] == [0, 1] == [t.number for t in state.trials]
    check_same_sweep(spec, state, sdir)  # the same command: continues
    other = SweepSpec(CONFIG, grid={"optim.lr": [0.1, 0.3]})
    with pytest.raises(ConfigError, match="holds another sweep: grid was"):
        check_same_sweep(other, state, sdir)
    with pytest.raises(ConfigError, match="metric was 'loss', now 'accuracy'"):
        check_same_sweep(SweepSpec(CONFIG, grid=spec.grid, metric="accuracy"), state, sdir)


def test_a_null_grid_value_reaches_the_config_as_null():
    spec = SweepSpec(CONFIG, grid=dict([parse_grid("eval.patience=[null, 5]")]))
    assert [spec.config_of(t, Path("/tmp/x")).eval.patience for t in spec.grid_points()] == [None, 5]
    assert spec.config_of({"optim.name": "sgd"}, Path("/tmp/x")).optim.name == "sgd"


def test_a_trial_whose_run_dir_says_failed_is_failed_without_the_local_sweeps_record(tmp_path):
    """A SLURM sweep's trials run without the local sweep that fills ``sweep.json``'s failures: the run dir's own
    state (its ranks' error records) says the trial failed."""
    spec = SweepSpec(CONFIG, grid={"optim.lr": [0.1, 0.2]})
    sdir = SweepDir(tmp_path / "sweep")
    state = register(spec, sdir, draw_trials(spec))
    trial = state.trials[0]
    paths = RunDir(sdir.trial_dir(trial.id))
    save_resolved_config(spec.config_of(trial.overrides, paths.root), paths)  # what a submission writes
    assert trial_info(trial, sdir, state, pruned_numbers(sdir))["state"] == "pending"  # (queued: nothing ran yet)
    ErrorRecord.from_exception(0, RuntimeError("CUDA error: an illegal memory access")).write(paths.error_file(0))
    info = trial_info(trial, sdir, state, pruned_numbers(sdir))
    assert info["state"] == "failed" and "illegal memory access" in info["error"], info
    assert not state.failed and trial_info(state.trials[1], sdir, state, set())["state"] == "pending"
