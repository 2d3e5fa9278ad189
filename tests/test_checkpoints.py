"""Checkpoint format and tools, on real runs: unwrapped weights that load anywhere, rank 0 as the only writer,
retention, skipping uncommitted folders, init_from and `ckpt export` for DataParallel/DDP/compiled state dicts,
`ckpt inspect`."""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import EVERY, GBS, MAX_STEPS, cli, copy_run, launch, load, tensors_equal
from torch import nn

from workers.tasks.quickstart import make_model


def test_model_pt_is_plain_and_loads_into_a_fresh_model(refs):
    path = refs[2] / "checkpoints" / f"step-{MAX_STEPS:08d}" / "model.pt"
    sd = torch.load(path, map_location="cpu", weights_only=True)
    assert not [k for k in sd if k.startswith(("module.", "_orig_mod."))]
    model = make_model(hidden=32)
    model.load_state_dict(sd, strict=True)
    assert (refs[2] / "checkpoints" / "latest").read_text().strip() == f"step-{MAX_STEPS:08d}"
    # retention: the newest two committed checkpoints remain, nothing half-written
    names = sorted(p.name for p in (refs[2] / "checkpoints").iterdir())
    assert names == ["latest", f"step-{MAX_STEPS - EVERY:08d}", f"step-{MAX_STEPS:08d}"]
    state = json.loads((path.parent / "train_state.json").read_text())
    assert state["step"] == MAX_STEPS and state["samples_seen"] == MAX_STEPS * GBS and state["world_size"] == 2


def test_only_rank_0_writes_checkpoint_files(refs):
    audit = refs[2].parent / "audit-ws2"
    rank0 = (audit / "rank-0.txt").read_text().splitlines()
    assert any("model.pt" in line for line in rank0), "the audit hook saw no checkpoint write at all"
    assert any(line.startswith("os.rename") for line in rank0)
    assert not (audit / "rank-1.txt").exists(), (audit / "rank-1.txt").read_text()


def test_uncommitted_and_temporary_folders_are_ignored_on_resume(refs, tmp_path):
    """What a SIGKILL in the middle of a save leaves behind: a temporary folder, or a renamed folder
    whose files are incomplete. Resume must use the newest *committed* checkpoint and lose nothing."""
    run = copy_run(refs[2], tmp_path / "run")
    ckpts = run / "checkpoints"
    final = ckpts / f"step-{MAX_STEPS:08d}"
    (final / "manifest.json").unlink()  # as if killed before the commit marker
    (ckpts / f".tmp-step-{MAX_STEPS + EVERY:08d}-12345").mkdir()
    (ckpts / f".tmp-step-{MAX_STEPS + EVERY:08d}-12345" / "model.pt").write_bytes(b"half")
    proc = launch(run, 2)
    assert f"skipping checkpoint step-{MAX_STEPS:08d}" in proc.stderr
    assert f"resumed from {ckpts / f'step-{MAX_STEPS - EVERY:08d}'}" in proc.stderr
    assert tensors_equal(load(run), load(refs[2]))
    assert not list(ckpts.glob(".tmp-*"))
    assert len(list(ckpts.glob(f"step-{MAX_STEPS:08d}.invalid-*"))) == 1, "the broken folder was not kept aside"


def test_no_valid_checkpoint_is_an_error_not_a_fresh_start(refs, tmp_path):
    run = copy_run(refs[2], tmp_path / "run")
    for folder in (run / "checkpoints").glob("step-*"):
        (folder / "model.pt").write_bytes(b"garbage")
    proc = launch(run, 1, check=False)
    assert proc.returncode == 1
    assert "none is valid" in proc.stderr
    assert not list((run / "checkpoints").glob("step-*.invalid-*"))


