"""orchestrator/sweep/spec.py, store.py and report.py: parsing the search space, stable trial ids, seeded draws,
the check that a rerun continues the same sweep, and a trial's state read from its run dir."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from orchestrator.sweep.local import device_groups, trial_env
from orchestrator.sweep.report import pruned_numbers, trial_info
from orchestrator.sweep.spec import SweepSpec, parse_grid, parse_random, trial_id
from orchestrator.sweep.store import SweepDir, SweepState, check_same_sweep, draw_trials, register
from workers.config import ConfigError
from workers.contract import ENV_SWEEP_TRIAL, ErrorRecord
from workers.eval.pruning import Pruning
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


def test_a_trial_resumed_from_an_older_checkpoint_makes_the_pruning_decisions_it_made_before(tmp_path, ctx):
    """Successive halving (evals every 4 steps of 12): trial 0 reports first at step 4 and is kept; the three others
    then report better values there, two of them pruned. Trial 0 resumed from a checkpoint before step 4 evaluates
    step 4 again: asked afresh against today's rung it would be pruned (the worst of four), but the first decision
    stands — Optuna's pruner records each completed rung of the trial in the journal and never revisits it — and so
    does every later one."""
    spec = SweepSpec(CONFIG, grid={"optim.lr": [0.1, 0.2, 0.3, 0.4, 0.5]}, prune="halving")
    sdir = SweepDir(tmp_path / "sweep")
    state = register(spec, sdir, draw_trials(spec))

    def pruning(number: int) -> Pruning:  # a fresh process's view of trial ``number`` (as a (re)started run has)
        env = json.loads(trial_env(spec, sdir, state.trials[number])[ENV_SWEEP_TRIAL])
        return Pruning(env, ctx, every=4, last_step=12)

    assert pruning(0).decide(4, {"loss": 1.0}) is False  # the first at this rung: kept
    assert [pruning(n).decide(4, {"loss": v}) for n, v in ((1, 0.1), (2, 0.2), (3, 0.3))] == [False, True, True]
    assert pruned_numbers(sdir) == {2, 3}
    assert pruning(4).decide(4, {"loss": 1.0}) is True  # trial 0's value, asked afresh now: pruned
    resumed = pruning(0)
    assert resumed.decide(4, {"loss": 1.0}) is False and resumed.decide(8, {"loss": 0.9}) is False
    assert pruned_numbers(sdir) == {2, 3, 4}


def test_trials_at_once_get_disjoint_cores_or_gpus_covering_the_machine(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # no GPU: the cores this process may use are split
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4, 5, 6, 7})
    for parallel in (2, 3, 8):
        cores = [g["cores"] for g in device_groups(parallel)]
        assert len(cores) == parallel and set().union(*cores) == set(range(8)), cores
        assert sum(map(len, cores)) == 8 and max(map(len, cores)) - min(map(len, cores)) <= 1  # disjoint, even
    with pytest.raises(ConfigError, match="--parallel 9: more trials at once than the 8 CPU core"):
        device_groups(9)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3")
    assert device_groups(2, nproc=2) == [{"gpus": "0,2"}, {"gpus": "1,3"}]
    with pytest.raises(ConfigError, match="each trial needs 3 GPU"):
        device_groups(2, nproc=3)
