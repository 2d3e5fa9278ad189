"""The README's examples work as written: its own-task example with evaluation (the code, the YAML and the
command, taken from the README's text), and the eval commands run after the README's own charlm command."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from conftest import ROOT

README = (ROOT / "README.md").read_text()


def _block(start: str) -> str:
    """The README's fenced code block whose first line starts with ``start``."""
    found = re.findall(r"```[a-z]*\n(" + re.escape(start) + r"[^\n]*\n.*?)```", README, flags=re.S)
    assert len(found) == 1, f"README: {len(found)} blocks start with {start!r}"
    return found[0]


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([".", str(ROOT)])}
    env.pop("OMP_NUM_THREADS", None)
    return subprocess.run([sys.executable, "-m", "orchestrator", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)  # fmt: skip


def test_the_own_task_example_with_eval_runs_as_written(tmp_path):
    (tmp_path / "mypkg").mkdir()
    (tmp_path / "mypkg" / "__init__.py").write_text("")
    (tmp_path / "mypkg" / "classify.py").write_text(_block("# mypkg/classify.py"))
    (tmp_path / "classify.yaml").write_text(_block("# classify.yaml"))
    command = _block("PYTHONPATH=. orchestrator launch classify.yaml --nproc 2").split()
    proc = _run([*command[2:], "tracking.mode=disabled"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "early stopping at step" in proc.stderr and "new best" in proc.stderr, proc.stderr
    run = tmp_path / "runs" / "classify"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    accuracy = [r["eval/accuracy"] for r in rows if "eval/accuracy" in r]
    assert accuracy and max(accuracy) > 0.9
    assert (run / "checkpoints" / "best").is_file()
    status = json.loads(_run(["status", str(run), "--json"], tmp_path).stdout)
    assert status["state"] == "early-stopped" and status["best"]["metric"] == "accuracy"


def test_the_eval_commands_work_after_the_readmes_charlm_run(tmp_path):
    launch = _block("orchestrator launch configs/quickstart.yaml --nproc 2 eval.every=50")
    charlm = next(line for line in launch.splitlines() if "configs/charlm.yaml" in line).split("#")[0].split()
    run = tmp_path / "runs" / "charlm"
    proc = _run([*charlm[1:], f"run.dir={run}", "tracking.mode=disabled"], ROOT)
    assert proc.returncode == 0, proc.stderr
    evals = _block("orchestrator eval runs/charlm ")
    for line in evals.splitlines():
        args = line.split("#")[0].replace("runs/charlm", str(run)).split()
        proc = _run(args[1:], ROOT)
        assert proc.returncode == 0, f"{line}\n{proc.stderr}"
