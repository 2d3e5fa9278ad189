"""The loader of one rank's samples: the dataset wrapped so each sample is fetched with its global position (and
seeded by it), collated, and moved to the device.
"""

from __future__ import annotations

import functools
import multiprocessing
import os
from collections.abc import Callable, Iterable, Iterator
from typing import Any, NamedTuple

import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset
from torch.utils.data import default_collate as _default_collate

from workers.data.order import MicroBatch, StepBatchSampler
from workers.data.seeding import SampleSeeder, sample_seed
from workers.stop import die_with_parent


class IndexedDataset(Dataset):
    """Wraps the task's dataset: fetches by (stream position, index), returns ``(index, sample)``.

    Each sample sees torch's, Python's and NumPy's RNGs seeded from (seed, stream position), so random
    augmentation in ``__getitem__`` depends only on which sample of the global stream is being made — not on
    the DataLoader worker, the number of workers, the world size or where the run was resumed
    (:mod:`workers.data.seeding`: the generators a dataset never draws from are left alone, at no difference).

    Fetched a batch at a time (``__getitems__``, the DataLoader's batched path) where nothing needs seeding: a
    ``TensorDataset`` (pure indexing, never seeded) becomes one gather per tensor, already collated when the
    collate is the default one (``collated``) — where a hand-written loop makes and stacks a sample at a time; a
    dataset with its own ``__getitems__`` (Hugging Face ``datasets``, torch's ``Subset``) gets one call a batch.
    The batch is the same, bit for bit.
    """

    def __init__(self, dataset: Any, seed: int, seed_samples: bool = True, collated: bool = False) -> None:
        self.dataset, self.seed = dataset, seed
        self.tensors = type(dataset) is TensorDataset  # exactly torch's: a subclass may override __getitem__
        # (with a task's own collate_fn, which may draw, the seeding stays: it leaves the RNGs seeded for it)
        self.seed_samples = seed_samples and not (self.tensors and collated)
        self.collated = collated
        self._seeder: SampleSeeder | None = None
        self._seeder_pid = 0  # the seeder watches one process's generators: a loader worker makes its own

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_seeder": None, "_seeder_pid": 0}  # (its views of memory do not pickle)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: tuple[int, int]) -> tuple[int, Any]:
        position, index = item
        if not self.seed_samples:  # the task declared that its samples draw no randomness
            return index, self.dataset[index]
        if self._seeder is None or self._seeder_pid != os.getpid():
            self._seeder, self._seeder_pid = SampleSeeder(), os.getpid()
        return index, self._seeder.make(sample_seed(self.seed, position), lambda: self.dataset[index])

    def __getitems__(self, items: MicroBatch | list[tuple[int, int]]) -> list[tuple[int, Any]] | Collated:
        """A micro-batch at once (see the class docstring); sample by sample wherever seeding is on."""
        if self.seed_samples:
            items = list(items)
            samples = [self[item] for item in items]
            if samples and self._seeder is not None:  # the collate that follows finds every generator seeded
                self._seeder.settle(sample_seed(self.seed, items[-1][0]))
            return samples
        if self.tensors and self.collated:  # (a MicroBatch's indices are a tensor already: no Python per sample)
            at = items.indices if isinstance(items, MicroBatch) else torch.tensor([i for _, i in items])
            return Collated(at, [t[at] for t in self.dataset.tensors])  # what default_collate makes of them
        indices = items.indices.tolist() if isinstance(items, MicroBatch) else [index for _, index in items]
        getitems = getattr(self.dataset, "__getitems__", None)
        if getitems is None:
            return [(index, self.dataset[index]) for index in indices]
        return list(zip(indices, getitems(indices), strict=True))


class Collated(NamedTuple):
    """A micro-batch that needs no collating: ``(indices, batch)`` as :class:`IndexedCollate` would make it."""

    indices: torch.Tensor
    batch: Any


class IndexedCollate:
    """Collates ``(index, sample)`` pairs into ``(indices tensor, collate_fn(samples))``. Picklable."""

    def __init__(self, collate_fn: Callable[[list[Any]], Any] | None) -> None:
        self.collate_fn = collate_fn or _default_collate

    def __call__(self, items: list[tuple[int, Any]] | Collated) -> tuple[torch.Tensor, Any]:
        if isinstance(items, Collated):
            return items.indices, items.batch
        indices = torch.tensor([i for i, _ in items], dtype=torch.long)
        return indices, self.collate_fn([s for _, s in items])


