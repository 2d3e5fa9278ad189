"""The numerics of a step (README.md, "Non-finite steps"): the non-finite guard (``train.nonfinite``), the
buffers no checkpoint may hold NaN/inf in, the learning-rate check and the gradient norm.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from workers.config import Config
from workers.contract import TrainState
from workers.dist import DistContext
from workers.errors import NonFiniteError
from workers.optim import Built
from workers.parallel import nonfinite_anywhere, nonfinite_mask, replicated
from workers.rundir import RunDir, step_dir_name

log = logging.getLogger("workers.trainer")


def total_norm(grads: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """The L2 norm of all gradients, as ``clip_grad_norm_`` computes it (same value); when every gradient shares one
    device and dtype, without its per-call grouping (~40 % of its time on a small model)."""
    if not grads:
        return torch.zeros((), device=device)
    if any(isinstance(g, DTensor) for g in grads):  # sharded: local norms, reduced across ranks by DTensor
        return replicated(nn.utils.get_total_norm(grads))
    if len({(g.device, g.dtype) for g in grads}) > 1:
        return nn.utils.get_total_norm(grads)
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))


def first_nonfinite_lr(optimizer: torch.optim.Optimizer) -> tuple[int, float] | None:
    """(group index, lr) of the first parameter group whose learning rate is NaN/inf, or None. A tensor lr is read
    only on the CPU (on an accelerator that would be a host sync every step)."""
    for g, group in enumerate(optimizer.param_groups):
        lr = group.get("lr")
        if isinstance(lr, torch.Tensor):
            if lr.device.type != "cpu" or lr.numel() != 1:
                continue
            lr = lr.item()
        if isinstance(lr, (int, float)) and not math.isfinite(lr):
            return g, float(lr)
    return None


def persistent_float_buffers(model: nn.Module) -> list[tuple[str, nn.Module, str]]:
    """(state_dict name, owning module, attribute) of each floating-point buffer a checkpoint holds: a
    non-persistent buffer is never saved, an integer one (num_batches_tracked) cannot hold NaN/inf."""
    found = []
    for prefix, module in model.named_modules():
        for key, buf in module._buffers.items():
            if buf is not None and buf.is_floating_point() and key not in module._non_persistent_buffers_set:
                found.append((f"{prefix}.{key}" if prefix else key, module, key))
    return found


class WatchedBuffers:
    """The buffers no checkpoint may hold NaN/inf in: the model's persistent floating-point buffers that were finite
    at the start, or at the last save. Decided per tensor, so a buffer that is NaN/inf by design (a -inf causal mask
    registered as a buffer) is never watched, and a running statistic that diverges is (one that was NaN/inf and is
    finite now is watched from the next save on). The set is the same on every rank: it comes out of
    Numerics._finite_state's collective. Buffers are looked up by attribute each time (a task may reassign one)."""

    def __init__(self, model: nn.Module) -> None:
        self.all = persistent_float_buffers(model)
        self.watched: list[tuple[str, nn.Module, str]] = []
        self.names: frozenset[str] = frozenset()
        self.since = "the start of the run"  # where the watched ones were last seen finite (for messages)

    def update(self, finite: list[bool], since: str) -> None:
        """Watch, from now on, the buffers that are finite (``finite``: one flag per buffer of ``self.all``)."""
        self.watched = [b for b, ok in zip(self.all, finite, strict=True) if ok]
        self.names, self.since = frozenset(name for name, _, _ in self.watched), since

    @staticmethod
    def tensors(buffers: list[tuple[str, nn.Module, str]]) -> list[torch.Tensor]:
        return [module._buffers[key] for _, module, key in buffers]

    def alarm(self) -> torch.Tensor | None:
        """1.0, or NaN when a watched buffer holds NaN/inf now; None when nothing is watched. On the device, no host
        sync: two fused ops (0 * x is 0 for a finite x, NaN for inf or NaN; a norm of them is 0 or NaN)."""
        if not self.watched:
            return None
        zeros = torch._foreach_mul(self.tensors(self.watched), 0.0)
        return 1.0 + torch.stack(torch._foreach_norm(zeros)).sum()


def last_good(paths: RunDir) -> str:
    name = paths.latest_name()
    return f"the last good checkpoint is {name} (checkpoints/latest)" if name else "no checkpoint was committed yet"


