"""workers/train/numerics.py: the gradient norm, the non-finite guard (skip / halt / off, the streak limit, its
counters across a resume), the buffers no checkpoint may hold NaN/inf in, the finite-state and learning-rate
checks."""

from __future__ import annotations

import math
import re

import pytest
import torch
from torch import nn

from workers.config import config_from_dict
from workers.contract import TrainState
from workers.errors import NonFiniteError
from workers.optim import build
from workers.tasks import resolve
from workers.train.numerics import (
    NonFiniteGuard,
    Numerics,
    WatchedBuffers,
    first_nonfinite_lr,
    persistent_float_buffers,
    total_norm,
)

NAN = torch.tensor(math.nan)


def _guard(mode: str = "skip", limit: int = 2) -> NonFiniteGuard:
    return NonFiniteGuard(config_from_dict({}, [f"train.nonfinite={mode}", f"train.max_nonfinite={limit}"]), 8)


class Net(nn.Module):
    """A model with a BatchNorm (running statistics), a -inf causal mask buffer (NaN/inf by design), an integer
    buffer and a non-persistent one."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(3, 4)
        self.bn = nn.BatchNorm1d(4)
        self.register_buffer("mask", torch.triu(torch.full((2, 2), -math.inf), 1))
        self.register_buffer("scratch", torch.zeros(2), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.lin(x))


def _grads(model: nn.Module) -> list[torch.Tensor]:
    model(torch.randn(6, 3)).pow(3).sum().backward()
    return [p.grad for p in model.parameters()]


def test_total_norm_is_clip_grad_norms_norm():
    model = Net()
    grads = _grads(model)
    ours = total_norm(grads, torch.device("cpu"))
    theirs = nn.utils.clip_grad_norm_(model.parameters(), max_norm=1e9)
    assert torch.equal(ours, theirs) and ours.item() > 0
    mixed = [grads[0], grads[1].double()]  # several dtypes: torch's own grouping
    assert ours.dtype == torch.float32
    assert total_norm(mixed, torch.device("cpu")).item() == pytest.approx(
        torch.cat([grads[0].flatten(), grads[1]]).norm().item()
    )
    assert total_norm([], torch.device("cpu")).item() == 0.0
    assert math.isnan(total_norm([grads[0], torch.full((2,), math.nan)], torch.device("cpu")).item())


def test_the_first_non_finite_learning_rate():
    model = Net()
    opt = torch.optim.SGD([{"params": model.lin.parameters()}, {"params": model.bn.parameters()}], lr=0.1)
    assert first_nonfinite_lr(opt) is None
    opt.param_groups[1]["lr"] = math.inf
    assert first_nonfinite_lr(opt) == (1, math.inf)
    opt.param_groups[0]["lr"] = torch.tensor(math.nan)  # a tensor lr (on the CPU: read)
    group, lr = first_nonfinite_lr(opt)
    assert group == 0 and math.isnan(lr)


def test_skip_skips_up_to_the_streak_limit_then_halts_naming_the_samples(run_dir):
    guard = _guard(limit=2)
    assert guard.skips(torch.tensor(1.5), 0, run_dir) is False
    assert guard.skips(NAN, 1, run_dir) and guard.skips(torch.tensor(math.inf), 2, run_dir)
    assert (guard.skipped, guard.streak) == (2, 2)
    run_dir.checkpoints.mkdir()
    run_dir.latest.write_text("step-00000002\n")
    with pytest.raises(NonFiniteError) as info:
        guard.skips(NAN, 3, run_dir)
    message = str(info.value)
    assert "at step 4 (global stream positions 24..31)" in message
    assert "3 consecutive non-finite steps, more than train.max_nonfinite=2" in message
    assert "the last good checkpoint is step-00000002" in message and "lower optim.lr" in message


def test_a_finite_step_ends_the_streak_and_a_resume_continues_the_counters(run_dir):
    guard = _guard(limit=2)
    assert guard.skips(NAN, 0, run_dir) and guard.skips(NAN, 1, run_dir)
    assert guard.skips(torch.tensor(0.1), 2, run_dir) is False and (guard.skipped, guard.streak) == (2, 0)
    guard.skips(NAN, 3, run_dir)
    resumed = _guard(limit=2)
    resumed.restore(TrainState(4, 32, 1, 8, 0, nonfinite_skipped=guard.skipped, nonfinite_streak=2))
    with pytest.raises(NonFiniteError, match="3 consecutive"):  # the streak goes on where the checkpoint left it
        resumed.skips(NAN, 4, run_dir)
    fresh = _guard()
    fresh.restore(TrainState(4, 32, 1, 8, 0))  # a checkpoint of before the counters: zero
    assert (fresh.skipped, fresh.streak) == (0, 0)


def test_halt_stops_at_the_first_and_off_never_looks(run_dir):
    with pytest.raises(NonFiniteError, match=re.escape("train.nonfinite=halt; no checkpoint was committed yet")):
        _guard("halt").skips(NAN, 0, run_dir)
    off = _guard("off")
    assert not off.active and off.skips(NAN, 0, run_dir) is False and off.snapshot(Net()) is None
    assert _guard("false").mode == "off"  # YAML's bare `off`
    culprit = _guard(limit=1)
    culprit.skips(NAN, 0, run_dir, culprit=lambda: "bn.running_var")
    with pytest.raises(NonFiniteError, match=r"the buffer 'bn\.running_var' turned NaN/inf .*BatchNorm's running_var"):
        culprit.skips(NAN, 1, run_dir, culprit=lambda: "bn.running_var")


def test_a_skipped_step_puts_the_buffers_back():
    model, guard = Net(), _guard()
    before = [b.clone() for b in model.buffers()]
    saved = guard.snapshot(model)
    model(torch.randn(6, 3) * 100)  # the forward moves BatchNorm's running statistics
    assert not torch.equal(model.bn.running_var, before[1])
    guard.restore_buffers(model, saved)
    assert all(torch.equal(a, b) for a, b in zip(model.buffers(), before, strict=True))
    assert guard.snapshot(nn.Linear(2, 2)) is None  # no buffers: nothing to keep


def test_the_watched_buffers_are_the_persistent_float_ones_finite_at_the_last_save():
    model = Net()
    assert [name for name, _, _ in persistent_float_buffers(model)] == ["mask", "bn.running_mean", "bn.running_var"]
    watch = WatchedBuffers(model)
    assert watch.alarm() is None  # nothing watched yet
    watch.update([False, True, True], "the last checkpoint, step-00000004")
    assert watch.names == {"bn.running_mean", "bn.running_var"} and watch.since.endswith("step-00000004")
    assert watch.alarm().item() == 1.0
    model.bn.running_var[0] = math.inf
    assert math.isnan(watch.alarm().item())
    model.bn.running_var = torch.ones(4)  # a task may reassign a buffer: looked up by attribute
    assert watch.alarm().item() == 1.0


def _numerics(model: nn.Module, run_dir, lr: float = 0.1) -> Numerics:
    from workers.dist import DistContext

    cfg = config_from_dict({}, [f"optim.lr={lr}"])
    task = resolve(type("T", (), {"model": model, "dataset": [0], "loss": lambda self, m, b: 0})())
    built = build(cfg.optim, task, model, max_steps=10)
    return Numerics(model, DistContext.from_env("cpu", env={}), False, run_dir, _guard(), built)


def test_no_checkpoint_takes_non_finite_weights_or_a_diverged_buffer(run_dir):
    model = Net()
    numerics = _numerics(model, run_dir)
    numerics.watch_buffers(0)  # the mask was never finite: saved as it is, never watched
    assert numerics.buffer_watch.names == {"bn.running_mean", "bn.running_var"}
    numerics.check_finite_state(4)
    model.bn.running_var[1] = math.nan
    with pytest.raises(
        NonFiniteError,
        match=r"the buffer 'bn.running_var' is not finite at step 6 \(it was finite "
        r"at the last checkpoint, step-00000004\)",
    ):
        numerics.check_finite_state(6)
    model.bn.running_var[1] = 1.0
    with torch.no_grad():
        model.lin.bias[0] = math.inf
    with pytest.raises(NonFiniteError, match=r"the weights are not finite at step 6 \('lin.bias' holds NaN/inf\)"):
        numerics.check_finite_state(6)


def test_the_loss_is_alarmed_by_a_diverged_watched_buffer(run_dir):
    model = Net()
    numerics = _numerics(model, run_dir)
    numerics.watch_buffers(0)
    loss = torch.tensor(0.37)
    assert torch.equal(numerics.alarmed(loss), loss)  # times exactly 1.0: the same gradients, bit for bit
    assert numerics.diverged_buffer(loss) is None
    model.bn.running_mean[2] = -math.inf
    assert math.isnan(numerics.alarmed(loss).item())
    assert numerics.diverged_buffer(loss) == "bn.running_mean"
    assert numerics.diverged_buffer(NAN) is None  # the loss itself was NaN: the gradients are named


def test_a_non_finite_learning_rate_is_named_as_the_schedules(run_dir):
    numerics = _numerics(Net(), run_dir)
    numerics.check_finite_lr(1)
    numerics.optim.optimizer.param_groups[0]["lr"] = math.nan
    with pytest.raises(
        NonFiniteError,
        match=r"the learning rate is not finite at step 3: param group 0 has lr nan, "
        r"as set by optim.lr and the built-in schedule",
    ):
        numerics.check_finite_lr(3)
