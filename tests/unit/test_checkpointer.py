"""The checkpoint manager in-process (world size 1, no process group): what it is handed is what it saves, a restore
puts it back bit for bit, retention and ``best`` follow the save plan, an async save writes the state as it was, a
failed write leaves nothing behind, and the resume choice is one frozen answer."""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

from workers.checkpoint import Checkpointer, HeldState, OptimizerState, SavePlan, verify
from workers.checkpoint import files as ckpt_files
from workers.contract import TrainState
from workers.dist import DistContext
from workers.errors import CheckpointError, IncompatibleCheckpointError, UnsafeCheckpointError
from workers.rundir import RunDir


def _ctx() -> DistContext:
    return DistContext.from_env("cpu", env={})


def _state(step: int) -> TrainState:
    return TrainState(step=step, samples_seen=8 * step, world_size=1, global_batch_size=8, seed=0, optimizer="AdamW")


class Parts:
    """A model with a buffer, AdamW with a schedule, trained a few steps: state in every part."""

    def __init__(self, seed: int = 0, steps: int = 3) -> None:
        torch.manual_seed(seed)
        self.model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 1))
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-2)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: 1.0 / (1 + s))
        self.scaler = torch.amp.GradScaler("cuda", enabled=False)
        for _ in range(steps):
            self.model(torch.randn(16, 4)).pow(2).mean().backward()
            self.opt.step()
            self.opt.zero_grad()
            self.sched.step()
        self.progress = HeldState(_state(steps))

    def checkpointer(self, run: Path, **kwargs: object) -> Checkpointer:
        optim = OptimizerState(self.model, self.opt, self.sched, self.scaler)
        return Checkpointer(RunDir(run), _ctx(), model=self.model, optim=optim, progress=self.progress, **kwargs)


