"""Non-finite values the loss and the gradients do not show (issue 23, item 3), with real gloo process groups.

- a sample with huge (finite) inputs overflows BatchNorm's running variance while its loss and gradients stay
  finite: with ``train.nonfinite=skip`` the step is skipped on every rank and the warning names the buffer; with
  ``halt`` the run fails at that step naming it; with ``off`` the next save is refused naming it. No committed
  checkpoint ever holds NaN/inf in a tensor that was finite before;
- the per-step alarm (in process): exactly 1.0 while the watched buffers are finite, NaN once one is not;
- a buffer that is -inf by design (a persistent causal mask) is committed as it is: no false alarm, even with
  ``halt``;
- a task's scheduler whose learning rate turns NaN or inf (a NaN factor, a division by zero) fails the run at the
  step that would use it, and the report names the learning rate and the task's scheduler, not the data.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
from conftest import EVERY, GBS, MAX_STEPS, final_dir, latest_name, launch

from workers.checkpoint import dcp_io
from workers.data import GlobalOrder

HUGE = "task.factory=numerics_tasks:huge_sample"
HUGE_STEP = 6  # the step whose samples hold the huge one (on rank 0, drawn once in the run): see _huge_index
BUFFER = "1.running_var"


def _huge_index() -> str:
    """A sample of step 6, in rank 0's share of it, drawn nowhere else in the run's 12 steps (so exactly one step
    is poisoned, on the rank whose buffers DDP broadcasts and a save writes)."""
    order = GlobalOrder(200, 0)
    stream = order.take(0, MAX_STEPS * GBS)
    share = order.take((HUGE_STEP - 1) * GBS, GBS // 2)  # rank 0's half of step 6 (2 ranks)
    index = next(i for i in share if stream.count(i) == 1)
    return f"task.args.huge_index={index}"


def test_the_alarm_is_exactly_one_until_a_watched_buffer_holds_nan_or_inf():
    """The per-step alarm multiplies the loss: exactly 1.0 (the same gradients, bit for bit) while the watched buffers
    are finite, however large (no overflow of its own), NaN as soon as one holds NaN or inf; the others are ignored."""
    from workers.train.numerics import WatchedBuffers  # (here: the CLI tests of this file run without it)

    model = torch.nn.Module()
    model.register_buffer("stat", torch.full((3,), 3e38))  # finite, at the edge of float32
    model.register_buffer("low", torch.ones(2, dtype=torch.bfloat16))
    model.register_buffer("mask", torch.tensor([0.0, -math.inf]))  # -inf by design: never watched
    model.register_buffer("scratch", torch.ones(2), persistent=False)  # never saved: never watched
    watched = WatchedBuffers(model)
    assert [name for name, _, _ in watched.all] == ["stat", "low", "mask"]
    watched.update([True, True, False], "the start of the run")
    assert watched.names == {"stat", "low"}
    assert watched.alarm().item() == 1.0
    model.scratch.fill_(math.nan)
    assert watched.alarm().item() == 1.0
    for name, bad in (("stat", math.inf), ("low", math.nan)):
        before = getattr(model, name).clone()
        getattr(model, name)[0] = bad
        assert math.isnan(watched.alarm().item()), name
        getattr(model, name).copy_(before)
    model.stat = torch.full((3,), math.inf)  # a buffer reassigned by its module is looked up anew
    assert math.isnan(watched.alarm().item())


def _committed(run: Path) -> list[Path]:
    return sorted(f for f in (run / "checkpoints").glob("step-*") if (f / "manifest.json").is_file())


def _model_state(folder: Path) -> dict[str, torch.Tensor]:
    """The model a committed checkpoint holds: model.pt, or the full state of its shards (fsdp)."""
    if (folder / "dcp").is_dir():
        return dcp_io.read_full(folder / "dcp", dcp_io.MODEL_PREFIX)
    return torch.load(folder / "model.pt", weights_only=True)


def _nonfinite(state: dict[str, torch.Tensor]) -> set[str]:
    return {k for k, t in state.items() if t.is_floating_point() and not torch.isfinite(t).all()}


def _assert_no_diverged_tensor(run: Path, by_design: frozenset[str] = frozenset()) -> None:
    """No committed checkpoint holds NaN/inf outside the tensors that hold it by design (those are finite nowhere)."""
    for folder in _committed(run):
        assert _nonfinite(_model_state(folder)) == by_design, folder


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_a_sample_that_overflows_batchnorm_statistics_is_skipped_and_named(tmp_path, parallel):
    run = tmp_path / "skip"
    proc = launch(run, 2, HUGE, _huge_index(), f"train.parallel={parallel}")
    first, last = (HUGE_STEP - 1) * GBS, HUGE_STEP * GBS - 1
    warning = (
        f"the buffer '{BUFFER}' turned NaN/inf (it was finite before the step) at step {HUGE_STEP} (global stream "
        f"positions {first}..{last}): step skipped on every rank"
    )
    assert proc.stderr.count(warning) >= 1, proc.stderr
    for rank in (0, 1):  # every rank took the decision (rank 1 never saw the sample)
        assert (run / "logs" / f"rank-{rank}.log").read_text().count(warning) == 1
    assert "non-finite gradient norm" not in proc.stderr  # the gradients were finite: the buffer is the cause
    assert [f.name for f in _committed(run)][-1] == f"step-{MAX_STEPS:08d}"
    _assert_no_diverged_tensor(run)
    state = json.loads((final_dir(run) / "train_state.json").read_text())
    assert state["nonfinite_skipped"] == 1


def test_halt_fails_at_the_step_naming_the_buffer(tmp_path):
    run = tmp_path / "halt"
    proc = launch(run, 2, HUGE, _huge_index(), "train.nonfinite=halt", "launch.max_restarts=2", check=False)
    assert proc.returncode == 1, proc.stderr
    assert (
        f"the buffer '{BUFFER}' turned NaN/inf (it was finite before the step) at step {HUGE_STEP} "
        f"(global stream positions {(HUGE_STEP - 1) * GBS}..{HUGE_STEP * GBS - 1}): train.nonfinite=halt"
    ) in proc.stderr, proc.stderr
    assert f"the last good checkpoint is step-{EVERY:08d}" in proc.stderr
    assert "restarting" not in proc.stderr.lower()  # an exact resume would only repeat it
    assert latest_name(run) == f"step-{EVERY:08d}"
    _assert_no_diverged_tensor(run)


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_without_the_guard_a_save_with_a_diverged_buffer_is_refused(tmp_path, parallel):
    run = tmp_path / "off"
    proc = launch(
        run, 2, HUGE, _huge_index(), "train.nonfinite=off", "train.keep_checkpoints=100", f"train.parallel={parallel}",
        check=False,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    save = 2 * EVERY  # the first save after the poisoned step
    assert (
        f"the buffer '{BUFFER}' is not finite at step {save} (it was finite at the last checkpoint, "
        f"step-{EVERY:08d}): not saved"
    ) in proc.stderr, proc.stderr
    assert latest_name(run) == f"step-{EVERY:08d}"
    assert [f.name for f in _committed(run)] == [f"step-{EVERY:08d}"]
    _assert_no_diverged_tensor(run)


def test_a_buffer_that_is_minus_inf_by_design_is_committed_as_it_is(tmp_path):
    run = tmp_path / "mask"
    proc = launch(run, 2, "task.factory=numerics_tasks:causal_mask", "train.nonfinite=halt")
    assert "NaN/inf" not in proc.stderr and "non-finite" not in proc.stderr, proc.stderr
    assert [f.name for f in _committed(run)][-1] == f"step-{MAX_STEPS:08d}"
    _assert_no_diverged_tensor(run, frozenset({"causal_mask"}))
    mask = torch.load(final_dir(run) / "model.pt", weights_only=True)["causal_mask"]
    assert torch.equal(mask, torch.nn.Transformer.generate_square_subsequent_mask(4))


@pytest.mark.parametrize("kind, shown", [("nan", "nan"), ("zero_division", "inf")])
def test_a_non_finite_learning_rate_is_blamed_on_the_scheduler_not_the_data(tmp_path, kind, shown):
    run = tmp_path / kind
    at = 5  # the scheduler's step 5: optimizer step 6 would use it, after the step-4 checkpoint
    proc = launch(
        run, 2, "task.factory=numerics_tasks:bad_lr", f"task.args.lr_kind={kind}", f"task.args.lr_at={at}",
        "launch.max_restarts=2", check=False,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    found = re.search(r"^.*learning rate is not finite at step (\d+).*$", proc.stderr, re.MULTILINE)
    assert found, proc.stderr
    line = found[0]
    assert int(found[1]) == at + 1
    assert f"param group 0 has lr {shown}" in line and "the task's scheduler" in line, line
    assert "sample" not in line and "record_indices" not in line, line  # not the data's problem
    assert "non-finite gradient norm" not in proc.stderr and "weights are not finite" not in proc.stderr
    assert "restarting" not in proc.stderr.lower()
    assert latest_name(run) == f"step-{EVERY:08d}"
    _assert_no_diverged_tensor(run)
