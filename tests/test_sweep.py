"""Sweeps with real processes: a grid whose trials equal plain launches bitwise, a sweep SIGKILLed in its second
trial and run again, successive-halving pruning, trials in parallel, status, and bad input (exit 2, DIR not
created)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, cli, env, fingerprint, load, tensors_equal, wandb_view

from orchestrator.sweep.report import plot_sweep
from orchestrator.sweep.store import SweepDir
from workers.rundir import RunDir
from workers.tracking import read_metrics
from workers.tracking.wandb_records import offline_logs, read_records

# A short evaluated run of the common test task: 12 steps, an eval every 4 (the pruner's reports).
BASE = [
    "task.factory=orch_test_tasks:quick", "task.args={n: 200, hidden: 32, eval_n: 48}", "train.max_steps=12",
    "train.checkpoint_every=4", "data.global_batch_size=24", "eval.every=4", "tracking.mode=disabled",
    "train.log_every=4",
]  # fmt: skip
GRID = ["--grid", "optim.lr=[0.001,0.01]", "--grid", "train.seed=[0,1]"]
TOO_MANY = len(os.sched_getaffinity(0)) + 1  # --parallel above the cores this machine gives the tests (no GPU here)


def sweep(sdir: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """``orchestrator sweep`` of the base config, ``args`` (options and overrides) after BASE's overrides."""
    return cli("sweep", "configs/quickstart.yaml", "--dir", str(sdir), "--nproc", "2", *BASE, *args, check=check,
               timeout=600)  # fmt: skip


def status(sdir: Path) -> dict:
    return json.loads(cli("sweep", "status", str(sdir), "--json", check=True).stdout)


def plain(run: Path, overrides: dict) -> Path:
    """``orchestrator launch`` with BASE and the trial's overrides."""
    pairs = [f"{k}={v}" for k, v in overrides.items()]
    cli("launch", "configs/quickstart.yaml", "--nproc", "2", f"run.dir={run}", *BASE, *pairs, check=True)
    return run


def final(run_dir: str | Path) -> dict:
    return load(Path(run_dir), step=12)


def test_a_grid_runs_every_trial_and_each_equals_a_plain_launch(tmp_path):
    sdir = tmp_path / "sweep"
    sweep(sdir, *GRID)
    info = status(sdir)
    assert len(info["trials"]) == 4 and {t["state"] for t in info["trials"]} == {"done"}
    assert {json.dumps(t["overrides"], sort_keys=True) for t in info["trials"]} == {
        json.dumps({"optim.lr": lr, "train.seed": s}, sort_keys=True) for lr in (0.001, 0.01) for s in (0, 1)
    }
    assert all(t["metric"]["name"] == "loss" and t["step"] == 12 for t in info["trials"])
    best = min(info["trials"], key=lambda t: t["metric"]["value"])
    assert info["best"] == {"id": best["id"], "overrides": best["overrides"], "value": best["metric"]["value"]}
    trial = info["trials"][3]
    assert tensors_equal(final(trial["run_dir"]), final(plain(tmp_path / "plain", trial["overrides"])))
    png = tmp_path / "sweep.png"
    assert "wrote" in cli("plot", str(sdir), "--out", str(png), check=True).stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    drawn = plot_sweep(SweepDir(sdir), tmp_path / "again.png")  # (in-process: the figure's own lines)
    assert sorted(drawn) == sorted(t["id"] for t in info["trials"])  # every trial's eval curve in one figure
    text = cli("sweep", "status", str(sdir), check=True).stdout
    assert text.splitlines()[2].startswith(best["id"]) and f"best: {best['id']}" in text  # sorted by the metric


