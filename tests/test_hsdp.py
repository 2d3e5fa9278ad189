"""HSDP (``train.parallel=hsdp``: FSDP2 on a 2-D mesh, sharded within groups of ``train.shard_size`` ranks and
replicated across them) end to end, with real gloo groups of 4 processes and real SIGKILLs:

- hsdp on 4 ranks (shard groups of 2) reaches ddp's weights on 4 ranks, on the same global stream;
- SIGKILLed and relaunched, it equals the uninterrupted run bit for bit (model and optimizer state);
- its checkpoints reshard: hsdp(4) -> fsdp(2), hsdp(4) -> ddp(3), ddp(2) -> hsdp(4), within 1e-5;
- a pickle payload in its DCP ``.metadata`` is refused as for fsdp; a shard size that does not divide the world
  size is one line, exit 2, nothing written.
"""

from __future__ import annotations

import json

import pytest
from conftest import (
    EVERY,
    GBS,
    MAX_STEPS,
    consumed_sequence,
    copy_run,
    final_dir,
    fingerprint,
    launch,
    launch_and_kill,
    load,
    rel_diff,
    shared_runs,
    tensors_equal,
)
from test_exactness import expected_sequence
from test_sharded import _plant_payload, optim_tensors

from workers.checkpoint import dcp_io

HSDP = ["train.parallel=hsdp", "train.shard_size=2"]


@pytest.fixture(scope="module")
def hsdp_refs(tmp_path_factory) -> dict[str, object]:
    """hsdp and ddp on 4 ranks, uninterrupted, and an hsdp run SIGKILLed after its step-4 checkpoint."""

    def build(base) -> None:
        (base / "hsdp.log").write_text(launch(base / "hsdp4", 4, *HSDP).stderr)
        launch(base / "ddp4", 4)
        launch_and_kill(base / "killed", 4, *HSDP, "task.args.step_sleep_s=0.1", kill_after=f"step-{EVERY:08d}")

    base = shared_runs(tmp_path_factory, "hsdp", build)
    return {"full": base / "hsdp4", "ddp": base / "ddp4", "killed": base / "killed", "log": base / "hsdp.log"}


def test_hsdp_on_4_ranks_in_groups_of_2_matches_ddp_on_4(hsdp_refs):
    run = hsdp_refs["full"]
    assert "hsdp: 3 unit(s) + root sharded over groups of 2 ranks, replicated 2x" in hsdp_refs["log"].read_text()
    assert rel_diff(load(run), load(hsdp_refs["ddp"])) <= 1e-5
    earlier = dcp_io.read_full(final_dir(run, MAX_STEPS - EVERY) / "dcp", dcp_io.MODEL_PREFIX)
    assert rel_diff(load(run), earlier) > 1e-3  # training moved the weights
    assert consumed_sequence(run) == expected_sequence()
    state = json.loads((final_dir(run) / "train_state.json").read_text())
    assert state["parallel"] == "hsdp" and state["world_size"] == 4
    # every shard of every tensor is written once: DCP spreads the replicated shards over the replicas' files
    manifest = json.loads((final_dir(run) / "manifest.json").read_text())
    assert {f"dcp/__{r}_0.distcp" for r in range(4)} <= manifest["files"].keys()


def test_hsdp_killed_and_relaunched_is_bitwise_equal(hsdp_refs, tmp_path):
    run = copy_run(hsdp_refs["killed"], tmp_path / "run")
    proc = launch(run, 4, *HSDP)
    assert f"resumed from {run / 'checkpoints' / f'step-{EVERY:08d}'}" in proc.stderr
    assert tensors_equal(load(run), load(hsdp_refs["full"]))
    assert tensors_equal(optim_tensors(run), optim_tensors(hsdp_refs["full"]))
    assert consumed_sequence(run) == expected_sequence()


def test_hsdp_checkpoints_reshard_into_fsdp_and_ddp_and_back(hsdp_refs, killed2, tmp_path):
    full = load(hsdp_refs["full"])
    cases = [  # (killed run, world size now, mode now)
        (hsdp_refs["killed"], 2, ["train.parallel=fsdp"]),
        (hsdp_refs["killed"], 3, ["train.parallel=ddp"]),
        (killed2, 4, HSDP),  # ddp(2) -> hsdp(4)
    ]
    for i, (src, ws, mode) in enumerate(cases):
        run = copy_run(src, tmp_path / f"case-{i}")
        proc = launch(run, ws, *mode)
        assert f"resumed from {run / 'checkpoints' / f'step-{EVERY:08d}'}" in proc.stderr
        assert rel_diff(load(run), full) <= 1e-5, f"case {i}: ws={ws} {mode}"
        assert consumed_sequence(run) == expected_sequence()


def test_a_pickle_payload_in_an_hsdp_checkpoints_metadata_is_refused(hsdp_refs, tmp_path):
    run, marker = copy_run(hsdp_refs["full"], tmp_path / "run"), tmp_path / "pwned"
    for step in (MAX_STEPS - EVERY, MAX_STEPS):
        _plant_payload(final_dir(run, step), marker)
    before = fingerprint(run, mtimes=False)
    proc = launch(run, 4, *HSDP, "train.max_steps=16", check=False)
    assert proc.returncode == 2 and ".metadata' is refused" in proc.stderr, proc.stderr
    assert fingerprint(run, mtimes=False) == before and not marker.exists()


@pytest.mark.parametrize(
    ("overrides", "nproc", "words"),
    [
        (
            ["train.parallel=hsdp", "train.shard_size=3"],
            4,
            ["train.shard_size", "3", "does not divide the world size 4"],
        ),
        (["train.shard_size=2"], 2, ["train.shard_size", "applies to train.parallel=hsdp only"]),
        (["train.parallel=hsdp", "train.shard_size=0"], 2, ["train.shard_size", "0"]),
    ],
)
def test_a_shard_size_that_cannot_work_is_one_line_exit_2_and_nothing_written(overrides, nproc, words, tmp_path):
    run = tmp_path / "run"
    proc = launch(run, nproc, *overrides, check=False)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and all(w in lines[0] for w in words), proc.stderr
    assert not run.exists()


def test_a_poisoned_sample_is_skipped_by_every_hsdp_rank_and_training_goes_on_as_under_ddp(hsdp_refs, tmp_path):
    from test_numerics import _finite, _skips

    from workers.data import GlobalOrder

    order = GlobalOrder(200, 0)
    bad = order.take(5 * GBS + 7, 1)[0]  # a sample of step 6: on rank 0's shard group, not rank 3's
    expected = [(s + 1, s * GBS, (s + 1) * GBS - 1) for s in range(MAX_STEPS) if bad in order.take(s * GBS, GBS)]
    runs = {mode: tmp_path / mode for mode in ("hsdp", "ddp")}
    for mode, run in runs.items():
        proc = launch(run, 4, f"task.args.poison_index={bad}", *(HSDP if mode == "hsdp" else []))
        assert _skips(proc.stderr) == expected and expected, proc.stderr
        for rank in range(4):  # the decision rests on the norm reduced over both mesh dimensions: every rank
            assert _skips((run / "logs" / f"rank-{rank}.log").read_text()) == expected
    assert _finite(load(runs["hsdp"])) and rel_diff(load(runs["hsdp"]), load(runs["ddp"])) <= 1e-5
