"""Known failures read as one clean report: the cause in one line on the console, the traceback in the rank's log
only — not the same traceback twice and the message four times. A full disk is named as a full disk (also when
torch reports it as "unexpected pos") and never retried. (The full / read-only disk mid-run and the unsafe
checkpoint are in test_checkpoint_safety.py, with the same assertions.)"""

from __future__ import annotations

import subprocess

import pytest
import torch
from conftest import copy_run, launch

from workers.checkpoint.files import write_error
from workers.contract import FailureKind, disk_trouble


def _one_report(stderr: str, needle: str) -> str:
    """The console's one line about the failure; asserts there is exactly one and no traceback."""
    lines = [ln for ln in stderr.splitlines() if needle in ln]
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr, stderr
    assert lines[0].startswith("training failed: "), stderr
    return lines[0]


def test_a_nonfinite_halt_is_one_line_and_its_traceback_is_in_the_log(tmp_path):
    run = tmp_path / "run"
    proc = launch(run, 2, "task.args={n: 200, hidden: 32, poison_index: 3}", "train.nonfinite=halt",
                  "launch.max_restarts=2", check=False)  # fmt: skip
    assert proc.returncode == 1
    line = _one_report(proc.stderr, "non-finite gradient norm")
    assert "train.nonfinite=halt" in line and f"traceback in {run / 'logs'}" in line
    assert "restarting" not in proc.stderr
    assert "Traceback" in (run / "logs" / "rank-0.log").read_text()  # the detail is kept, off the console


def test_a_run_dir_whose_checkpoints_are_all_broken_is_one_line(refs, tmp_path):
    run = copy_run(refs[2], tmp_path / "run")
    for folder in (run / "checkpoints").glob("step-*"):
        (folder / "model.pt").write_bytes(b"garbage")
    proc = launch(run, 2, "launch.max_restarts=2", check=False)
    assert proc.returncode == 1
    assert "none is valid" in _one_report(proc.stderr, "none is valid")
    assert "restarting" not in proc.stderr


@pytest.fixture
def full_tmpfs(tmp_path):
    mnt = tmp_path / "full"
    mnt.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True)
    if proc.returncode:
        pytest.skip(f"cannot mount here (needs root): {proc.stderr.decode().strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_torchs_unexpected_pos_on_a_full_disk_is_named_a_full_disk_and_never_retried(full_tmpfs):
    """torch.save to a path on a full file system raises a bare RuntimeError ("unexpected pos …", no errno)."""
    with pytest.raises(RuntimeError) as caught:
        torch.save({"w": torch.zeros(1 << 20)}, full_tmpfs / "w.pt")
    assert "unexpected pos" in str(caught.value)  # torch's own words: if they change, this test says so
    assert disk_trouble(caught.value) == "the disk is full"
    assert FailureKind.of(caught.value) is FailureKind.DISK and not FailureKind.DISK.retryable
    message = str(write_error(full_tmpfs / "step-00000004", caught.value))
    assert "the disk is full" in message and "older checkpoints are intact" in message
    assert FailureKind.of(OSError(28, "No space left on device")) is FailureKind.DISK
    assert FailureKind.of(RuntimeError("a bug")) is FailureKind.EXCEPTION