def test_a_sweep_killed_in_its_second_trial_finishes_when_run_again(tmp_path):
    sdir = tmp_path / "sweep"
    grid = ["--grid", "optim.lr=[0.001,0.01]"]
    cmd = [sys.executable, "-m", "orchestrator", "sweep", "configs/quickstart.yaml", "--dir", str(sdir), "--nproc",
           "2", *BASE, *grid, "task.args.step_sleep_s=0.1"]  # fmt: skip
    proc = subprocess.Popen(cmd, env=env(), cwd=ROOT, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        second = None
        while second is None or not (second / "checkpoints" / "latest").exists():
            assert proc.poll() is None and time.monotonic() < deadline
            trials = json.loads((sdir / "sweep.json").read_text())["trials"] if (sdir / "sweep.json").exists() else []
            second = sdir / trials[1]["id"] if len(trials) == 2 else None
            time.sleep(0.05)
        first = sdir / trials[0]["id"]
        os.killpg(proc.pid, signal.SIGKILL)  # the sweep, its trial's launcher and workers: the whole group
        proc.wait()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    before = fingerprint(first)
    sweep(sdir, *grid, "task.args.step_sleep_s=0.1")
    assert fingerprint(first) == before  # the finished trial was left alone
    info = status(sdir)
    assert [t["state"] for t in info["trials"]] == ["done", "done"]
    reference = plain(tmp_path / "plain", {"optim.lr": 0.01, "task.args.step_sleep_s": 0.1})
    assert tensors_equal(final(second), final(reference))  # resumed exactly


def test_halving_prunes_a_trial_runs_the_best_to_the_end_and_a_rerun_changes_nothing(tmp_path):
    sdir = tmp_path / "sweep"
    # Checkpoints every 6 steps, evals every 4: a checkpoint at an eval step before 12 is the pruned trial's save.
    args = ["--grid", "optim.lr=[0.01,0.003,0.0001,0.00003]", "--prune", "halving", "train.checkpoint_every=6"]
    sweep(sdir, *args)
    info = status(sdir)
    states = {t["overrides"]["optim.lr"]: t for t in info["trials"]}
    pruned = [t for t in info["trials"] if t["state"] == "pruned"]
    assert pruned and all(t["step"] < 12 and t["step"] % 4 == 0 for t in pruned), pruned
    for t in pruned:  # saved at the pruned step, and every earlier checkpoint kept
        assert committed(t["run_dir"]) == [s for s in (6,) if s < t["step"]] + [t["step"]], (t, committed(t["run_dir"]))
    assert info["best"]["id"] == states[0.01]["id"] and states[0.01]["step"] == 12
    before = fingerprint(sdir)
    proc = sweep(sdir, *args)
    assert "0 to run" in proc.stderr
    assert fingerprint(sdir) == before


def test_two_trials_at_once_each_equal_their_sequential_result(tmp_path):
    """Both trials train at the same time (their logged rows' wall times overlap) on disjoint cores (the split:
    tests/unit/test_sweep_spec.py), and each equals the same trial run alone, bitwise."""
    grid = ["--grid", "optim.lr=[0.001,0.01]", "task.args.step_sleep_s=0.3"]  # (sleeps: no effect on the weights)
    sweep(tmp_path / "parallel", *grid, "--parallel", "2")
    sweep(tmp_path / "sequential", *grid)
    a, b = status(tmp_path / "parallel")["trials"], status(tmp_path / "sequential")["trials"]
    assert [t["id"] for t in a] == [t["id"] for t in b]
    spans = [[r["time"] for r in read_metrics(RunDir(t["run_dir"])) if "time" in r] for t in a]
    assert all(len(times) >= 3 for times in spans), spans  # (rows at steps 1, 4, 8, 12)
    assert max(min(times) for times in spans) < min(max(times) for times in spans), spans  # they overlapped
    for x, y in zip(a, b, strict=True):
        assert tensors_equal(final(x["run_dir"]), final(y["run_dir"]))


def test_a_failed_trial_is_recorded_and_the_sweep_goes_on_then_exits_1(tmp_path):
    """The first trial's rank 0 crashes at its 5th step (a real exception in a real worker); the sweep records it,
    runs the next trial to the end, and says with its exit code (1: training failed) that a trial failed."""
    sdir = tmp_path / "sweep"
    proc = sweep(sdir, "--grid", "task.args.fail_call=[5,null]", "task.args.fail_rank=0", check=False)
    assert proc.returncode == 1, proc.stderr
    assert "failed (exit code 1); the sweep goes on" in proc.stderr and "injected failure on call 5" in proc.stderr
    info = status(sdir)
    crashed, fine = info["trials"]
    assert crashed["overrides"]["task.args.fail_call"] == 5 and crashed["state"] == "failed", crashed
    assert "injected failure" in crashed["error"] and (crashed["step"] or 0) < 12
    assert fine["state"] == "done" and fine["step"] == 12 and info["best"]["id"] == fine["id"]
    table = cli("sweep", "status", str(sdir), check=True).stdout
    assert any(line.startswith(crashed["id"]) and " failed " in line for line in table.splitlines()), table


def test_each_trial_is_a_wandb_run_of_the_sweeps_group_with_its_overrides_in_its_config(tmp_path):
    """wandb offline: every trial's run is in one group (the DIR's name) and carries the sweep, its id and its
    overrides in its config, read back from the files wandb wrote."""
    sdir = tmp_path / "lr-sweep"
    sweep(sdir, "--grid", "optim.lr=[0.001,0.01]", "tracking.mode=offline")
    trials = status(sdir)["trials"]
    assert len(trials) == 2
    for trial in trials:
        run = Path(trial["run_dir"])
        rid, _, config = wandb_view(run)
        value = {k: v.get("value", v) if isinstance(v, dict) else v for k, v in config.items()}  # (wandb may wrap)
        assert value["sweep"] == {"dir": str(sdir.resolve()), "trial": trial["id"], "overrides": trial["overrides"]}
        assert value["optim"]["lr"] == trial["overrides"]["optim.lr"] and value["tracking"]["group"] == "lr-sweep"
        groups = {r.run.run_group for p in offline_logs(run, rid) for r in read_records(p)
                  if r.WhichOneof("record_type") == "run"}  # fmt: skip
        assert groups == {"lr-sweep"}, groups


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--grid", "optim.lrr=[1,2]"], "unknown config key 'optim.lrr'"),
        (["--grid", "optim.lr=[0.1,-5]"], "'optim.lr' = -5"),
        (["--grid", "optim.lr=[]"], "--grid 'optim.lr=[]': the list is empty"),
        (["--random", "optim.lr=loguniform(0,1)"], "loguniform needs a < b > 0"),
        (["--random", "optim.lr=normal(0,1)"], "expected KEY=DIST"),
        (["--grid", "optim.lr=[0.1]", "--parallel", str(TOO_MANY)], f"--parallel {TOO_MANY}: more trials at once than"),
        (["--grid", "optim.lr=[0.1]", "--slurm", "--parallel", "2"], "--parallel 2: trials at once on this machine"),
        (["--grid", "optim.lr=[0.1]", "eval.every=0"], "needs evaluation"),
        (["--grid", "run.dir=[a,b]"], "each trial's run.dir is DIR/<trial id>"),
        (["--grid", "optim.lr=[0.1]", "--parallel", "0"], "--parallel 0: must be at least 1"),
        (["--random", "optim.lr=uniform(0.1,0.2)", "--seed", "-1"], "--seed -1: must be in [0, 2**32)"),
        (["--grid", "optim.lr=[0.1]", "--nodes", "2"], "--nodes: a SLURM option; add --slurm"),
        (["--grid", "task.args.not_an_arg=[1,2]", "task.factory=workers.tasks.quickstart:build"], "not_an_arg"),
    ],
)
def test_bad_sweeps_exit_2_in_one_line_and_create_nothing(tmp_path, args, expected):
    sdir = tmp_path / "sweep"
    proc = sweep(sdir, *args, check=False)
    assert proc.returncode == 2 and expected in proc.stderr, proc.stderr
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert not sdir.exists()


