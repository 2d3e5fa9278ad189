"""Task factories of tests/test_numerics_buffers.py (importable by workers: the tests put this folder on PYTHONPATH).

Each wraps ``orch_test_tasks.quick`` (its arguments pass through) and adds one numerical hazard that the loss and
the gradients do not show: a sample that overflows BatchNorm's running variance, a buffer that is -inf by design,
a schedule whose learning rate turns NaN/inf.
"""

from __future__ import annotations

import math

import torch
from orch_test_tasks import quick
from torch import nn


class _Huge:
    """Sample ``index`` has its inputs times ``scale``: finite, but their variance overflows float32 (a unit error
    in one record). Every other sample is unchanged."""

    def __init__(self, dataset, index: int, scale: float) -> None:
        self.dataset, self.index, self.scale = dataset, index, scale

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index):
        x, y = self.dataset[index]
        return (x * self.scale, y) if index == self.index else (x, y)


def huge_sample(huge_index: int, scale: float = 1e20, **kwargs):
    """``quick`` with a BatchNorm after the first projection (``batchnorm=true``) and sample ``huge_index`` scaled
    by ``scale``: the forward that sees it turns ``1.running_var`` to inf while its loss and gradients stay finite
    (the batch is normalised by its own, inf, variance: those outputs are 0)."""
    task = quick(batchnorm=True, **kwargs)
    task.dataset = task.inner.dataset = _Huge(task.dataset, huge_index, scale)
    return task


class _CausallyMixed(nn.Module):
    """The MLP, then each output the mean of itself and the outputs before it: softmax over a causal mask buffer of
    -inf above the diagonal (as attention registers it). The mask is persistent: it is in every checkpoint."""

    def __init__(self, inner: nn.Module, width: int) -> None:
        super().__init__()
        self.inner = inner
        self.register_buffer("causal_mask", nn.Transformer.generate_square_subsequent_mask(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x) @ torch.softmax(self.causal_mask, dim=-1).T


def causal_mask(**kwargs):
    """``quick`` (with BatchNorm: a finite buffer next to the -inf one) whose model holds a -inf causal mask."""
    task = quick(batchnorm=True, **kwargs)
    width = task.model[-1].out_features
    task.model = task.inner.model = _CausallyMixed(task.model, width)
    return task


def _factor(kind: str, at: int):
    """The lr multiplier of scheduler step ``s``: 1 before ``at``; at ``at``, NaN (``nan``) or 1/0 computed in
    floating point (``zero_division``: 1/(at - s) from the start, which is inf at ``at``)."""
    if kind == "nan":
        return lambda s: math.nan if s == at else 1.0
    return lambda s: float(torch.tensor(1.0) / (at - s))


def bad_lr(lr_kind: str = "nan", lr_at: int = 5, **kwargs):
    """``quick`` with its own ``scheduler``: a LambdaLR whose lr is NaN/inf from scheduler step ``lr_at`` (0-based:
    the optimizer step ``lr_at + 1`` would use it). The loss and the gradients stay finite until that lr is used."""
    task = quick(**kwargs)
    task.scheduler = lambda optimizer, max_steps: torch.optim.lr_scheduler.LambdaLR(optimizer, _factor(lr_kind, lr_at))
    return task
