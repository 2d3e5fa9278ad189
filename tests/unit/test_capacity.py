"""orchestrator/capacity.py: which device slot is dropped, when, and the world size the group goes on with."""

from __future__ import annotations

import os

from orchestrator.capacity import Capacity
from orchestrator.outcome import RankOutcome, RunResult
from workers.config import config_from_dict
from workers.contract import ErrorRecord, FailureKind

LOST = "RuntimeError: Connection closed by peer [127.0.0.1]:1234"  # what gloo says when the other rank died


def _config(nproc: int, gbs: int = 24, min_nproc: int | None = None):
    overrides = [f"launch.nproc={nproc}", f"data.global_batch_size={gbs}"]
    return config_from_dict({}, overrides + ([f"launch.min_nproc={min_nproc}"] if min_nproc else []))


def _failed(rank: int, lost_peer: bool = False) -> RunResult:
    message = LOST if lost_peer else "RuntimeError: device error"
    error = ErrorRecord(rank, FailureKind.EXCEPTION, message)
    outcome = RankOutcome(rank, 1, None, error, 0.0)
    return RunResult(outcomes={rank: outcome}, root_cause=outcome)


def test_a_slot_is_dropped_after_two_root_cause_failures_in_a_row_only():
    capacity = Capacity.of(_config(4, min_nproc=2))
    assert capacity.slots == (0, 1, 2, 3)
    assert capacity.observe(_failed(2)) is None  # once: bad luck
    assert capacity.observe(_failed(1)) is None  # another slot in between: the streak starts over
    assert capacity.observe(_failed(2)) is None
    drop = capacity.observe(_failed(2))
    assert drop is not None and drop.slot == 2 and drop.slots == (0, 1, 3) and "device error" in drop.reason
    assert capacity.slots == (0, 1, 3)  # rank 2 now runs on slot 3


def test_the_group_goes_on_at_the_largest_world_size_the_batch_divides():
    capacity = Capacity.of(_config(4, gbs=8, min_nproc=2))  # 3 workers cannot split 8 samples
    capacity.observe(_failed(0))
    drop = capacity.observe(_failed(0))
    assert drop is not None and drop.slots == (1, 2)  # slot 3 sits out
    capacity.observe(_failed(1))  # rank 1 runs on slot 2 now
    drop = capacity.observe(_failed(1))
    assert drop is not None and drop.slot == 2 and drop.slots == (1, 3)  # the slot that sat out steps in
    capacity.observe(_failed(0))
    assert capacity.observe(_failed(0)) is None  # 2 is the minimum: nothing more is dropped
    assert "slot 1 was the cause of the last 2 attempts" in capacity.repeated()


def test_without_min_nproc_nothing_is_dropped_and_the_repeated_slot_is_named_with_a_hint():
    capacity = Capacity.of(_config(3))
    for _ in range(3):
        assert capacity.observe(_failed(2)) is None
    line = capacity.repeated()
    assert line.startswith("slot 2 was the cause of the last 3 attempts (exit code 1 — RuntimeError: device error)")
    assert "launch.min_nproc=2 would let the run go on without it" in line
    assert capacity.slots == (0, 1, 2)


def test_a_rank_that_only_lost_its_peer_condemns_no_slot():
    capacity = Capacity.of(_config(3, min_nproc=2))
    capacity.observe(_failed(1))
    assert capacity.failed_slot(_failed(1, lost_peer=True)) is None
    assert capacity.observe(_failed(1, lost_peer=True)) is None and capacity.repeated() is None


def test_a_group_sees_only_its_slots_devices_so_a_dropped_slot_is_left_out(monkeypatch):
    from workers.entry import _take_slot, group_devices

    assert group_devices((0, 1, 2), None) == "0,1,2"
    assert group_devices((0, 1), None) == "0,1"  # slot 2 (the highest) dropped: device 2 is not visible
    assert group_devices((0, 2), None) == "0,2" and group_devices((1, 3), "4,5,6,7") == "5,7"
    assert group_devices((0, 1), "6, 7,3") == "6,7"  # the launch's own CUDA_VISIBLE_DEVICES, at the slots kept
    assert group_devices((0, 1), "") == ""  # no GPU on purpose stays no GPU
    monkeypatch.setenv("ORCH_SLOT", "")  # (restored afterwards, like CUDA_VISIBLE_DEVICES)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    _take_slot(1, (0, 1))  # after slot 2 of 3 was dropped: rank 1 on slot 1 indexes the second of the group's
    assert os.environ["ORCH_SLOT"] == "1" and os.environ["CUDA_VISIBLE_DEVICES"] == "0,1"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3,5")
    _take_slot(0, (1, 2))
    assert os.environ["ORCH_SLOT"] == "1" and os.environ["CUDA_VISIBLE_DEVICES"] == "3,5"
