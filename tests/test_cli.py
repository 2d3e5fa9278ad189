"""The command line as a user meets it: malformed input, a failing rank, torchrun, a graceful stop."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from conftest import EVERY, MAX_STEPS, QUICK, ROOT, cli, env, latest_name, launch, load, tensors_equal

from orchestrator.launcher import free_port

BAD_INPUTS = {
    "unknown key": (["train.max_step=5"], "did you mean 'train.max_steps'"),
    "wrong type": (["train.max_steps=abc"], "'train.max_steps' = 'abc': expected int"),
    "indivisible batch": (["data.global_batch_size=25", "--nproc", "2"], "not divisible by world size 2"),
    "bad factory module": (["task.factory=no_such_pkg.tasks:build"], "cannot import module 'no_such_pkg.tasks'"),
    "bad factory attr": (["task.factory=workers.tasks.quickstart:nope"], "has no function 'nope'"),
    "bad choice": (["train.precision=fp8"], "'train.precision' = 'fp8': must be one of"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_malformed_input_exits_2_with_one_line_and_writes_nothing(case, tmp_path):
    args, expected = BAD_INPUTS[case]
    run = tmp_path / "run"
    proc = cli("launch", "configs/quickstart.yaml", f"run.dir={run}", *args)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert not run.exists()


def test_missing_config_file_and_existing_run_dir_untouched(tmp_path, refs):
    proc = cli("launch", str(tmp_path / "nope.yaml"))
    assert proc.returncode == 2 and "nope.yaml' not found" in proc.stderr and len(proc.stderr.splitlines()) == 1
    # a broken command against an existing run never touches it
    run = tmp_path / "existing"
    shutil.copytree(refs[1], run)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    proc = cli("launch", "configs/quickstart.yaml", f"run.dir={run}", *QUICK, "optim.lr=fast")
    assert proc.returncode == 2
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


def test_torchrun_path_reports_config_errors_the_same_way(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "workers", "configs/quickstart.yaml", f"run.dir={tmp_path / 'r'}", "optim.lrr=1"],
        env=env(),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2 and "did you mean 'optim.lr'" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "r").exists()


def test_a_failing_rank_stops_the_others_and_is_named_with_its_traceback(tmp_path):
    start = time.monotonic()
    proc = launch(tmp_path / "run", 3, "task.args.fail_rank=1", "task.args.fail_call=5", check=False)
    assert proc.returncode == 1
    assert "rank 1 failed first" in proc.stderr
    assert "RuntimeError: injected failure on call 5" in proc.stderr
    assert 'orch_test_tasks.py", line' in proc.stderr  # the traceback itself, not only the message
    assert time.monotonic() - start < 120  # no hang (the collective timeout alone would take 600 s)
    # `orchestrator status` of the failed run says so: which rank, why, where its log is
    status = cli("status", str(tmp_path / "run"), check=True).stdout
    assert "state: failed" in status and "rank 1: RuntimeError: injected failure on call 5" in status, status
    assert str(tmp_path / "run" / "logs" / "rank-1.log") in status


def test_version_and_the_console_script_import_a_task_from_the_current_directory(tmp_path):
    assert cli("--version").stdout.strip().startswith("orchestrator 0.")
    # a user's task module next to their config: `python -m orchestrator` finds it, so must the console script
    (tmp_path / "mytask.py").write_text("from workers.tasks.quickstart import build\n")
    script = Path(sys.executable).parent / "orchestrator"
    e = {k: v for k, v in env().items() if k != "PYTHONPATH"}
    cmd = [str(script), "launch", str(ROOT / "configs/quickstart.yaml"), "--nproc", "1", "run.dir=run",
           "task.factory=mytask:build", "train.max_steps=2", "tracking.mode=disabled"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=tmp_path, env=e, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "run" / "checkpoints" / "step-00000002" / "manifest.json").is_file()


def test_under_torchrun_a_failing_rank_is_named_in_torchruns_own_report(tmp_path):
    # torchrun reads TORCHELASTIC_ERROR_FILE of a failed rank: its summary then shows our message and traceback
    # instead of "error_file: <N/A>" and a bare exit code.
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
        "-m", "workers", "configs/quickstart.yaml", f"run.dir={tmp_path / 'run'}", *QUICK,
        "task.args.fail_rank=1", "task.args.fail_call=3", "launch.collective_timeout_s=30",
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=env(), cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    report = proc.stderr[proc.stderr.rfind("Root Cause") :]
    assert "rank      : 1" in report, proc.stderr[-3000:]
    assert "RuntimeError: injected failure on call 3" in report, proc.stderr[-3000:]
    assert 'orch_test_tasks.py", line' in report  # the traceback, from our record


def test_torchrun_trains_the_same_weights_as_launch(refs, tmp_path):
    run = tmp_path / "torchrun"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-port",
        str(free_port()),
        "-m",
        "workers",
        "configs/quickstart.yaml",
        f"run.dir={run}",
        *QUICK,
    ]
    proc = subprocess.run(cmd, env=env(), cwd=ROOT, capture_output=True, text=True, timeout=90)
    assert proc.returncode == 0, proc.stderr
    assert (run / "config.yaml").is_file()
    assert tensors_equal(load(run), load(refs[2]))
    assert tensors_equal(load(run, "optim.pt"), load(refs[2], "optim.pt"))


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_signal_to_the_launcher_saves_at_the_next_step_and_exits_0(sig, refs, tmp_path):
    run = tmp_path / "run"
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
        "task.args.step_sleep_s=0.1",
    ]
    # A launcher started from a script may inherit SIGINT ignored: it must install its own handler anyway.
    proc = subprocess.Popen(
        cmd,
        env=env(),
        cwd=ROOT,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
    )
    while latest_name(run) != f"step-{EVERY:08d}":
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.01)
    os.kill(proc.pid, sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    stopped_at = int(latest_name(run).split("-")[1])
    assert EVERY < stopped_at < MAX_STEPS, "the stop did not save at the next step boundary"
    assert f"stop requested ({sig.name} during step" in err, err  # the workers name the signal the launcher got
    assert f"all ranks saved step {stopped_at} and are leaving" in err
    assert f"stopped on request ({sig.name})" in err and "stopped early" not in err
    launch(run, 2)
    assert tensors_equal(load(run), load(refs[2]))


def test_a_second_sigint_tears_the_workers_down_at_once(tmp_path):
    run = tmp_path / "run"
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
        "task.args.step_sleep_s=2",
    ]  # 4 s steps: a graceful stop would take long
    proc = subprocess.Popen(cmd, env=env(), cwd=ROOT, stderr=subprocess.PIPE, text=True)
    while not (run / "logs" / "heartbeat-rank-1.json").exists():
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.05)
    time.sleep(1.0)
    tree = psutil.Process(proc.pid).children(recursive=True)
    os.kill(proc.pid, signal.SIGINT)
    first = proc.stderr.readline()
    while "stop requested" not in first:  # the first request has been relayed to the workers ...
        first = proc.stderr.readline()
        assert first, "the launcher never relayed the first stop request"
    time.sleep(1.1)  # ... and the second comes a human moment later (the contract: at least 1 s after it)
    t0 = time.monotonic()
    os.kill(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert time.monotonic() - t0 < 3.5, "the second SIGINT did not tear down at once"
    assert proc.returncode == 1 and "second stop request" in err
    _, alive = psutil.wait_procs(tree, timeout=5)
    assert not alive
    assert latest_name(run) is None  # nothing was saved: the first step never finished


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_two_signals_in_one_instant_are_one_graceful_stop(sig, tmp_path):
    """GNU `timeout -s INT`, `kill -TERM -PGID` and a terminal's Ctrl-C signal the launcher and its process group
    at once: the launcher sees two requests in one instant. That is still one request: save at the next step,
    exit 0 — the fork server in the same group ignores the signal (its death would take the workers along)."""
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "orchestrator", "launch", "configs/quickstart.yaml", "--nproc", "2",
           f"run.dir={run}", *QUICK, "task.args.step_sleep_s=0.1"]  # fmt: skip
    proc = subprocess.Popen(cmd, env=env(), cwd=ROOT, stderr=subprocess.PIPE, text=True, start_new_session=True)
    while latest_name(run) != f"step-{EVERY:08d}":
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.01)
    os.kill(proc.pid, sig)
    os.killpg(proc.pid, sig)  # the launcher again, its workers and its fork server
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "stop requested" in err and "second stop request" not in err
    stopped_at = int(latest_name(run).split("-")[1])
    assert EVERY <= stopped_at < MAX_STEPS and (run / "checkpoints" / latest_name(run) / "manifest.json").is_file()