def test_a_dir_holding_another_sweep_is_refused_naming_the_difference(tmp_path):
    sdir = tmp_path / "sweep"
    sweep(sdir, "--grid", "optim.lr=[0.01]")
    before = fingerprint(sdir)
    proc = sweep(sdir, "--grid", "optim.lr=[0.02]", check=False)
    assert proc.returncode == 2 and "holds another sweep: grid was {'optim.lr': [0.01]}" in proc.stderr, proc.stderr
    assert fingerprint(sdir) == before


def test_a_metric_the_task_does_not_make_is_a_usage_error_before_anything_runs(tmp_path):
    """Only an eval tells the metric names: the sweep probes the task on the CPU before DIR exists or a trial
    starts. The trial's own check (workers) is not reached: one line, no trial, no DIR."""
    sdir = tmp_path / "sweep"
    proc = sweep(sdir, "--grid", "optim.lr=[0.01,0.02]", "--metric", "accuracy", check=False)
    assert proc.returncode == 2, proc.stderr
    said = "orchestrator: error: sweep --metric 'accuracy': the task's eval does not produce it. HINT: use one of loss"
    assert proc.stderr == said + "\n"
    assert not sdir.exists()
    # A task whose eval makes other names: the hint lists them, the sweep's default metric (loss) is refused too.
    named = ["task.factory=orch_test_tasks:named_metrics", "task.args={n: 200, hidden: 32, eval_n: 48}"]
    proc = sweep(sdir, "--grid", "optim.lr=[0.01]", *named, check=False)
    assert proc.returncode == 2 and "sweep --metric 'loss'" in proc.stderr and "use one of mae, mse" in proc.stderr
    assert proc.stderr.count("\n") == 1 and not sdir.exists(), proc.stderr
    ok = sweep(sdir, "--grid", "optim.lr=[0.01]", "--metric", "mae", *named, "train.max_steps=4")
    assert ok.returncode == 0 and status(sdir)["trials"][0]["metric"]["name"] == "mae"


