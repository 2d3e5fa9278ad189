"""Crash-safe and safe-to-load checkpoints: corrupt files are skipped with a warning naming them, a full disk is a
clear error that leaves older checkpoints intact, a pickle payload is refused and never runs, async saves give the
same weights, a resume that would silently change the data is refused, two launches can't share a run dir."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
import sys
import time

import pytest
import torch
from conftest import (
    EVERY,
    MAX_STEPS,
    QUICK,
    ROOT,
    cli,
    copy_run,
    env,
    fingerprint,
    latest_name,
    launch,
    load,
    tensors_equal,
)


def _ckpt(run, step):
    return run / "checkpoints" / f"step-{step:08d}"


@pytest.mark.parametrize("damage", ["truncated", "bit-flipped"])
def test_corrupt_newest_checkpoint_is_skipped_with_a_warning(damage, refs, tmp_path):
    run = copy_run(refs[2], tmp_path / "run")
    model_pt = _ckpt(run, MAX_STEPS) / "model.pt"
    data = bytearray(model_pt.read_bytes())
    if damage == "truncated":
        data = data[: len(data) // 2]
    else:
        data[len(data) // 2] ^= 0x10
    model_pt.write_bytes(bytes(data))
    proc = launch(run, 2)
    assert f"skipping checkpoint step-{MAX_STEPS:08d}" in proc.stderr
    assert ("bytes" if damage == "truncated" else "does not match its checksum (xxh3_128)") in proc.stderr
    assert f"resumed from {_ckpt(run, MAX_STEPS - EVERY)}" in proc.stderr
    assert tensors_equal(load(run), load(refs[2]))


def test_async_checkpoints_give_the_same_weights_as_sync(refs, tmp_path):
    run = tmp_path / "async"
    proc = launch(run, 2, "train.async_checkpoint=true")
    assert "snapshot taken, writing" in proc.stderr  # the periodic saves really went the async way
    assert tensors_equal(load(run), load(refs[2]))
    assert tensors_equal(load(run, "optim.pt"), load(refs[2], "optim.pt"))
    assert tensors_equal(load(run, step=MAX_STEPS - EVERY), load(refs[2], step=MAX_STEPS - EVERY))


def test_a_kill_during_a_background_write_leaves_the_previous_checkpoint_valid(refs, tmp_path):
    run, marker = tmp_path / "run", tmp_path / "died"
    proc = launch(
        run,
        2,
        "train.async_checkpoint=true",
        "launch.max_restarts=1",
        "launch.grace_period_s=1",
        f"task.args.die_in_save={marker}",
        "task.args.die_in_save_step=8",
    )
    assert marker.exists(), "the background write was never interrupted"
    assert f"resumed from {_ckpt(run, EVERY)}" in proc.stderr
    assert tensors_equal(load(run), load(refs[2]))


def _mount(*args: str) -> None:
    proc = subprocess.run(["mount", *args], capture_output=True)
    if proc.returncode:
        pytest.skip(f"cannot mount here (needs root): {proc.stderr.decode().strip()}")


@pytest.mark.parametrize("trouble", ["disk full", "read-only"])
def test_an_unwritable_run_dir_is_a_clear_error_and_older_checkpoints_stay_intact(trouble, tmp_path):
    """A real full file system (a small tmpfs, then filled) and a real read-only one (checkpoints/ bind-mounted,
    then remounted read-only) after the first checkpoint: the next save fails with a clear error."""
    run = mnt = tmp_path / "run"
    if trouble == "disk full":
        mnt = tmp_path / "small"
        mnt.mkdir()
        _mount("-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mnt))
        run = mnt / "run"
    else:
        mnt = run / "checkpoints"
        mnt.mkdir(parents=True)
        _mount("--bind", str(mnt), str(mnt))
    try:
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
            "train.log_every=100",
            "launch.max_restarts=2",
        ]
        proc = subprocess.Popen(cmd, env=env(), cwd=ROOT, stderr=subprocess.PIPE, text=True)
        while latest_name(run) != f"step-{EVERY:08d}":
            assert proc.poll() is None, proc.stderr.read()
            time.sleep(0.01)
        if trouble == "disk full":
            with open(mnt / "filler", "wb", buffering=0) as f, contextlib.suppress(OSError):
                while True:
                    f.write(b"\0" * (1 << 20))
        else:  # retried: the remount is refused (busy) while a file under it is open for writing
            for _ in range(50):
                if subprocess.run(["mount", "-o", "remount,bind,ro", str(mnt)], capture_output=True).returncode == 0:
                    break
                time.sleep(0.02)
            # ... and no error record can be written either: the launcher must learn the cause another way
            (run / "logs").rename(run / "logs.moved")
            (run / "logs").write_text("")
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 1
        reason = (
            "the disk is full (No space left on device)"
            if trouble == "disk full"
            else "the file system is read-only (Read-only file system)"
        )
        # one clean report: the cause in one line (the record came over the worker's pipe), no traceback on the
        # console, the message once; a disk error is never retried
        report = [ln for ln in err.splitlines() if "cannot write checkpoint" in ln]
        assert len(report) == 1 and report[0].startswith("training failed: cannot write checkpoint"), err
        assert reason in report[0] and "older checkpoints are intact" in report[0], err
        assert "Traceback" not in err and "restarting" not in err, err
        assert latest_name(run) == f"step-{EVERY:08d}"
        assert not list((run / "checkpoints").glob(".tmp-*"))  # the failed save cleaned up after itself
        assert "complete: yes" in cli("ckpt", "inspect", str(_ckpt(run, EVERY)), check=True).stdout
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_a_pickle_payload_in_a_checkpoint_is_refused_and_never_runs(refs, tmp_path):
    run = copy_run(refs[2], tmp_path / "run")
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    folder = _ckpt(run, MAX_STEPS)
    sd = torch.load(folder / "model.pt", weights_only=True)
    torch.save({**sd, "evil": Payload()}, folder / "model.pt")
    manifest = json.loads((folder / "manifest.json").read_text())  # a forger would fix the manifest too
    data = (folder / "model.pt").read_bytes()
    manifest["files"]["model.pt"] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (folder / "manifest.json").write_text(json.dumps(manifest))

    before = fingerprint(run, mtimes=False)
    proc = launch(run, 2, "train.max_steps=16", "launch.max_restarts=2", check=False)
    # a usage error: one line, exit 2, never retried, and the run dir as it was (config.yaml and logs included)
    assert proc.returncode == 2, proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if "weights_only" in ln]
    assert len(errors) == 1 and "model.pt" in errors[0] and "Traceback" not in proc.stderr, proc.stderr
    assert "restarting" not in proc.stderr
    assert fingerprint(run, mtimes=False) == before
    out = cli("ckpt", "inspect", str(folder)).stdout
    assert "UNSAFE" in out
    assert not marker.exists(), "the payload ran"


def test_a_resume_with_a_lower_max_steps_warns_that_the_schedule_changes(killed2, tmp_path):
    run = copy_run(killed2, tmp_path / "run")
    proc = launch(run, 2, "train.max_steps=10")
    assert "train.max_steps is 10, the run was saved with 12: the LR schedule now decays to step 10" in proc.stderr


def test_an_edited_learning_rate_takes_effect_on_resume_with_a_warning(refs, tmp_path):
    run = copy_run(refs[2], tmp_path / "run")
    proc = launch(run, 1, "train.max_steps=14", "optim.lr=0.0005", "optim.schedule=constant", "optim.warmup_steps=0")
    assert "optimizer initial_lr changed on resume: 0.003 -> 0.0005" in proc.stderr
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 14 and rows[-1]["lr"] == 0.0005
    steps = [r["step"] for r in rows]
    assert steps == sorted(set(steps)), "metrics.jsonl has duplicated or unordered steps after the resume"


def test_two_launches_cannot_share_a_run_dir(tmp_path):
    run = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "orchestrator",
        "launch",
        "configs/quickstart.yaml",
        "--nproc",
        "1",
        f"run.dir={run}",
        *QUICK,
        "task.args.step_sleep_s=0.2",
    ]
    first = subprocess.Popen(cmd, env=env(), cwd=ROOT, stderr=subprocess.DEVNULL)
    try:
        while not (run / "logs").exists():
            time.sleep(0.05)
        second = cli("launch", "configs/quickstart.yaml", "--nproc", "1", f"run.dir={run}", *QUICK)
        assert second.returncode == 2 and "is in use by another launch" in second.stderr
    finally:
        first.wait(timeout=120)
    assert first.returncode == 0
