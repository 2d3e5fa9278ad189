"""Exactness end to end, with real gloo process groups, real subprocesses and real SIGKILLs.

- world sizes 1, 2, 3 with the same global batch reach the same weights;
- a run SIGKILLed after a checkpoint and launched again equals the uninterrupted run bit for bit (same world
  size), also for the task with dropout;
- killed on 2 ranks and resumed on 1 or 3, and 1 -> 2: equal within 1e-5, and the samples consumed (the
  indices themselves) form the same sequence.
"""

from __future__ import annotations

import json

import torch
from conftest import (
    EVERY,
    GBS,
    MAX_STEPS,
    consumed_sequence,
    copy_run,
    launch,
    launch_and_kill,
    load,
    rel_diff,
    tensors_equal,
)

from workers.config import config_from_dict, plan_batches
from workers.data import GlobalOrder


def expected_sequence(n: int = 200, seed: int = 0) -> list[list[int]]:
    order = GlobalOrder(n, seed)
    return [order.take(step * GBS, GBS) for step in range(MAX_STEPS)]


def test_world_sizes_1_2_3_reach_the_same_weights(refs):
    w2 = load(refs[2])
    for ws in (1, 3):
        assert rel_diff(load(refs[ws]), w2) <= 1e-5, f"world size {ws} drifted from world size 2"
    # Training really moved the weights (a no-op run would pass the comparison above trivially).
    first = load(refs[2], step=MAX_STEPS - EVERY)
    assert rel_diff(first, w2) > 1e-3
    for ws in (1, 2, 3):
        assert consumed_sequence(refs[ws]) == expected_sequence(), f"ws={ws} consumed another sample order"


def test_killed_and_relaunched_same_world_size_is_bitwise_equal(refs, killed2, tmp_path):
    run = copy_run(killed2, tmp_path / "resume-ws2")
    assert not (run / "checkpoints" / f"step-{MAX_STEPS:08d}").exists()
    proc = launch(run, 2)
    assert f"resumed from {run / 'checkpoints' / f'step-{EVERY:08d}'}" in proc.stderr
    assert tensors_equal(load(run), load(refs[2]))
    assert tensors_equal(load(run, "optim.pt"), load(refs[2], "optim.pt"))
    assert consumed_sequence(run) == consumed_sequence(refs[2]) == expected_sequence()


def test_killed_on_2_resumed_on_1_and_3(refs, killed2, tmp_path):
    for ws in (1, 3):
        run = copy_run(killed2, tmp_path / f"resume-ws{ws}")
        proc = launch(run, ws)
        assert f"saved at world size 2, now {ws}" in proc.stderr
        assert rel_diff(load(run), load(refs[2])) <= 1e-5
        assert consumed_sequence(run) == expected_sequence()
        # the batch plan really changed: ws=3 splits 24 samples as 3 ranks x 2 micro-batches of 4
        plan = plan_batches(
            config_from_dict({"data": {"global_batch_size": GBS}, "train": {"grad_accum_steps": 2}}), ws
        )
        assert plan.micro_batch == GBS // (2 * ws)


def test_killed_on_1_resumed_on_2(refs, tmp_path):
    run = tmp_path / "ws1-to-ws2"
    launch_and_kill(run, 1, "task.args.step_sleep_s=0.1", kill_after=f"step-{EVERY:08d}")
    launch(run, 2)
    assert rel_diff(load(run), load(refs[2])) <= 1e-5
    assert consumed_sequence(run) == expected_sequence()


CHARLM = [
    "task.factory=orch_test_tasks:chars",
    "task.args={block_size: 16, stride: 8, d_model: 32, n_layers: 1, n_heads: 2, dropout: 0.2}",
    "data.num_workers=1",  # DataLoader worker processes in the loop too
]


def test_dropout_task_killed_and_relaunched_is_bitwise_equal(tmp_path):
    ref, run = tmp_path / "ref", tmp_path / "killed"
    launch(ref, 2, *CHARLM, config="configs/charlm.yaml")
    launch_and_kill(
        run, 2, *CHARLM, "task.args.step_sleep_s=0.1", kill_after=f"step-{EVERY:08d}", config="configs/charlm.yaml"
    )
    launch(run, 2, *CHARLM, config="configs/charlm.yaml")
    assert tensors_equal(load(run), load(ref))
    assert tensors_equal(load(run, "optim.pt"), load(ref, "optim.pt"))
    # Dropout really acts: the same weights in train mode give two different outputs.
    from workers.tasks.charlm import build

    task = build(block_size=16, stride=8, d_model=32, n_layers=1, n_heads=2, dropout=0.2)
    task.model.load_state_dict(load(ref))
    x = task.dataset[0][0][None]
    assert not torch.equal(task.model(x), task.model(x))


def test_random_augmentation_is_reproduced_whatever_the_loader_workers_and_stops(refs, tmp_path):
    """Per-sample seeding: augmentation depends on the sample's place in the global stream only."""
    ref, run = tmp_path / "ref", tmp_path / "run"
    launch(ref, 2, "task.args.augment=0.5", "data.num_workers=0")
    launch_and_kill(
        run,
        2,
        "task.args.augment=0.5",
        "data.num_workers=2",
        "task.args.step_sleep_s=0.1",
        kill_after=f"step-{EVERY:08d}",
    )
    launch(run, 2, "task.args.augment=0.5", "data.num_workers=2")
    assert tensors_equal(load(run), load(ref))
    assert rel_diff(load(ref), load(refs[2])) > 1e-4  # the augmentation really changed the training


def _as_written_before_the_order_was_recorded(run) -> None:
    """Take ``order`` out of every checkpoint's train_state.json and fix its manifest entry: what a checkpoint of
    the randperm days looks like."""
    from workers.fsutil import digest_of, file_digest

    for folder in (run / "checkpoints").glob("step-*"):
        state_file, manifest_file = folder / "train_state.json", folder / "manifest.json"
        state = json.loads(state_file.read_text())
        assert state.pop("order") == "randperm"
        state_file.write_text(json.dumps(state))
        manifest = json.loads(manifest_file.read_text())
        entry = manifest["files"]["train_state.json"]
        algorithm, _ = digest_of(entry)
        entry.update({"size": state_file.stat().st_size, algorithm: file_digest(state_file, algorithm)})
        manifest_file.write_text(json.dumps(manifest))


def test_a_checkpoint_from_before_the_order_was_recorded_resumes_in_its_randperm_order_bitwise(tmp_path):
    full = tmp_path / "full"
    launch(full, 2, "data.order=randperm")
    run = tmp_path / "old"
    launch_and_kill(run, 2, "data.order=randperm", "task.args.step_sleep_s=0.1", kill_after=f"step-{EVERY:08d}")
    _as_written_before_the_order_was_recorded(run)
    proc = launch(run, 3)  # today's default is feistel: the resumed stream must still be the old one
    assert "the checkpoint's sample order is randperm; data.order=feistel applies to new runs only" in proc.stderr
    assert rel_diff(load(run), load(full)) <= 1e-5
    old = GlobalOrder(200, 0, "randperm")
    assert consumed_sequence(run) == [old.take(step * GBS, GBS) for step in range(MAX_STEPS)]
    assert consumed_sequence(run) != expected_sequence()  # the two schemes really differ
    final = json.loads((run / "checkpoints" / f"step-{MAX_STEPS:08d}" / "train_state.json").read_text())
    assert final["order"] == "randperm"
