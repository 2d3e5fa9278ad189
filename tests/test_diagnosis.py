"""Why a run hangs, seen as a user sees it: a frozen rank (SIGSTOP) and a dataset that blocks forever on one rank,
found by the launcher's hang timeout, reported with every rank's stacks (py-spy) before the teardown — the rank
without progress named, with its own code's file and line, the others inside their collective — and
``orchestrator stacks RUN`` on a running run, which changes nothing in it."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from conftest import QUICK, ROOT, cli, env, fingerprint

from orchestrator.launcher import free_port
from workers.contract import HANG_WAITING

HANG = ["launch.hang_timeout_s=4", "launch.grace_period_s=1", "train.max_steps=100000", "train.checkpoint_every=1000"]


def _start(run: Path, *overrides: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "orchestrator", "launch", "configs/quickstart.yaml", "--nproc", "2", f"run.dir={run}",
           *QUICK, *HANG, *overrides]  # fmt: skip
    return subprocess.Popen(
        cmd, env=env(), cwd=ROOT, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, start_new_session=True
    )


def _beat(run: Path, rank: int) -> dict | None:
    with contextlib.suppress(OSError, ValueError):
        return json.loads((run / "logs" / f"heartbeat-rank-{rank}.json").read_text())
    return None


def _wait_training(run: Path, proc: subprocess.Popen, past_step: int = 3) -> None:
    """Until both ranks report a training step past ``past_step`` (then the hang watch is armed)."""
    deadline = time.monotonic() + 90
    while not all((b := _beat(run, r)) and b["phase"] == "train" and b["step"] > past_step for r in (0, 1)):
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline, "the run did not start training"
        time.sleep(0.05)


def _finish(proc: subprocess.Popen) -> tuple[int, str]:
    try:
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return proc.returncode, err


def _rank_line(err: str, rank: int) -> str:
    return next(line for line in err.splitlines() if re.search(rf"\brank {rank} \(pid \d+\): ", line))


def test_a_frozen_rank_is_named_with_every_ranks_stacks(tmp_path):
    run = tmp_path / "run"
    proc = _start(run, "task.args.step_sleep_s=0.02")
    _wait_training(run, proc)
    pid = _beat(run, 1)["pid"]
    os.kill(pid, signal.SIGSTOP)
    code, err = _finish(proc)
    assert code == 1, err
    assert "rank 1: hung — no heartbeat" in err, err
    frozen, waiting = _rank_line(err, 1), _rank_line(err, 0)
    assert frozen.endswith("<- no progress") and not waiting.endswith("<- no progress"), err
    assert ", inside " in waiting, waiting  # rank 0 waits in a collective for the frozen one
    assert "workers/train/trainer.py:" in waiting, waiting  # and its own innermost frame is the trainer's
    stacks = (run / "logs" / "stacks-0.txt").read_text()
    for rank in (0, 1):
        section = stacks.split(f"=== rank {rank} ")[1].split("=== rank")[0]
        for thread in ('"MainThread"', '"heartbeat"', '"launcher-lifeline"'):  # every thread, of every rank
            assert f"Thread {thread}" in section, (rank, thread, section)
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def test_a_dataset_that_blocks_on_one_rank_is_named_with_its_file_and_line(tmp_path):
    run = tmp_path / "run"
    proc = _start(run, "task.args.block_after_samples=200", "task.args.block_rank=1")
    code, err = _finish(proc)
    assert code == 1, err
    blocked, waiting = _rank_line(err, 1), _rank_line(err, 0)
    assert blocked.endswith("<- no progress") and "orch_test_tasks.py:" in blocked and "__getitem__" in blocked, err
    assert ", inside " in waiting and not waiting.endswith("<- no progress"), err


def test_stacks_of_a_running_run_print_both_ranks_and_change_nothing(tmp_path):
    run = tmp_path / "run"
    proc = _start(run, "task.args.step_sleep_s=0.05")
    try:
        _wait_training(run, proc)
        before = fingerprint(run, mtimes=False)
        shown = cli("stacks", str(run), timeout=60)
        assert shown.returncode == 0, shown.stderr
        for rank in (0, 1):
            assert f"=== rank {rank} (pid {_beat(run, rank)['pid']}) ===" in shown.stdout
        assert shown.stdout.count('Thread "MainThread"') == 2
        assert "workers/train/trainer.py" in shown.stdout
        assert not list((run / "logs").glob("stacks-*")) and fingerprint(run, mtimes=False).keys() == before.keys()
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def test_stacks_of_a_run_that_is_not_running_is_one_line_and_exit_2(tmp_path):
    for where in (tmp_path / "nowhere", tmp_path):
        proc = cli("stacks", str(where))
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr
        assert "orchestrator: error:" in proc.stderr
    last = cli("stacks", str(tmp_path), "--last")  # a run dir with no hang recorded
    assert last.returncode == 2 and last.stderr.count("\n") == 1 and "recorded no stacks" in last.stderr, last.stderr


def test_a_rank_slower_than_the_others_is_named_the_straggler(tmp_path):
    run = tmp_path / "run"
    proc = cli(
        "launch", "configs/quickstart.yaml", "--nproc", "3", f"run.dir={run}", *QUICK, "data.global_batch_size=24",
        "train.max_steps=12", "train.log_every=4", "task.args.step_sleep_s=0.05", "task.args.slow_rank=2",
        timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("is a straggler") == 1 and "rank 2 is a straggler" in proc.stderr, proc.stderr
    info = json.loads(cli("status", str(run), "--json", check=True).stdout)
    assert info["straggler"]["rank"] == 2 and info["straggler"]["ratio"] >= 1.25, info
    assert [r["rank"] for r in info["ranks"]] == [0, 1, 2]
    assert all({"compute_ms", "data_wait_ms", "step_time_ms", "rss_mb"} <= r.keys() for r in info["ranks"])
    assert info["ranks"][2]["compute_ms"] > 40 > max(info["ranks"][0]["compute_ms"], info["ranks"][1]["compute_ms"])
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert {r["straggler_rank"] for r in rows if "straggler_rank" in r} == {2}  # the rows wandb gets, too
    text = cli("status", str(run), check=True).stdout
    assert "straggler: rank 2 (its compute is" in text and "ranks: rank 0: " in text


def test_a_collective_timeout_reports_the_stacks_of_the_rank_it_waited_for(tmp_path):
    """Hang detection off: the other rank's collective times out (launch.collective_timeout_s) first — the stacks
    are read before the teardown all the same, and name the rank it waited for."""
    run = tmp_path / "run"
    proc = _start(
        run, "launch.hang_timeout_s=0", "launch.collective_timeout_s=5", "task.args.block_after_samples=200",
        "task.args.block_rank=1",
    )  # fmt: skip
    code, err = _finish(proc)
    assert code == 1 and "Timed out waiting" in err, err
    blocked = _rank_line(err, 1)
    assert blocked.endswith("<- no progress") and "orch_test_tasks.py:" in blocked, err
    assert (run / "logs" / "stacks-0.txt").read_text().startswith("# attempt 0: rank 0: exit code 1")


@pytest.mark.parametrize("py_spy", ["none", "/nonexistent/py-spy"])
def test_without_py_spy_the_ranks_dump_their_own_stacks(tmp_path, py_spy):
    """Where py-spy cannot read a worker (not installed, no ptrace permission), each rank's faulthandler dumps
    its threads on the launcher's signal: ``stacks`` still shows both ranks, and says how it read them."""
    run = tmp_path / "run"
    proc = _start(run, "task.args.step_sleep_s=0.05")
    try:
        _wait_training(run, proc)
        shown = subprocess.run(
            [sys.executable, "-m", "orchestrator", "stacks", str(run)], env={**env(), "ORCH_PY_SPY": py_spy},
            cwd=ROOT, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert shown.returncode == 0, shown.stderr
        why = "py-spy is not installed" if py_spy == "none" else f"py-spy '{py_spy}' cannot run"
        assert shown.stdout.count(f"via faulthandler ({why}") == 2, shown.stdout
        assert shown.stdout.count('Thread "MainThread"') == 2 and "workers/train/trainer.py" in shown.stdout
        assert proc.poll() is None  # the dump did not disturb the run
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def test_under_torchrun_each_rank_watches_itself_and_writes_its_stacks_at_a_hang(tmp_path):
    """No launcher of ours watches a torchrun (or SLURM) run: each rank's own watch finds the hang, writes every
    thread's stack into its own stacks file of the attempt, and ends the rank as failed — the rank stuck on its own
    first, so torchrun's report names it, not the rank that only waited for it in a collective; ``orchestrator
    stacks RUN`` afterwards shows both ranks' files in rank order."""
    run = tmp_path / "run"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
        "-m", "workers", "configs/quickstart.yaml", f"run.dir={run}", *QUICK, *HANG,
        "task.args.block_after_samples=200", "task.args.block_rank=1",
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=env(), cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert proc.returncode != 0
    assert "HangError: hung — no progress for" in proc.stderr, proc.stderr[-3000:]
    root_cause = proc.stderr.split("Root Cause (first observed failure):", 1)[1]
    assert re.search(r"rank\s*: 1 \(local_rank: 1\)", root_cause), proc.stderr[-3000:]  # the stuck rank
    assert HANG_WAITING not in root_cause.split("=====")[0], root_cause
    # one file per rank: "# rank r: <why>", "# <where it is>", then every thread
    assert not (run / "logs" / "stacks-0.txt").exists()
    blocks = {r: (run / "logs" / f"stacks-0.rank{r}.txt").read_text() for r in (0, 1)}
    assert blocks[1].startswith("# rank 1: no progress") and HANG_WAITING not in blocks[1].splitlines()[0]
    assert "orch_test_tasks.py:" in blocks[1].splitlines()[1] and "__getitem__" in blocks[1], blocks[1]  # its dataset
    assert blocks[0].splitlines()[0].endswith(HANG_WAITING), blocks[0]  # rank 0 only waits for it
    assert "inside " in blocks[0].splitlines()[1] and "workers/train/trainer.py:" in blocks[0], blocks[0]
    for block in blocks.values():  # every thread, named
        assert 'Thread "MainThread"' in block and 'Thread "orch-selfwatch"' in block, block
    now = cli("stacks", str(run))  # nothing runs any more: one line, exit 2, pointing at --last
    assert now.returncode == 2 and now.stderr.count("\n") == 1 and "--last` prints those of its last hang" in now.stderr
    shown = cli("stacks", str(run), "--last", check=True).stdout
    assert shown.index("stacks-0.rank0.txt") < shown.index("# rank 0: ") < shown.index("stacks-0.rank1.txt")
    assert shown.index("stacks-0.rank1.txt") < shown.index("# rank 1: "), shown