def make_loader(
    dataset: Any,
    sampler: StepBatchSampler,
    num_workers: int,
    collate_fn: Callable[[list[Any]], Any] | None,
    pin_memory: bool,
    seed_samples: bool = True,
) -> Iterable[tuple[torch.Tensor, Any]]:
    """This rank's batches of the task's dataset, driven by ``sampler``: ``(indices, batch)`` pairs.

    ``seed_samples``: seed the RNGs before each sample (for datasets with random augmentation). With
    ``num_workers`` 0 the batches are made in this process, as a DataLoader's single-process iterator makes them
    (the same calls, the same batches) but without its machinery, which cost ~4 % of a small model's step
    (benchmarks/notes/floor.md); with workers, a DataLoader.
    """
    indexed = IndexedDataset(dataset, sampler.order.seed, seed_samples, collated=collate_fn is None)
    if not num_workers:
        return DirectBatches(indexed, sampler, IndexedCollate(collate_fn), pin_memory)
    return DataLoader(
        indexed,
        batch_sampler=sampler,
        num_workers=num_workers,
        worker_init_fn=functools.partial(_die_with_rank, os.getpid()),
        # Loader workers are the rank's own children (what `_die_with_rank` needs), whichever way the rank itself
        # was started: a rank forked by our launcher's fork server would otherwise inherit "forkserver" and have
        # its loader workers forked by the server instead. spawn, as when the ranks were spawned themselves.
        multiprocessing_context=_loader_start(),
        collate_fn=IndexedCollate(collate_fn),
        pin_memory=pin_memory,
        persistent_workers=False,
        # Loader workers draw their base seed from this generator instead of the global RNG, so starting a
        # loader does not shift the training RNG (sample randomness is seeded per sample anyway).
        generator=torch.Generator().manual_seed(sampler.order.seed),
    )


class DirectBatches:
    """The batches of ``num_workers: 0``: each micro-batch fetched (``__getitems__``), collated and, for a GPU,
    pinned, in this process — what torch's single-process DataLoader iterator does, step for step. Iterable once
    or more: each iteration starts at the sampler's start step."""

    def __init__(self, dataset: IndexedDataset, sampler: StepBatchSampler, collate: IndexedCollate, pin: bool) -> None:
        self.dataset, self.sampler, self.collate, self.pin = dataset, sampler, collate, pin

    def __iter__(self) -> Iterator[tuple[torch.Tensor, Any]]:
        for items in self.sampler:
            batch = self.collate(self.dataset.__getitems__(items))
            yield _pinned(batch) if self.pin else batch


def _pinned(batch: Any) -> Any:
    """``batch`` in pinned memory by torch's own function, the one its DataLoader calls: tensors in any nesting
    (mappings of any type, namedtuples), and a custom batch type through its own ``pin_memory()``."""
    from torch.utils.data._utils.pin_memory import pin_memory  # noqa: PLC0415 - torch's (private) DataLoader helper

    return pin_memory(batch)


def _loader_start() -> str | None:
    """How loader workers start: as they did before our launcher forked its ranks — spawned by a rank our launcher
    started (it inherits "forkserver"), the platform default otherwise (under srun/torchrun: fork, which keeps the
    rank's signal handlers, so SLURM's notice to the job's processes does not kill them)."""
    return "spawn" if multiprocessing.get_start_method(allow_none=True) == "forkserver" else None


def _die_with_rank(rank_pid: int, _worker_id: int) -> None:
    """In each DataLoader worker: the kernel kills it when its rank dies, even by SIGKILL. (torch's own watchdog
    only looks between samples, so a worker busy in ``__getitem__`` outlived a killed rank for minutes.)"""
    if not die_with_parent(rank_pid):  # the rank died before the request took effect
        os._exit(1)


def to_device(batch: Any, device: torch.device) -> Any:
    """Move every tensor of a collated batch (tensors, tuples, namedtuples, lists, dicts) to ``device``."""
    return _map_tensors(batch, lambda t: t.to(device, non_blocking=True))


def _map_tensors(batch: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """``batch`` with ``fn`` applied to every tensor in it (tensors, tuples, namedtuples, lists, dicts)."""
    if isinstance(batch, torch.Tensor):
        return fn(batch)
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # a namedtuple: rebuild it field by field
        return type(batch)(*(_map_tensors(b, fn) for b in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(_map_tensors(b, fn) for b in batch)
    if isinstance(batch, dict):
        return {k: _map_tensors(v, fn) for k, v in batch.items()}
    return batch
