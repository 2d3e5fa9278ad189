"""Fault tolerance with real processes and real signals: a killed rank, a kill in the middle of a checkpoint
write, a frozen (SIGSTOPped) rank. With launch.max_restarts the run finishes and its final weights are bitwise
equal to an uninterrupted run's."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time

import psutil
from conftest import EVERY, QUICK, ROOT, env, latest_name, load, tensors_equal

FT = ["launch.max_restarts=1", "launch.grace_period_s=1", "task.args.step_sleep_s=0.1"]


def start(run, *overrides):
    cmd = [
        sys.executable,
        "-m",
        "orchestrator",
        "launch",
        "configs/quickstart.yaml",
        "--nproc",
        "2",
        f"run.dir={run}",
        *QUICK,
        *FT,
        *overrides,
    ]
    return subprocess.Popen(
        cmd, env=env(), cwd=ROOT, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, start_new_session=True
    )


def worker_pid(run, rank: int) -> int:
    return json.loads((run / "logs" / f"heartbeat-rank-{rank}.json").read_text())["pid"]


def wait_for(run, proc, name: str) -> None:
    deadline = time.monotonic() + 60
    while latest_name(run) != name:
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline
        time.sleep(0.01)


def finish(proc) -> str:
    try:
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, err
    return err


def test_sigkill_of_one_rank_restarts_and_ends_bitwise_equal(refs, tmp_path):
    run = tmp_path / "run"
    proc = start(run)
    wait_for(run, proc, f"step-{EVERY:08d}")
    os.kill(worker_pid(run, 1), signal.SIGKILL)
    err = finish(proc)
    assert "rank 1: killed by SIGKILL" in err and "failed first" in err
    assert "restarting the group from the latest checkpoint (1/1)" in err
    assert tensors_equal(load(run), load(refs[2]))
    assert tensors_equal(load(run, "optim.pt"), load(refs[2], "optim.pt"))


def test_kill_in_the_middle_of_a_checkpoint_write_restarts_from_the_previous_one(refs, tmp_path):
    run, marker = tmp_path / "run", tmp_path / "died"
    proc = start(run, f"task.args.die_in_save={marker}", "task.args.die_in_save_step=8", "task.args.step_sleep_s=0")
    err = finish(proc)
    assert marker.exists(), "rank 0 was never killed mid-save: the test did not test anything"
    assert "rank 0: killed by SIGKILL" in err
    assert f"resumed from {run / 'checkpoints' / f'step-{EVERY:08d}'}" in err
    assert tensors_equal(load(run), load(refs[2]))
    assert not list((run / "checkpoints").glob(".tmp-*"))


def test_sigstopped_rank_is_detected_as_hung_and_the_run_recovers(refs, tmp_path):
    run = tmp_path / "run"
    proc = start(run, "launch.hang_timeout_s=3")
    wait_for(run, proc, f"step-{EVERY:08d}")
    pid = worker_pid(run, 1)
    assert pid in [c.pid for c in psutil.Process(proc.pid).children()]
    os.kill(pid, signal.SIGSTOP)
    t0 = time.monotonic()
    # Keep it frozen until the launcher tears it down (guards against anything continuing it meanwhile).
    while proc.poll() is None and psutil.pid_exists(pid) and time.monotonic() - t0 < 60:
        with contextlib.suppress(psutil.NoSuchProcess):
            if psutil.Process(pid).status() not in (psutil.STATUS_STOPPED, psutil.STATUS_ZOMBIE):
                os.kill(pid, signal.SIGSTOP)
        time.sleep(0.05)
    err = finish(proc)
    assert "rank 1: hung" in err and "no heartbeat" in err, err
    assert tensors_equal(load(run), load(refs[2]))
    assert time.monotonic() - t0 < 60
