"""Resumable distributed sampling over one *global* sample order.

The order of epoch ``e`` is a permutation of the dataset's indices, a function of ``(seed, e)`` alone; epochs are
concatenated into one endless stream. Optimizer step ``s`` consumes stream positions ``[s*G, (s+1)*G)`` (``G`` =
global batch) and rank ``r`` takes the ``r``-th contiguous slice of it. The only state is the global cursor
``s*G``, so any world size consumes the identical sequence of samples, from any step.

Two schemes make the permutation (``ORDER_SCHEMES``); a checkpoint records which one its run uses:

- ``feistel`` (every new run): a keyed permutation evaluated per position (workers.data.feistel): O(1) memory for
  any dataset size up to ``2**63``, a few tenths of a microsecond a sample, computed a block of steps ahead;
- ``randperm`` (runs started before it, whose checkpoints carry no scheme): ``torch.randperm(n)`` seeded by
  ``(seed, e)``, materialised per epoch (8 bytes a sample). Kept so that those runs resume bitwise.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any, overload

import torch

from workers.config import BatchPlan
from workers.contract import LEGACY_ORDER, ORDER_SCHEMES
from workers.data.feistel import KeyedPermutation

DEFAULT_ORDER = "feistel"  # what a new run uses; a checkpoint without a scheme was written with LEGACY_ORDER
_EPOCH_SEED_STRIDE = 1_000_003  # keeps (seed, epoch) pairs from colliding for small seeds
_BLOCK_POSITIONS = 8192  # a rank's order is computed this many of its positions ahead (the cost is per call)


class GlobalOrder:
    """The endless global stream of sample indices for a dataset of ``n`` samples, in scheme ``scheme``."""

    def __init__(self, n: int, seed: int, scheme: str = DEFAULT_ORDER) -> None:
        if n <= 0:
            raise ValueError("the task's dataset is empty")
        if scheme not in ORDER_SCHEMES:
            raise ValueError(f"unknown order scheme {scheme!r} (one of {', '.join(ORDER_SCHEMES)})")
        self.n, self.seed, self.scheme = n, seed, scheme
        self._maps: dict[int, Callable[[torch.Tensor], torch.Tensor]] = {}
        self._epoch, self._perm = -1, torch.empty(0, dtype=torch.long)

    def permutation(self, epoch: int) -> torch.Tensor:
        """The whole order of one epoch (materialised: for tests and small datasets)."""
        if self.scheme == LEGACY_ORDER:
            return self._randperm(epoch)
        return self._epoch_map(epoch)(torch.arange(self.n))

    def _randperm(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:
            # Modulo 2**64, torch's seed range: the same seed as ever below it (every seed up to ~1.8e13, so every
            # existing run keeps its order); any larger train.seed the config accepts now makes a stream too.
            gen = torch.Generator().manual_seed((self.seed * _EPOCH_SEED_STRIDE + epoch) % 2**64)
            self._epoch, self._perm = epoch, torch.randperm(self.n, generator=gen)
        return self._perm

    def _epoch_map(self, epoch: int) -> Callable[[torch.Tensor], torch.Tensor]:
        """Offsets within epoch ``epoch`` -> dataset indices."""
        if self.scheme == LEGACY_ORDER:
            perm = self._randperm(epoch)
            return lambda offsets: perm[offsets]
        if epoch not in self._maps:
            if len(self._maps) > 2:  # a block spans few epochs; keep the newest
                self._maps.pop(min(self._maps))
            self._maps[epoch] = KeyedPermutation(self.n, derive_seed("order", self.seed, epoch))
        return self._maps[epoch]

    def take(self, start: int, count: int) -> list[int]:
        """Stream positions ``[start, start+count)`` as dataset indices (may cross epoch boundaries)."""
        return self.take_tensor(start, count).tolist()

    def take_tensor(self, start: int, count: int) -> torch.Tensor:
        """:meth:`take` as a 1-D long tensor. Read-only: it may share a cached permutation's memory."""
        parts: list[torch.Tensor] = []
        while count > 0:
            epoch, offset = divmod(start, self.n)
            chunk = min(count, self.n - offset)
            if self.scheme == LEGACY_ORDER:
                parts.append(self._randperm(epoch)[offset : offset + chunk])
            else:
                parts.append(self._epoch_map(epoch)(torch.arange(chunk) + offset))
            start, count = start + chunk, count - chunk
        if len(parts) == 1:
            return parts[0]
        return torch.cat(parts) if parts else torch.empty(0, dtype=torch.long)

    def gather(self, positions: torch.Tensor) -> torch.Tensor:
        """The dataset indices at ``positions``, an ascending 1-D long tensor of stream positions (below 2**63)."""
        if len(positions) == 0:
            return positions.clone()
        first, last = int(positions[0]) // self.n, int(positions[-1]) // self.n
        if first == last:
            return self._epoch_map(first)(positions - first * self.n)
        epochs = positions // self.n
        out = torch.empty_like(positions)
        for epoch in range(first, last + 1):
            where = (epochs == epoch).nonzero().squeeze(1)
            if len(where):
                out[where] = self._epoch_map(epoch)(positions[where] - epoch * self.n)
        return out


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
    The indices of a block of steps are computed at once (one vectorised call, not one per step).
    """

    def __init__(
        self, n: int, seed: int, plan: BatchPlan, rank: int, start_step: int, scheme: str = DEFAULT_ORDER
    ) -> None:
        self.order, self.plan, self.rank, self.start_step = GlobalOrder(n, seed, scheme), plan, rank, start_step
        self.block_steps = max(1, _BLOCK_POSITIONS // plan.per_rank_batch)

    def positions_for_step(self, step: int) -> tuple[int, int]:
        """The stream positions ``[start, start+count)`` rank ``self.rank`` consumes in step ``step`` (0-based)."""
        return step * self.plan.global_batch_size + self.rank * self.plan.per_rank_batch, self.plan.per_rank_batch

    def block(self, step: int, steps: int) -> torch.Tensor:
        """This rank's dataset indices for steps ``[step, step + steps)``: shape ``(steps, per_rank_batch)``."""
        first, count = self.positions_for_step(step)
        starts = first + self.plan.global_batch_size * torch.arange(steps)
        positions = (starts[:, None] + torch.arange(count)[None, :]).reshape(-1)
        return self.order.gather(positions).reshape(steps, count)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        step, micro = self.start_step, self.plan.micro_batch
        while True:
            block = self.block(step, self.block_steps)
            for indices in block:
                start, count = self.positions_for_step(step)
                for i in range(0, count, micro):
                    yield MicroBatch(start + i, indices[i : i + micro])
                step += 1


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from any tuple of ints/strings (no overflow, no collisions between fields)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1