def _same_tensors(a: object, b: object) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same_tensors(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same_tensors(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def test_what_it_is_handed_is_saved_and_restored_bitwise(tmp_path):
    src = Parts(seed=0)
    ckpt = src.checkpointer(tmp_path / "run")
    folder = ckpt.save(3)
    ckpt.close()
    assert folder.name == "step-00000003" and (tmp_path / "run/checkpoints/latest").read_text() == folder.name + "\n"
    manifest = verify(folder)
    assert set(manifest["files"]) == {"model.pt", "optim.pt", "train_state.json"}

    dst = Parts(seed=1, steps=1)  # other weights, other optimizer state, another step
    state = dst.checkpointer(tmp_path / "run").restore(folder)
    assert state.step == 3 and dst.progress.state.step == 3  # handed to the progress
    assert _same_tensors(src.model.state_dict(), dst.model.state_dict())
    assert _same_tensors(src.opt.state_dict()["state"], dst.opt.state_dict()["state"])
    assert dst.sched.state_dict()["last_epoch"] == src.sched.state_dict()["last_epoch"] == 3
    saved = torch.load(folder / "optim.pt", weights_only=True)
    assert set(saved["optimizer"]["state"]) == {"0.weight", "0.bias", "1.weight", "1.bias", "2.weight", "2.bias"}


def test_save_refuses_a_step_the_progress_is_not_at(tmp_path):
    parts = Parts()
    with pytest.raises(ValueError, match="save\\(4\\) but the trainer's state is at step 3"):
        parts.checkpointer(tmp_path / "run").save(4)
    assert not (tmp_path / "run/checkpoints/step-00000004").exists()


def test_retention_keeps_the_newest_and_the_plans_protected_steps_and_best_names_the_best(tmp_path):
    parts = Parts()
    ckpt = parts.checkpointer(tmp_path / "run", keep=1)
    for step in (1, 2, 3, 4):
        parts.progress.state = _state(step)
        parts.progress.plan = SavePlan(keep_also=frozenset({2}), best_step=2)
        ckpt.save(step)
    left = sorted(p.name for p in (tmp_path / "run/checkpoints").iterdir() if p.name.startswith("step-"))
    assert left == ["step-00000002", "step-00000004"]
    assert (tmp_path / "run/checkpoints/best").read_text() == "step-00000002\n"


def test_an_async_save_writes_the_state_as_it_was_when_save_returned(tmp_path):
    parts = Parts()
    ckpt = parts.checkpointer(tmp_path / "run", async_save=True)
    before = {k: v.clone() for k, v in parts.model.state_dict().items()}
    folder = ckpt.save(3, blocking=False)
    with torch.no_grad():
        for p in parts.model.parameters():
            p.add_(1.0)  # the next steps change the live tensors while the background thread writes
    ckpt.wait()
    ckpt.close()
    verify(folder)
    assert _same_tensors(torch.load(folder / "model.pt", weights_only=True), before)


def test_a_failed_write_names_the_full_disk_leaves_no_temporary_and_keeps_older_checkpoints(tmp_path, monkeypatch):
    parts = Parts()
    ckpt = parts.checkpointer(tmp_path / "run")
    ckpt.save(3)

    def full(path: Path, obj: object) -> dict:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt_files, "save_torch_durable", full)
    parts.progress.state = _state(4)
    with pytest.raises(CheckpointError, match=r"cannot write checkpoint .*step-00000004.*the disk is full"):
        ckpt.save(4)
    names = sorted(p.name for p in (tmp_path / "run/checkpoints").iterdir())
    assert names == ["latest", "step-00000003"]  # no .tmp- folder, latest unchanged
    assert (tmp_path / "run/checkpoints/latest").read_text() == "step-00000003\n"


def test_the_resume_choice_is_one_frozen_answer(tmp_path):
    parts = Parts()
    ckpt = parts.checkpointer(tmp_path / "run")
    assert ckpt.resume_point().resolved() is None  # nothing saved: a fresh start
    ckpt.save(3)
    parts.progress.state = _state(4)
    ckpt.save(4)
    (tmp_path / "run/checkpoints/step-00000004/model.pt").write_bytes(b"garbage")  # the newest is broken
    choice = ckpt.resume_point()
    with pytest.raises(AttributeError):
        choice.folder = None  # frozen
    assert choice.resolved() == tmp_path / "run/checkpoints/step-00000003"
    assert len(list((tmp_path / "run/checkpoints").glob("step-00000004.invalid-*"))) == 1

    (tmp_path / "run/checkpoints/step-00000003/train_state.json").write_text("{")  # now none is valid
    refused = ckpt.resume_point()
    assert refused.folder is None and not refused.unsafe
    with pytest.raises(CheckpointError, match="holds checkpoints but none is valid"):
        refused.resolved()


def test_a_checkpoint_with_pickled_code_is_refused_and_never_run(tmp_path, capsys):
    parts = Parts()
    ckpt = parts.checkpointer(tmp_path / "run")
    folder = ckpt.save(3)

    class Payload:
        def __reduce__(self):
            return (print, ("never run",))

    torch.save({"w": Payload()}, folder / "model.pt")
    manifest = json.loads((folder / "manifest.json").read_text())
    from workers.fsutil import file_digest  # a forger who also rewrites the checksums

    manifest["files"]["model.pt"] = {
        "size": (folder / "model.pt").stat().st_size,
        "xxh3_128": file_digest(folder / "model.pt"),
    }
    (folder / "manifest.json").write_text(json.dumps(manifest))
    folder = ckpt.resume_point().resolved()  # its checksums match: chosen, then refused when loaded
    with pytest.raises(UnsafeCheckpointError, match="pickled code"):
        ckpt.restore(folder)
    assert "never run" not in capsys.readouterr().out


def test_a_checkpoint_of_another_optimizer_is_incompatible_before_anything_loads(tmp_path):
    parts = Parts()
    folder = parts.checkpointer(tmp_path / "run").save(3)
    other = Parts(seed=1)
    other.opt = torch.optim.SGD(other.model.parameters(), lr=0.1)
    other.sched = torch.optim.lr_scheduler.LambdaLR(other.opt, lambda s: 1.0)
    weights = {k: v.clone() for k, v in other.model.state_dict().items()}
    with pytest.raises(IncompatibleCheckpointError, match="holds AdamW state, this run builds SGD"):
        other.checkpointer(tmp_path / "run").restore(folder)
    assert _same_tensors(other.model.state_dict(), weights)  # nothing was loaded


def test_stale_temporaries_of_killed_saves_are_cleaned(tmp_path):
    parts = Parts()
    ckpt = parts.checkpointer(tmp_path / "run")
    ckpt.save(3)
    (tmp_path / "run/checkpoints/.tmp-step-00000004-123").mkdir()
    (tmp_path / "run/checkpoints/.trash-step-00000001-9").mkdir()
    ckpt.clean_stale_temporaries()
    assert sorted(p.name for p in (tmp_path / "run/checkpoints").iterdir()) == ["latest", "step-00000003"]
    shutil.rmtree(tmp_path / "run")
