"""Tracking: one wandb run across a SIGKILL + relaunch and a resume on another world size, read back from the
offline files wandb wrote; steps strictly increasing with no gap or duplicate; disabled means no wandb at all;
progress bar on a terminal, log lines on a pipe; status and plot from metrics.jsonl."""

from __future__ import annotations

import json
import os
import pty
import re
import subprocess
import sys

import pytest
from conftest import EVERY, MAX_STEPS, QUICK, ROOT, cli, copy_run, env, launch, launch_and_kill, load, wandb_view

from workers.tracking.wandb_records import history_steps, offline_logs

OFFLINE = ["tracking.mode=offline", "train.log_every=2"]
EXPECTED_STEPS = [1, *range(2, MAX_STEPS + 1, 2)]


def _wandb_has_logged(run) -> bool:
    """The first attempt's wandb run file holds history rows (wandb may take seconds to start on a busy machine)."""
    try:
        rid = json.loads((run / "tracking.json").read_text())["wandb_run_id"]
    except (OSError, ValueError):
        return False
    return any(history_steps(p) for p in offline_logs(run, rid))


def test_one_wandb_run_across_a_kill_and_a_resume_on_another_world_size(tmp_path):
    killed = tmp_path / "killed"
    # The first attempt holds at step 7 (two micro-steps a step) after committing step 4, until its wandb run has
    # logged: the kill then lands after wandb's first rows, however slow the machine.
    hold = f"task.args.hold_at_call={2 * (EVERY + 2) + 1}"
    launch_and_kill(killed, 2, *OFFLINE, hold, kill_after=f"step-{EVERY:08d}", until=lambda: _wandb_has_logged(killed))
    rid_before = json.loads((killed / "tracking.json").read_text())["wandb_run_id"]
    for ws in (2, 1):
        run = copy_run(killed, tmp_path / f"resumed-ws{ws}")
        launch(run, ws, *OFFLINE)
        rid, per_start, config = wandb_view(run)
        assert rid == rid_before and len(per_start) == 2, per_start  # two starts, one wandb run
        steps = [s for start in per_start for s in start]
        assert steps == EXPECTED_STEPS, per_start  # strictly increasing: no gap, no duplicate at the resume
        assert per_start[1], "the relaunch logged nothing"
        train = config["train"].get("value", config["train"])  # the resolved config is recorded in the run
        assert train["max_steps"] == MAX_STEPS and config["tracking"].get("value", config["tracking"])["mode"]
        jsonl = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert jsonl == EXPECTED_STEPS
        state = json.loads((run / "checkpoints" / f"step-{MAX_STEPS:08d}" / "train_state.json").read_text())
        assert state["tracking_run_id"] == rid


def test_rows_of_a_dead_attempt_are_moved_aside_so_metrics_describe_the_checkpointed_run(tmp_path):
    """Killed before its first checkpoint, launched again with another lr: the run starts over, and metrics.jsonl
    holds the new run's rows only — the dead attempt's rows are in metrics.attempt-1.jsonl, not spliced in."""
    run = tmp_path / "run"
    rows = lambda path: [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []  # noqa: E731
    hold = "task.args.hold_at_call=7"  # step 4 (two micro-steps a step) never completes: no checkpoint
    launch_and_kill(run, 1, hold, kill_after=None, until=lambda: len(rows(run / "metrics.jsonl")) >= 1)
    dead = rows(run / "metrics.jsonl")
    assert not (run / "checkpoints").exists() or not list((run / "checkpoints").glob("step-*"))
    proc = launch(run, 1, "optim.lr=0.0123")
    assert "moved to metrics.attempt-1.jsonl" in proc.stderr
    assert rows(run / "metrics.attempt-1.jsonl") == dead
    now = rows(run / "metrics.jsonl")
    assert [r["step"] for r in now] == EXPECTED_STEPS
    assert now[0]["lr"] / dead[0]["lr"] == pytest.approx(0.0123 / 0.003)  # the new run's lr, not the dead one's


def test_tracking_disabled_writes_no_wandb_files_and_never_imports_wandb(refs, tmp_path):
    run = tmp_path / "run"
    launch(run, 1, "tracking.mode=disabled", "task.args.forbid_import=wandb")
    assert not (run / "wandb").exists() and not (run / "tracking.json").exists()
    assert load(run)  # trained to the end with wandb unimportable
    assert not (refs[2] / "wandb").exists()


def test_wandb_that_cannot_start_does_not_stop_training(tmp_path):
    """wandb runs in its own process (orch-wandb): online with no API key it fails to start, says so on rank 0's
    console and log, and training ends normally with every row in metrics.jsonl."""
    run, home = tmp_path / "run", tmp_path / "home"
    home.mkdir()
    e = {k: v for k, v in env().items() if k not in ("WANDB_API_KEY", "WANDB_MODE")}
    cmd = [sys.executable, "-m", "orchestrator", "launch", "configs/quickstart.yaml", "--nproc", "1",
           f"run.dir={run}", *QUICK, "tracking.mode=online", "train.log_every=2"]  # fmt: skip
    proc = subprocess.run(cmd, env={**e, "HOME": str(home)}, cwd=ROOT, text=True, capture_output=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    assert "wandb: could not start run" in proc.stderr and "No API key" in proc.stderr
    assert "wandb: could not start run" in (run / "logs" / "rank-0.log").read_text()
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == EXPECTED_STEPS
    assert load(run)


def test_progress_bar_on_a_terminal_and_plain_lines_on_a_pipe(refs, tmp_path):
    primary, secondary = pty.openpty()
    cmd = [
        sys.executable,
        "-m",
        "orchestrator",
        "launch",
        "configs/quickstart.yaml",
        "--nproc",
        "1",
        f"run.dir={tmp_path / 'run'}",
        *QUICK,
    ]
    proc = subprocess.Popen(cmd, env=env(), cwd=ROOT, stdout=secondary, stderr=secondary)
    os.close(secondary)
    out = b""
    while True:
        try:
            chunk = os.read(primary, 65536)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        out += chunk
    proc.wait(timeout=120)
    text = out.decode(errors="replace")
    assert proc.returncode == 0, text
    assert f"] {MAX_STEPS}/{MAX_STEPS} ETA" in text and "samples/s" in text and "[####" in text
    assert f"step {MAX_STEPS}/{MAX_STEPS} loss" not in text  # the bar replaces the periodic lines
    # log lines print above the bar, each on a line of its own, never glued to the bar's end
    assert "checkpoint step-00000004 committed" in text
    assert not re.search(r"samples/s *\d\d:\d\d:\d\d \[rank", text), text
    assert "leaked semaphore" not in text
    # piped (captured by the refs fixture): periodic plain lines, no bar
    log0 = (refs[2] / "logs" / "rank-0.log").read_text()
    assert f"step {MAX_STEPS}/{MAX_STEPS} loss" in log0 and "ETA" not in log0


def test_status_and_plot_from_metrics_jsonl(refs, tmp_path):
    run = copy_run(refs[2], tmp_path / "run")
    info = json.loads(cli("status", str(run), "--json", check=True).stdout)
    assert info["step"] == MAX_STEPS and info["state"] == "done" and info["restarts"] == 0
    assert info["latest_checkpoint"] == f"step-{MAX_STEPS:08d}" and info["samples_per_s"] > 0
    out = tmp_path / "curves.png"
    cli("plot", str(run), "--out", str(out), check=True)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
    proc = cli("status", str(tmp_path / "nope"))
    assert proc.returncode == 2 and "not a run dir" in proc.stderr