class NonFiniteGuard:
    """``train.nonfinite``: what a step with a NaN/inf gradient norm does. The counters are part of the run's state
    (train_state.json), so a resume continues them and reproduces the same decisions."""

    def __init__(self, cfg: Config, global_batch: int) -> None:
        self.mode, self.limit, self.global_batch = cfg.train.nonfinite, cfg.train.max_nonfinite, global_batch
        self.active = self.mode != "off"
        self.skipped = 0  # steps skipped in the whole run
        self.streak = 0  # consecutive skipped steps up to now

    def snapshot(self, model: nn.Module) -> list[torch.Tensor] | None:
        """The model's buffers before a step (BatchNorm's running statistics change in the forward): a skipped
        step puts them back. None when there is nothing to keep (no buffers, or the guard is off)."""
        buffers = list(model.buffers())
        return [b.clone() for b in buffers] if self.active and buffers else None

    def restore_buffers(self, model: nn.Module, saved: list[torch.Tensor] | None) -> None:
        if saved is not None:
            with torch.no_grad():
                for live, before in zip(model.buffers(), saved, strict=True):
                    live.copy_(before)

    def restore(self, state: TrainState) -> None:
        self.skipped, self.streak = state.nonfinite_skipped or 0, state.nonfinite_streak or 0

    def skips(
        self, grad_norm: torch.Tensor, step: int, paths: RunDir, culprit: Callable[[], str | None] = lambda: None
    ) -> bool:
        """Whether the step (0-based ``step``) is skipped; NonFiniteError past ``max_nonfinite`` or with ``halt``.
        One host sync (the decision needs the value). ``culprit()``, asked only when the norm is not finite (on every
        rank: may be collective), names the buffer that made it so (Numerics.alarmed), or None: the gradients."""
        if not self.active or math.isfinite(grad_norm.item()):  # .item(): 0.3 µs; bool(isfinite()): 6 µs
            self.streak = 0
            return False
        buffer = culprit()
        what = (
            f"non-finite gradient norm ({float(grad_norm)})" if buffer is None
            else f"the buffer '{buffer}' turned NaN/inf (it was finite before the step)"
        )  # fmt: skip
        first, last = step * self.global_batch, (step + 1) * self.global_batch - 1
        where = f"at step {step + 1} (global stream positions {first}..{last})"
        self.streak += 1
        if self.mode == "halt" or self.streak > self.limit:
            why = "train.nonfinite=halt" if self.mode == "halt" else (
                f"{self.streak} consecutive non-finite steps, more than train.max_nonfinite={self.limit}"
            )  # fmt: skip
            raise NonFiniteError(
                f"{what} {where}: {why}; {last_good(paths)}. HINT: find the samples with data.record_indices=true; "
                + ("lower optim.lr or set train.grad_clip" if buffer is None else "a sample with huge inputs "
                   "overflows a running statistic (e.g. BatchNorm's running_var)")
            )  # fmt: skip
        self.skipped += 1
        log.warning(
            "%s %s: step skipped on every rank (no optimizer step; %d in a row, %d in all; train.max_nonfinite=%d)",
            what, where, self.streak, self.skipped, self.limit,
        )  # fmt: skip
        return True


