"""Fault tolerance with real processes and real signals: a killed rank, a kill in the middle of a checkpoint
write, a frozen (SIGSTOPped) rank. With launch.max_restarts the run finishes and its final weights are bitwise
equal to an uninterrupted run's."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import psutil
import pytest
from conftest import EVERY, QUICK, ROOT, env, latest_name, load, rel_diff, tensors_equal

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


def test_a_run_dir_deleted_under_a_running_launch_stops_it(tmp_path):
    run = tmp_path / "run"
    proc = start(run)
    wait_for(run, proc, f"step-{EVERY:08d}")
    shutil.rmtree(run)  # its lock goes with it: a second launch could now take the same path
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, err
    assert "was deleted while the run was going" in err and "restarting" not in err, err


def test_dataloader_workers_die_with_their_rank(tmp_path):
    """A loader worker blocked in ``__getitem__`` (torch's watchdog only looks between samples) dies with its rank
    when the rank is SIGKILLed — the kernel kills it (PR_SET_PDEATHSIG), it is not left for minutes."""
    run, marker = tmp_path / "run", tmp_path / "blocked"
    blocking = ["data.num_workers=1", "task.args.block_after_samples=40", f"task.args.block_marker={marker}"]
    proc = start(run, *blocking, "launch.max_restarts=0")
    deadline = time.monotonic() + 60
    while not (tmp_path / "blocked-rank1").exists():  # rank 1's loader worker is inside the blocking __getitem__
        assert proc.poll() is None and time.monotonic() < deadline, "the loader worker never blocked"
        time.sleep(0.05)
    rank1 = psutil.Process(worker_pid(run, 1))
    loaders = rank1.children(recursive=True)
    assert loaders, "rank 1 has no loader worker"
    rank1.kill()
    _, alive = psutil.wait_procs(loaders, timeout=30)
    assert not alive, f"loader workers outlived their rank: {[p.pid for p in alive]}"
    proc.communicate(timeout=60)
    assert proc.returncode == 1


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_sigstopped_rank_is_detected_as_hung_and_the_run_recovers(parallel, refs, tmp_path):
    run = tmp_path / "run"
    proc = start(run, "launch.hang_timeout_s=3", f"train.parallel={parallel}")
    wait_for(run, proc, f"step-{EVERY:08d}")
    pid = worker_pid(run, 1)
    assert pid in [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
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
    if parallel == "ddp":
        assert tensors_equal(load(run), load(refs[2]))
    else:  # a sharded run, hung in the middle of its all-gathers, recovers from its sharded checkpoint
        assert rel_diff(load(run), load(refs[2])) <= 1e-5
    assert time.monotonic() - t0 < 60
