"""Resumable distributed sampling over one *global* sample order.

The order of epoch ``e`` is ``randperm(len(dataset))`` seeded by ``(seed, e)``; epochs are concatenated into one
endless stream. Optimizer step ``s`` consumes stream positions ``[s*G, (s+1)*G)`` (``G`` = global batch) and
rank ``r`` takes the ``r``-th contiguous slice of it. The only state is the global cursor ``s*G``, so any world
size consumes the identical sequence of samples, from any step.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from typing import Any, overload

import torch

from workers.config import BatchPlan

_EPOCH_SEED_STRIDE = 1_000_003  # keeps (seed, epoch) pairs from colliding for small seeds


class GlobalOrder:
    """The endless global stream of sample indices for a dataset of ``n`` samples."""

    def __init__(self, n: int, seed: int) -> None:
        if n <= 0:
            raise ValueError("the task's dataset is empty")
        self.n, self.seed = n, seed
        self._epoch, self._perm = -1, torch.empty(0, dtype=torch.long)

    def permutation(self, epoch: int) -> torch.Tensor:
        """The order of one epoch: a function of (seed, epoch) only. Cached for the current epoch."""
        if epoch != self._epoch:
            # Modulo 2**64, torch's seed range: the same seed as ever below it (every seed up to ~1.8e13, so every
            # existing run keeps its order); any larger train.seed the config accepts now makes a stream too.
            gen = torch.Generator().manual_seed((self.seed * _EPOCH_SEED_STRIDE + epoch) % 2**64)
            self._epoch, self._perm = epoch, torch.randperm(self.n, generator=gen)
        return self._perm

    def take(self, start: int, count: int) -> list[int]:
        """Stream positions ``[start, start+count)`` as dataset indices (may cross epoch boundaries)."""
        return self.take_tensor(start, count).tolist()

    def take_tensor(self, start: int, count: int) -> torch.Tensor:
        """:meth:`take` as a 1-D long tensor: within one epoch a view of its permutation (no copy, no Python list).
        Read-only: it may share the cached permutation's memory."""
        parts: list[torch.Tensor] = []
        while count > 0:
            epoch, offset = divmod(start, self.n)
            chunk = min(count, self.n - offset)
            parts.append(self.permutation(epoch)[offset : offset + chunk])
            start, count = start + chunk, count - chunk
        if len(parts) == 1:
            return parts[0]
        return torch.cat(parts) if parts else torch.empty(0, dtype=torch.long)


class MicroBatch(Sequence[tuple[int, int]]):
    """One micro-batch of a rank: the stream positions ``[start, start + len)`` and their dataset indices (a long
    tensor). A sequence of ``(stream position, dataset index)`` pairs, as the sampler's batches always were; the
    loader reads ``indices`` whole (one gather for a TensorDataset, no per-sample Python). Pickles as plain ints
    (a DataLoader worker gets it through a queue: the tensor may be a view of the whole epoch's permutation)."""

    __slots__ = ("indices", "start")

    def __init__(self, start: int, indices: torch.Tensor | list[int]) -> None:
        self.start = start
        self.indices = indices if isinstance(indices, torch.Tensor) else torch.tensor(indices, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.indices)

    @overload
    def __getitem__(self, i: int) -> tuple[int, int]: ...
    @overload
    def __getitem__(self, i: slice) -> list[tuple[int, int]]: ...
    def __getitem__(self, i: Any) -> Any:
        return self.pairs()[i]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return iter(self.pairs())

    def pairs(self) -> list[tuple[int, int]]:
        """``[(stream position, dataset index), ...]``."""
        return list(enumerate(self.indices.tolist(), self.start))

    def __reduce__(self) -> tuple[Any, ...]:
        return MicroBatch, (self.start, self.indices.tolist())

    def __repr__(self) -> str:
        return f"MicroBatch(start={self.start}, indices={self.indices.tolist()})"


class StepBatchSampler:
    """Yields this rank's micro-batches, step after step, from ``start_step`` on: :class:`MicroBatch` es (sequences
    of ``(stream position, dataset index)``). Endless: the trainer stops taking batches after its last step.
    """

    def __init__(self, n: int, seed: int, plan: BatchPlan, rank: int, start_step: int) -> None:
        self.order, self.plan, self.rank, self.start_step = GlobalOrder(n, seed), plan, rank, start_step

    def positions_for_step(self, step: int) -> tuple[int, int]:
        """The stream positions ``[start, start+count)`` rank ``self.rank`` consumes in step ``step`` (0-based)."""
        return step * self.plan.global_batch_size + self.rank * self.plan.per_rank_batch, self.plan.per_rank_batch

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        step, micro = self.start_step, self.plan.micro_batch
        while True:
            start, count = self.positions_for_step(step)
            indices = self.order.take_tensor(start, count)
            for i in range(0, count, micro):
                yield MicroBatch(start + i, indices[i : i + micro])
            step += 1


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from any tuple of ints/strings (no overflow, no collisions between fields)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1