class Numerics:
    """The numerics checks of one worker: the guard (None with fp16, whose GradScaler skips overflowing steps
    itself), the watched buffers, the finite-state check of every save and the learning-rate check of every step.
    Every method that decides is the same on every rank (its collective, or host values every rank shares)."""

    def __init__(
        self, model: nn.Module, ctx: DistContext, sharded: bool, paths: RunDir, guard: NonFiniteGuard | None,
        optim: Built,
    ) -> None:  # fmt: skip
        self.model, self.ctx, self.sharded, self.paths, self.guard, self.optim = (
            model,
            ctx,
            sharded,
            paths,
            guard,
            optim,
        )
        self.buffer_watch = WatchedBuffers(model)

    def watch_buffers(self, step: int) -> None:
        """Start the buffer checks: the buffers finite now (after a resume or ``train.init_from``) are watched.
        Collective."""
        self.buffer_watch = WatchedBuffers(self.model)
        _, finite = self._finite_state()  # (non-finite weights now: the first save names them)
        self.buffer_watch.update(
            finite, f"the last checkpoint, {step_dir_name(step)}" if step else "the start of the run"
        )

    def check_finite_state(self, step: int) -> None:
        """No checkpoint with NaN/inf weights is ever committed (retention would then delete the good ones), nor with
        a buffer that was finite at the last save (or the start) and is not now: a diverged running statistic. A
        buffer that is NaN/inf by design (a -inf causal mask) was never finite, so it is saved as it is. Raises
        NonFiniteError on every rank together. Collective."""
        bad, finite = self._finite_state()
        if bad is None:
            self.buffer_watch.update(finite, f"the last checkpoint, {step_dir_name(step)}")
            return
        if bad in self.buffer_watch.names:
            raise NonFiniteError(
                f"the buffer '{bad}' is not finite at step {step} (it was finite at {self.buffer_watch.since}): "
                f"not saved; {last_good(self.paths)}. HINT: find the samples with data.record_indices=true (inputs "
                "large enough to overflow a running statistic, e.g. BatchNorm's running_var); train.nonfinite=skip "
                "skips the step that makes a buffer diverge"
            )
        raise NonFiniteError(
            f"the weights are not finite at step {step} ('{bad}' holds NaN/inf): not saved; "
            f"{last_good(self.paths)}. HINT: lower optim.lr, set train.grad_clip, keep train.nonfinite=skip"
        )

    def _finite_state(self) -> tuple[str | None, list[bool]]:
        """(the first floating-point parameter, or watched buffer, that holds NaN/inf, or None; per buffer of
        ``buffer_watch.all``, whether it is finite) — the same on every rank. Not sharded: rank 0's state is what a
        save writes, so rank 0 looks and broadcasts (one collective). Sharded: every rank looks at its shards and
        its own buffers, one all-reduce."""
        params = [(n, p) for n, p in self.model.named_parameters() if p.is_floating_point()]
        tensors = [p for _, p in params] + self.buffer_watch.tensors(self.buffer_watch.all)
        if self.sharded:
            flags = nonfinite_anywhere(tensors, self.ctx)
        else:
            mine = [b > 0 for b in nonfinite_mask(tensors).tolist()] if self.ctx.is_main and tensors else []
            flags = self.ctx.broadcast_object(mine)  # (only rank 0's is sent)
        param_flags, buffer_flags = flags[: len(params)], flags[len(params) :]
        watched = self.buffer_watch.names
        bad = next((n for (n, _), b in zip(params, param_flags, strict=True) if b), None)
        if bad is None:
            named = zip(self.buffer_watch.all, buffer_flags, strict=True)
            bad = next((n for (n, _, _), b in named if b and n in watched), None)
        return bad, [not b for b in buffer_flags]

    def alarmed(self, loss: torch.Tensor) -> torch.Tensor:
        """``loss``, times NaN when a watched buffer holds NaN/inf (times exactly 1.0 otherwise: the same gradients,
        bit for bit). Only with the guard on: without it, the save check is what refuses such a buffer."""
        alarm = self.buffer_watch.alarm() if self.guard is not None and self.guard.active else None
        return loss if alarm is None else loss * alarm.to(loss.dtype)

    def diverged_buffer(self, loss: torch.Tensor) -> str | None:
        """Why this step's grad norm is not finite, when it is a buffer: the first watched buffer that holds NaN/inf
        on some rank now (its forward made it so: it was finite before the step), provided no rank's loss was
        NaN/inf (then the gradients were too, and they are named as before). One all-reduce, on the rare non-finite
        path only (every rank is on it: the decision rests on the all-reduced norm)."""
        watched = self.buffer_watch.watched
        if not watched:  # the same on every rank
            return None
        flags = nonfinite_mask([loss, *self.buffer_watch.tensors(watched)]).to(self.ctx.device)
        counts = self.ctx.all_reduce_sum(flags).tolist()
        if counts[0]:
            return None
        return next((name for (name, _, _), c in zip(watched, counts[1:], strict=True) if c), None)

    def check_finite_lr(self, step: int) -> None:
        """A NaN/inf learning rate is the schedule's (or the optimizer's) problem, not the data's: named as such before
        step ``step`` (1-based) uses it (it would make every weight NaN). Host-side, no sync; the same on every rank
        (every rank steps the same schedule), so every rank raises NonFiniteError at the same step."""
        found = first_nonfinite_lr(self.optim.optimizer)
        if found is None:
            return
        group, lr = found
        if self.optim.task_scheduler:
            at = getattr(self.optim.scheduler, "last_epoch", step - 1)
            source = "the task's scheduler(optimizer, max_steps)"
            hint = f"check what the task's scheduler computes at its step {at} (a NaN factor, a division by zero)"
        elif self.optim.task_optimizer:
            source = "the task's optimizer(model) (the group's lr, times the built-in schedule)"
            hint = "give every parameter group of the task's optimizer a finite lr"
        else:
            source = "optim.lr and the built-in schedule"
            hint = "check optim.lr, optim.warmup_steps and optim.schedule"
        raise NonFiniteError(
            f"the learning rate is not finite at step {step}: param group {group} has lr {lr}, as set by "
            f"{source}; the step was not taken; {last_good(self.paths)}. HINT: {hint}"
        )
