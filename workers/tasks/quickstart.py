"""Quickstart task: a small deterministic synthetic regression problem. No downloads; loss falls in seconds.

A fixed random "teacher" MLP maps 16-d Gaussian inputs to targets; the student MLP learns it.
The data depend only on ``data_seed``; the student's initial weights on ``train.seed``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import TensorDataset


def _mlp(d_in: int, hidden: int, d_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(d_in, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(), nn.Linear(hidden, d_out)
    )


def make_model(d_in: int = 16, hidden: int = 64, d_out: int = 4) -> nn.Module:
    """The student model (what ``model.pt`` of this task loads into)."""
    return _mlp(d_in, hidden, d_out)


def make_dataset(
    n: int = 4096, d_in: int = 16, d_out: int = 4, data_seed: int = 1234, noise: float = 0.01, eval_n: int = 0
):
    """The training set; with ``eval_n``, also ``(train, held_out)``: more samples of the same teacher, drawn after
    the training set (which they leave unchanged)."""
    gen = torch.Generator().manual_seed(data_seed)
    teacher = _mlp(d_in, 32, d_out)
    with torch.no_grad():
        for p in teacher.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
        sets = []
        for count in (n, eval_n) if eval_n else (n,):
            x = torch.randn(count, d_in, generator=gen)
            sets.append(TensorDataset(x, teacher(x) + noise * torch.randn(count, d_out, generator=gen)))
    return (sets[0], sets[1]) if eval_n else sets[0]


@dataclass
class QuickstartTask:
    model: nn.Module
    dataset: TensorDataset
    eval_dataset: TensorDataset | None = None  # held-out samples of the same teacher (evaluation, eval.every)
    random_samples = False  # __getitem__ is deterministic: no per-sample RNG seeding needed

    def loss(self, model: nn.Module, batch: list[torch.Tensor]) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(model(x), y)


def build(
    n: int = 4096,
    d_in: int = 16,
    hidden: int = 64,
    d_out: int = 4,
    data_seed: int = 1234,
    noise: float = 0.01,
    eval_n: int = 512,
) -> QuickstartTask:
    """Factory named by ``task.factory: workers.tasks.quickstart:build``. ``eval_n`` held-out samples (drawn after
    the training set, which they leave unchanged) form the eval set; 0: none."""
    if not eval_n:
        return QuickstartTask(make_model(d_in, hidden, d_out), make_dataset(n, d_in, d_out, data_seed, noise))
    train, held_out = make_dataset(n, d_in, d_out, data_seed, noise, eval_n)
    return QuickstartTask(make_model(d_in, hidden, d_out), train, held_out)