def committed(run_dir: str | Path) -> list[int]:
    """The steps of the run's committed checkpoints, oldest first."""
    return sorted(step for step, _ in RunDir(run_dir).committed_folders())


def ctrl_c(sdir: Path, *args: str, trials: int) -> tuple[subprocess.Popen, str, dict[str, int]]:
    """Start a sweep in a session of its own, wait until ``trials`` of its trials have committed a checkpoint, then
    SIGINT its whole process group, as a terminal's Ctrl-C does (the sweep, the trials' launchers and workers).
    Returns the ended process, its stderr, and each trial's newest committed step before the signal."""
    cmd = [sys.executable, "-m", "orchestrator", "sweep", "configs/quickstart.yaml", "--dir", str(sdir), "--nproc",
           "2", *BASE, *args]  # fmt: skip
    proc = subprocess.Popen(cmd, env=env(), cwd=ROOT, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        while len(saved := {r.name: committed(r)[-1] for r in sdir.glob("*/") if committed(r)}) < trials:
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr and proc.stderr.read()
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return proc, err, saved


def test_a_sweep_stopped_by_ctrl_c_saves_its_trial_and_the_rerun_finishes_it_with_the_pruner_on(tmp_path):
    """Ctrl-C (SIGINT to the process group): the running trial saves at the step it stopped at — a checkpoint later
    than any before the signal, before the end — and the sweep exits 0 (a stop on request); the stopped trial is
    not a finished one (Optuna is told nothing), so the rerun resumes it — its evals still go to the pruner."""
    sdir = tmp_path / "sweep"
    grid = ["--grid", "optim.lr=[0.01,0.003]", "--prune", "halving", "task.args.step_sleep_s=0.1"]
    proc, err, before = ctrl_c(sdir, *grid, trials=1)
    assert proc.returncode == 0 and "sweep stopped; the same command continues it" in err, err
    first = status(sdir)["trials"][0]
    assert first["state"] == "pending" and list(before) == [first["id"]], (first, before)
    stop_step = committed(first["run_dir"])[-1]
    assert before[first["id"]] < stop_step < 12 and first["step"] == stop_step, (before, stop_step, first)
    assert status(sdir)["trials"][1]["state"] == "pending" and not Path(status(sdir)["trials"][1]["run_dir"]).exists()
    sweep(sdir, *grid)
    assert {t["state"] for t in status(sdir)["trials"]} <= {"done", "pruned"}
    assert status(sdir)["trials"][0]["state"] == "done" and status(sdir)["trials"][0]["step"] == 12


def test_ctrl_c_under_parallel_2_stops_both_running_trials_each_saved(tmp_path):
    sdir = tmp_path / "sweep"
    # 40 steps: a trial that started seconds before the other is still training when both have saved once
    proc, err, before = ctrl_c(sdir, "--grid", "optim.lr=[0.01,0.003]", "--parallel", "2", "train.max_steps=40",
                               "task.args.step_sleep_s=0.2", trials=2)  # fmt: skip
    assert proc.returncode == 0 and "sweep stopped; the same command continues it" in err, err
    trials = status(sdir)["trials"]
    assert {t["id"] for t in trials} == set(before)
    for trial in trials:
        stop_step = committed(trial["run_dir"])[-1]
        assert trial["state"] == "pending" and before[trial["id"]] < stop_step < 40, (trial, before)
