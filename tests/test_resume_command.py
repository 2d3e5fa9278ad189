"""``orchestrator resume RUN_DIR`` continues a run from its own saved config (nobody retypes overrides), and
``launch`` over an existing run names every key that differs from the config the run was started with."""

from __future__ import annotations

import subprocess
import sys

from conftest import EVERY, cli, copy_run, env, launch, launch_and_kill, load, tensors_equal

CHANGED = ["optim.lr=0.002", "train.seed=3", "task.args.hidden=24"]  # what a user would have to retype


def test_resume_continues_from_the_saved_config_bitwise_like_the_full_command(tmp_path):
    killed = tmp_path / "killed"
    launch_and_kill(killed, 2, *CHANGED, "task.args.step_sleep_s=0.1", kill_after=f"step-{EVERY:08d}")
    by_launch = copy_run(killed, tmp_path / "by-launch")
    launch(by_launch, 2, *CHANGED, "task.args.step_sleep_s=0.1")  # the full command, retyped
    by_resume = copy_run(killed, tmp_path / "by-resume")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    proc = subprocess.run([sys.executable, "-m", "orchestrator", "resume", str(by_resume), "--nproc", "2"],
                          env=env(), cwd=elsewhere, capture_output=True, text=True, timeout=180)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "the config differs" not in proc.stderr
    assert tensors_equal(load(by_resume), load(by_launch))
    assert tensors_equal(load(by_resume, "optim.pt"), load(by_launch, "optim.pt"))
    assert not list(elsewhere.iterdir()), "resume wrote into the current directory"

    forgot = copy_run(killed, tmp_path / "forgot")
    # relaunched without one of the overrides it was started with (one a resume accepts: optim settings may change)
    proc = launch(forgot, 2, "train.seed=3", "task.args.hidden=24", "task.args.step_sleep_s=0.1")
    note = next((line for line in proc.stderr.splitlines() if "the config differs from the one" in line), "")
    assert "optim.lr: 0.002 -> 0.003" in note and "train.seed" not in note, proc.stderr
    assert f"orchestrator resume {forgot}" in note


def test_resume_of_a_folder_that_holds_no_run_is_one_line_and_writes_nothing(tmp_path):
    proc = cli("resume", str(tmp_path / "nothing-here"))
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "is not a run dir" in proc.stderr, proc.stderr
    assert not (tmp_path / "nothing-here").exists()
