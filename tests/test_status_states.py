"""``orchestrator status`` names the state of a run — running, done, stopped, early-stopped, failed — with the
target step and integer counts, as a user following a run reads it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from conftest import EVERY, MAX_STEPS, QUICK, ROOT, cli, copy_run, env, latest_name, launch


def _status(run) -> dict:
    return json.loads(cli("status", str(run), "--json", check=True).stdout)


def test_status_tells_running_stopped_done_early_stopped_and_failed(refs, tmp_path):
    done = _status(refs[2])
    assert done["state"] == "done" and done["step"] == done["target_step"] == MAX_STEPS
    assert done["restarts"] == 0 and isinstance(done["restarts"], int) and done["world_size"] == 2
    assert "state: done" in cli("status", str(refs[2]), check=True).stdout

    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "orchestrator", "launch", "configs/quickstart.yaml", "--nproc", "2",
           f"run.dir={run}", *QUICK, "task.args.step_sleep_s=0.1"]  # fmt: skip
    proc = subprocess.Popen(cmd, env=env(), cwd=ROOT, stderr=subprocess.DEVNULL)
    while latest_name(run) != f"step-{EVERY:08d}":
        assert proc.poll() is None
        time.sleep(0.01)
    assert _status(run)["state"] == "running"
    os.kill(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=60) == 0
    stopped = _status(run)
    assert stopped["state"] == "stopped" and stopped["step"] < stopped["target_step"] == MAX_STEPS

    early = copy_run(refs[2], tmp_path / "early")
    proc = launch(early, 2, "task.args.eval_n=101", "eval.every=2", "eval.mode=max", "eval.patience=2",
                  "train.max_steps=40")  # fmt: skip
    assert "early stopping at step" in proc.stderr
    assert _status(early)["state"] == "early-stopped"

    failed = tmp_path / "failed"
    launch(failed, 2, "task.args={n: 200, hidden: 32, poison_index: 3}", "train.nonfinite=halt", check=False)
    info = _status(failed)
    assert info["state"] == "failed" and "non-finite" in info["failure"]
