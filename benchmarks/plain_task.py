"""A user's task that declares nothing: the seed document's ``nn.Linear(10, 2)`` on a TensorDataset, with no
``random_samples`` attribute — so it takes every default, per-sample RNG seeding included. The loop benchmark's
"default path" rows train it with ours and with the hand-written loop (``--task plain``).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import TensorDataset


class PlainTask:
    def __init__(self, n: int) -> None:
        gen = torch.Generator().manual_seed(1234)
        x = torch.randn(n, 10, generator=gen)
        self.model = nn.Linear(10, 2)
        self.dataset = TensorDataset(x, x[:, :2] * 0.5 - x[:, 2:4] + 0.01 * torch.randn(n, 2, generator=gen))

    def loss(self, model: nn.Module, batch: list[torch.Tensor]) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(model(x), y)


def build(n: int = 4096) -> PlainTask:
    return PlainTask(n)
