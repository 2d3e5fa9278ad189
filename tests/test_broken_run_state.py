"""Broken run state: every file the product reads back from a run dir is checked by schema, and what fails is
treated as damage — a checkpoint is set aside with a warning and the older valid one is used; a malformed metrics
row, tracking file or SLURM record is skipped — in the training path and in every CLI tool, never a crash."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import MAX_STEPS, cli, launch

NEWEST, OLDER = f"step-{MAX_STEPS:08d}", f"step-{MAX_STEPS - 4:08d}"


def _manifest(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


def _set_manifest(folder: Path, manifest) -> None:
    (folder / "manifest.json").write_text(json.dumps(manifest))


def _edit_files(folder: Path, edit: Callable[[dict], None]) -> None:
    manifest = _manifest(folder)
    edit(manifest["files"])
    _set_manifest(folder, manifest)


def _rewrite(folder: Path, name: str, text: str) -> None:
    """Replace a file *and* its manifest entry: the hashes match, only the schema can tell."""
    data = text.encode()
    (folder / name).write_bytes(data)
    _edit_files(
        folder, lambda files: files.update({name: {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}})
    )


def _state_with(**changes) -> Callable[[Path], None]:
    def damage(folder: Path) -> None:
        state = json.loads((folder / "train_state.json").read_text())
        state.update(changes)
        _rewrite(folder, "train_state.json", json.dumps({k: v for k, v in state.items() if v != "<drop>"}))

    return damage


CHECKPOINT_DAMAGE: dict[str, Callable[[Path], None]] = {
    "manifest entry without checksum": lambda f: _edit_files(f, lambda files: files["model.pt"].pop("xxh3_128")),
    "manifest checksum too short": lambda f: _edit_files(f, lambda files: files["model.pt"].update(xxh3_128="ab")),
    "manifest entry is a string": lambda f: _edit_files(f, lambda files: files.update({"optim.pt": "abc"})),
    "manifest size is a string": lambda f: _edit_files(f, lambda files: files["model.pt"].update(size="12")),
    "manifest files is a list": lambda f: _set_manifest(f, {**_manifest(f), "files": list(_manifest(f)["files"])}),
    "manifest is a list": lambda f: _set_manifest(f, []),
    "manifest is not JSON": lambda f: (f / "manifest.json").write_text("{not json"),
    "manifest names a path outside": lambda f: _edit_files(
        f, lambda files: files.update({"../../escape": {"size": 1, "sha256": "0" * 64}})
    ),
    "manifest lacks the model": lambda f: _edit_files(f, lambda files: files.pop("model.pt")),
    "train state is a list": lambda f: _rewrite(f, "train_state.json", "[]"),
    "train state step is text": _state_with(step="x"),
    "train state without step": _state_with(step="<drop>"),
    "train state negative samples": _state_with(samples_seen=-5),
    "train state seed is a bool": _state_with(seed=True),
    "model truncated": lambda f: (f / "model.pt").write_bytes((f / "model.pt").read_bytes()[:100]),
    "train state not JSON (rehashed)": lambda f: _rewrite(f, "train_state.json", "{"),
}


def _resume_point(run: Path) -> Path | None:
    """The training path's own choice (the checkpointer's resume point, in this process, world size 1)."""
    from workers.checkpoint import choose_resume_point
    from workers.checkpoint.commit import Committer
    from workers.dist import DistContext
    from workers.rundir import RunDir

    paths = RunDir(run)
    return choose_resume_point(paths, DistContext.from_env("cpu", env={}), Committer(paths, 2, {})).resolved()


@pytest.mark.parametrize("case", sorted(CHECKPOINT_DAMAGE))
def test_a_damaged_newest_checkpoint_is_set_aside_and_the_older_one_is_used(case, refs, tmp_path, caplog):
    from orchestrator.ckpt_tools import export, inspect

    run = tmp_path / "run"
    shutil.copytree(refs[2], run)
    CHECKPOINT_DAMAGE[case](run / "checkpoints" / NEWEST)

    report = inspect(run)  # ckpt inspect
    assert report["latest_valid"].endswith(OLDER)
    assert [c["complete"] for c in report["checkpoints"] if c["path"].endswith(NEWEST)] == [False]
    assert export(run, tmp_path / "w.pt", force=False)["tensors"] > 0  # ckpt export takes the older one

    assert _resume_point(run) == run / "checkpoints" / OLDER  # resume
    assert f"skipping checkpoint {NEWEST}" in caplog.text and "setting aside broken checkpoint" in caplog.text
    assert len(list((run / "checkpoints").glob(f"{NEWEST}.invalid-*"))) == 1
    assert (run / "checkpoints" / "latest").read_text().strip() == OLDER


@pytest.mark.parametrize("case", ["train state step is text"])  # the others share this path: in-process above
def test_a_damaged_checkpoint_end_to_end_through_the_cli(case, refs, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(refs[2], run)
    CHECKPOINT_DAMAGE[case](run / "checkpoints" / NEWEST)
    for args in (("ckpt", "inspect", str(run), "--json"), ("ckpt", "export", str(run), str(tmp_path / "w.pt"))):
        proc = cli(*args)
        assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    proc = launch(run, 1, f"train.max_steps={MAX_STEPS + 2}", "launch.max_restarts=1", check=False)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    assert (
        f"skipping checkpoint {NEWEST}" in proc.stderr and f"resumed from {run / 'checkpoints' / OLDER}" in proc.stderr
    )
    assert (run / "checkpoints" / f"step-{MAX_STEPS + 2:08d}" / "manifest.json").is_file()


def test_malformed_metrics_tracking_and_slurm_records_are_skipped_with_a_warning(refs, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(refs[2], run)
    rows = (run / "metrics.jsonl").read_text().splitlines()
    rows[2:2] = ['{"step": "x", "loss": 1}', "[]", "not json", '{"loss": 2}']
    (run / "metrics.jsonl").write_text("\n".join(rows) + "\n")
    (run / "tracking.json").write_text("[]")
    (run / "slurm").mkdir()
    (run / "slurm" / "jobs.json").write_text('{"job_id": 5}')
    (run / "slurm" / "events.jsonl").write_text('garbage\n[]\n{"event": 3}\n')
    (run / "checkpoints" / "latest").write_text("../../etc/passwd\n")

    status = cli("status", str(run), "--json")
    assert status.returncode == 0 and "Traceback" not in status.stderr, status.stderr
    info = json.loads(status.stdout)
    assert info["step"] == MAX_STEPS and info["wandb_run_id"] is None and info["latest_checkpoint"] is None
    plot = cli("plot", str(run), "--out", str(tmp_path / "m.png"))
    assert plot.returncode == 0, plot.stderr

    proc = launch(run, 1, f"train.max_steps={MAX_STEPS + 2}", check=False)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    assert "skipped 4 malformed row(s)" in proc.stderr
    steps = [
        json.loads(r)["step"] for r in (run / "metrics.jsonl").read_text().splitlines() if r.startswith('{"step": ')
    ]
    steps = [s for s in steps if isinstance(s, int)]
    assert steps[-1] == MAX_STEPS + 2 and steps == sorted(set(steps))
    assert (run / "checkpoints" / "latest").read_text().strip() == f"step-{MAX_STEPS + 2:08d}"


def test_set_aside_folders_are_bounded(refs, tmp_path, caplog):
    run = tmp_path / "run"
    shutil.copytree(refs[2], run)
    ckpts = run / "checkpoints"
    for i in range(5):  # five old broken folders, as earlier resumes would have left them
        (ckpts / f"step-00000099.invalid-2026010{i}-120000-1").mkdir()
    (ckpts / NEWEST / "model.pt").write_bytes(b"damaged")
    assert _resume_point(run) == ckpts / OLDER
    kept = sorted(p.name for p in ckpts.glob("*.invalid-*"))
    assert len(kept) == 3 and any(name.startswith(NEWEST) for name in kept), kept
    assert "deleting old set-aside checkpoint" in caplog.text


def test_max_steps_is_judged_against_the_checkpoint_really_resumed_from(refs, tmp_path):
    """A corrupt newest checkpoint (step 12) must not make `train.max_steps=10` look like cutting the run below its
    step: the valid resume point is step 8, so the run continues from there to step 10."""
    run = tmp_path / "run"
    shutil.copytree(refs[2], run)
    (run / "checkpoints" / NEWEST / "model.pt").write_bytes(b"damaged")
    proc = launch(run, 1, f"train.max_steps={MAX_STEPS - 2}", check=False)
    assert proc.returncode == 0, proc.stderr
    assert f"resumed from {run / 'checkpoints' / OLDER}" in proc.stderr
    assert (run / "checkpoints" / f"step-{MAX_STEPS - 2:08d}" / "manifest.json").is_file()
