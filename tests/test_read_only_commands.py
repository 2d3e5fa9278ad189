"""Commands that follow or read a run change nothing in its run dir: not a byte, not a timestamp, no new file —
``status`` (text and JSON), ``plot`` (default output), ``ckpt inspect``, ``eval``. A run dir being trained by one
user is often watched by another (or by a cron job) with these."""

from __future__ import annotations

import shutil
import subprocess
import sys

from conftest import cli, env, fingerprint, latest_name


def test_status_plot_inspect_and_eval_write_nothing_into_the_run_dir(refs, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(refs[2], run)
    before = fingerprint(run)
    here = tmp_path / "cwd"
    here.mkdir()
    commands = [
        ("status", str(run)),
        ("status", str(run), "--json"),
        ("ckpt", "inspect", str(run)),
        ("ckpt", "inspect", str(run / "checkpoints" / latest_name(run))),
        ("eval", str(run), "--nproc", "2", "--json"),
    ]
    for args in commands:
        proc = cli(*args, check=True)
        assert proc.stdout.strip(), args
    # plot's default output lands in the current directory, not in the run dir
    proc = subprocess.run([sys.executable, "-m", "orchestrator", "plot", str(run)], env=env(), cwd=here,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert (here / "run-plot.png").stat().st_size > 0
    assert fingerprint(run) == before, "a read-only command changed the run dir"