def _wrapped_state_dicts(tmp_path) -> dict[str, tuple[dict, dict]]:
    """(wrapped state_dict, plain state_dict) from DataParallel, DDP on a real gloo group, and torch.compile."""
    import torch.distributed as dist

    torch.manual_seed(7)
    model = make_model(hidden=32)
    plain = {k: v.clone() for k, v in model.state_dict().items()}
    out = {
        "dataparallel": (nn.DataParallel(model).state_dict(), plain),
        "compiled": (torch.compile(model).state_dict(), plain),
    }
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        out["ddp"] = (nn.parallel.DistributedDataParallel(model).state_dict(), plain)
    finally:
        dist.destroy_process_group()
    for wrapped, _ in out.values():
        assert all(k.startswith(("module.", "_orig_mod.")) for k in wrapped)
    return out


def test_export_and_init_from_accept_wrapped_state_dicts(tmp_path):
    for kind, (wrapped, plain) in _wrapped_state_dicts(tmp_path).items():
        src = tmp_path / f"{kind}.pt"
        torch.save(wrapped if kind != "ddp" else {"model_state_dict": wrapped, "epoch": 3}, src)
        dest = tmp_path / f"{kind}-plain.pt"
        proc = cli("ckpt", "export", str(src), str(dest), check=True)
        assert "tensors" in proc.stdout
        exported = torch.load(dest, map_location="cpu", weights_only=True)
        assert tensors_equal(exported, plain), kind
        if kind == "compiled":
            continue  # same loader as the other two; two launches are enough
        # init_from: with lr 0 the run's final weights are exactly the weights it started from
        run = tmp_path / f"run-{kind}"
        proc = launch(run, 1, f"train.init_from={src}", "optim.lr=0", "train.max_steps=2", "task.args.n=64")
        assert f"initialised weights from {src}" in proc.stderr
        assert tensors_equal(load(run, step=2), plain), kind


def test_export_refuses_to_overwrite_and_reports_bad_files(tmp_path):
    dest = tmp_path / "out.pt"
    dest.write_bytes(b"keep me")
    torch.save(make_model().state_dict(), tmp_path / "w.pt")
    proc = cli("ckpt", "export", str(tmp_path / "w.pt"), str(dest))
    assert proc.returncode == 2 and "not overwriting" in proc.stderr and dest.read_bytes() == b"keep me"
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    proc = cli("ckpt", "export", str(tmp_path / "bad.pt"), str(tmp_path / "x.pt"))
    assert proc.returncode == 2 and "bad.pt" in proc.stderr and "Traceback" not in proc.stderr


def test_inspect_reports_step_samples_world_size_parameters_and_completeness(refs, tmp_path):
    folder = refs[2] / "checkpoints" / f"step-{MAX_STEPS:08d}"
    proc = cli("ckpt", "inspect", str(folder), check=True)
    n_params = sum(p.numel() for p in make_model(hidden=32).parameters())
    for expected in (
        f"step: {MAX_STEPS}",
        f"samples seen: {MAX_STEPS * GBS}",
        "world size at save: 2",
        f"parameters: {n_params:,}",
        "complete: yes",
    ):
        assert expected in proc.stdout, (expected, proc.stdout)
    run = copy_run(refs[2], tmp_path / "run")
    model_pt = run / "checkpoints" / f"step-{MAX_STEPS:08d}" / "model.pt"
    model_pt.write_bytes(model_pt.read_bytes()[:-100])  # truncated
    info = json.loads(cli("ckpt", "inspect", str(run), "--json", check=True).stdout)
    assert info["latest_valid"].endswith(f"step-{MAX_STEPS - EVERY:08d}")
    broken = [c for c in info["checkpoints"] if c["step"] == MAX_STEPS][0]
    assert broken["complete"] is False and "bytes" in broken["problem"]


@pytest.mark.parametrize("payload", ["pickle"])
def test_weights_files_load_with_weights_only(tmp_path, payload):
    """A weights file carrying a pickled callable is refused, and its code never runs."""
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"weight": torch.zeros(1), "evil": Evil()}, tmp_path / "evil.pt")
    proc = cli("ckpt", "export", str(tmp_path / "evil.pt"), str(tmp_path / "out.pt"))
    assert proc.returncode == 2 and "weights_only" in proc.stderr
    assert not marker.exists()
