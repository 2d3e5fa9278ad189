"""Exact distributed evaluation: every sample of the task's ``eval_dataset`` exactly once, on any world size.

Rank ``r`` of ``W`` takes the contiguous slice ``[r*N//W, (r+1)*N//W)`` of the ``N`` samples — no padding, no
drop, uneven shares allowed — in batches of ``eval.batch_size``. The task's ``evaluate(model, batch)`` returns
*per-sample* values (shape ``[B]``) for each metric name; without it the metric is ``loss``, the task's loss weighted
by each batch's size. Each rank sums in float64; one all-reduce of ``[sums..., count]`` per eval (no collective
depends on how many batches a rank has), then ``sum / count``: the mean over the whole set, never a mean of means.

A stop request (``interrupt``) during an eval abandons it: each rank stops at its next batch, the one all-reduce
still happens (with each rank's stop code in it), and every rank returns the same abandoned result — nothing to
log; the trainer saves the step and runs that eval first on resume.

The model runs unwrapped, in ``eval()`` mode, under ``torch.no_grad()`` and the configured autocast, then goes back
to training mode. Evaluation perturbs nothing: every RNG (torch CPU and CUDA, Python, NumPy) is restored afterwards,
and an eval sample with a random transform is seeded by its index (like training samples, by their position).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

from workers.data import IndexedCollate, IndexedDataset, derive_seed, to_device
from workers.dist import DistContext
from workers.errors import ConfigError, UsageError
from workers.stop import PREEMPT, STOP
from workers.tasks import Task

try:
    import numpy as _np
except ImportError:  # numpy is optional for the orchestrator itself
    _np = None


_STOP_CODES = (STOP, PREEMPT)  # the stop codes an eval can be abandoned for (workers.stop)
# The eval row's own columns (eval/samples, eval/time_s): a task metric of either name would overwrite one, so the
# probe refuses it.
OWN_NAMES = ("samples", "time_s")


@dataclass(frozen=True)
class EvalResult:
    """One evaluation: the mean of each metric over the whole set, the number of samples, the wall time."""

    metrics: dict[str, float]
    samples: int
    time_s: float
    stop_code: int = 0  # not 0: a stop request came during the eval (on some rank) and it was abandoned

    @property
    def abandoned(self) -> bool:
        return self.stop_code != 0

    def row(self) -> dict[str, float]:
        """The metrics row (``eval/<name>``, ``eval/samples``, ``eval/time_s``: no metric is named like the last two,
        see :data:`OWN_NAMES`)."""
        return {
            **{f"eval/{k}": v for k, v in self.metrics.items()},
            "eval/samples": self.samples,
            "eval/time_s": round(self.time_s, 6),
        }


class Evaluator:
    """Evaluates ``model`` on ``task.eval_dataset``. Built on every rank; :meth:`run` must be called on all ranks."""

    def __init__(
        self,
        task: Task,
        model: nn.Module,
        ctx: DistContext,
        batch_size: int,
        seed: int,
        autocast: Callable[[], AbstractContextManager[Any]],
        lockstep: bool = False,
    ) -> None:
        """``lockstep``: every forward is a collective (a sharded model all-gathers its parameters), so every rank
        runs the same number of batches — a rank with fewer repeats one and discards it — and a stop request is agreed
        before each batch (one small all-reduce), instead of each rank stopping on its own."""
        self.task, self.model, self.ctx, self.batch_size, self.autocast = task, model, ctx, batch_size, autocast
        self.lockstep = lockstep and ctx.world_size > 1
        self.dataset = task.eval_dataset
        self.n = len(self.dataset)
        if self.n <= 0:
            raise ConfigError("the task's eval_dataset is empty. HINT: give it samples, or set eval.every=0")
        self.seed_samples = task.random_samples
        self.samples = IndexedDataset(self.dataset, derive_seed(seed, "eval"), self.seed_samples)
        self.collate = IndexedCollate(task.collate_fn)
        self.names: list[str] = []

    def probe(self, metric: str | None) -> list[str]:
        """Evaluate one batch (the first of the set, on every rank alike) to learn the metric names, before the first
        training step. Collective: must be called on all ranks. Perturbs nothing.

        ConfigError, the same on every rank, when the names differ between ranks (the eval's one all-reduce sums
        them name by name: never position by position), when one is the row's own (``samples``, ``time_s``), or
        when ``metric`` (None: any) is not one of them. A rank whose probe fails fails every rank: the others with
        its usage error's line, or with a RuntimeError naming it."""
        first = list(range(min(self.batch_size, self.n)))
        report: tuple[str, Any]
        failure: Exception | None = None
        try:
            with _preserved_state(self.model, self.ctx.device):
                report = ("ok", sorted(self._evaluate(self._batch(first))[0]))
        except Exception as exc:  # every rank still joins the gather below, then all fail together
            failure, report = exc, ("usage" if isinstance(exc, UsageError) else "failed", str(exc))
        reports: list[Any] = self.ctx.all_gather_object(report)
        if failure is not None:
            raise failure
        self.names = _agreed_names(reports)
        _check_names(self.names, metric)
        return self.names

    def run(
        self, interrupt: Callable[[], int] | None = None, progress: Callable[[int], None] | None = None
    ) -> EvalResult:
        """Evaluate the whole set across all ranks. Collective: must be called on all ranks, at the same step.

        ``interrupt()`` (this rank's stop code, 0 for none) is asked before each batch: not 0 abandons the eval on
        every rank (see the module docstring). ``progress(batches_done)`` is called after each batch (liveness)."""
        t0 = time.perf_counter()
        k = len(self.names)
        # [metric sums..., count, failed, one vote per stop code]: SUM-reduced, so a code is "any rank asked".
        sums = torch.zeros(k + 2 + len(_STOP_CODES), dtype=torch.float64, device=self.ctx.device)
        failure: BaseException | None = None
        try:
            with _preserved_state(self.model, self.ctx.device):
                local, count, code = self._local_sums(interrupt, progress)
            sums[:k] = local
            sums[k] = count
            if code:
                sums[k + 2 + _STOP_CODES.index(code)] = 1.0
        except Exception as exc:  # every rank still joins the one all-reduce, then all fail together
            failure, sums[k + 1] = exc, 1.0
        self.ctx.all_reduce_sum(sums)
        total = sums.tolist()
        if total[k + 1]:
            raise failure or RuntimeError("evaluation failed on another rank (its log says why)")
        votes = [c for c, v in zip(_STOP_CODES, total[k + 2 :], strict=True) if v]
        if votes:  # the same on every rank: the strongest code any rank asked for
            return EvalResult({}, 0, time.perf_counter() - t0, stop_code=max(votes))
        count = int(total[k])
        return EvalResult({n: total[i] / count for i, n in enumerate(self.names)}, count, time.perf_counter() - t0)

    def _local_sums(
        self, interrupt: Callable[[], int] | None, progress: Callable[[int], None] | None
    ) -> tuple[torch.Tensor, int, int]:
        """This rank's share: the float64 ``[k]`` metric sums, the sample count, and the stop code that cut it
        short (0: none). On a GPU the per-batch sums stay tensors, added up once at the end (no host sync per
        batch); on the CPU they are plain float64 numbers (cheaper than tensor ops, same precision)."""
        host = self.ctx.device.type == "cpu"
        parts: list[torch.Tensor] = []
        totals = [0.0] * len(self.names)
        count, code, names = 0, 0, set(self.names)
        failure: Exception | None = None  # lockstep: this rank's failure, held until every rank has voted on it
        for done, (batch, counted) in enumerate(self._batches()):
            code = interrupt() if interrupt is not None else 0
            if self.lockstep:  # agreed: the strongest code any rank has (a MAX via SUM of one-hot votes)
                code, failed = self._agreed(code, failure is not None)
                if failed:  # a rank failed: all leave the loop at this same batch, then fail together
                    raise failure or RuntimeError("evaluation failed on another rank (its log says why)")
            if code:
                break
            try:
                size = self._batch_sums(batch, counted, names, host, totals, parts)
            except Exception as exc:
                if not self.lockstep:
                    raise
                failure = exc  # voted on at the next batch, so no rank is left alone in a collective
                continue
            if counted:
                count += size
                if progress is not None:
                    progress(done + 1)
        if failure is not None:
            raise failure
        local = torch.stack(parts).sum(0) if parts else torch.tensor(totals, dtype=torch.float64)
        return local, count, code

    def _batch_sums(self, batch: Any, counted: bool, names: set[str], host: bool, totals: list[float],
                    parts: list[torch.Tensor]) -> int:  # fmt: skip
        """Evaluate one batch and add its metric sums; return its size (an uncounted lockstep pad: evaluated for
        the collectives, added nowhere)."""
        values, size = self._evaluate(batch)
        if not counted:
            return size
        if values.keys() != names:
            raise ConfigError(
                f"the task's evaluate() returned {sorted(values)} for one batch and {self.names} for another. "
                "HINT: return the same metric names for every batch"
            )
        if host:
            for i, name in enumerate(self.names):
                totals[i] += float(values[name])
        else:
            parts.append(torch.stack([values[name] for name in self.names]))
        return size

    def _batches(self) -> Iterator[tuple[Any, bool]]:
        """This rank's batches, each with whether it counts; lockstep pads with repeats of the first batch up to the
        most any rank has."""
        done = 0
        first = None
        for batch in self._my_batches():
            first = batch if first is None else first
            done += 1
            yield batch, True
        if self.lockstep:
            most = max(-(-self._slice_len(r) // self.batch_size) for r in range(self.ctx.world_size))
            if done < most and first is None:  # this rank's slice is empty: pad with the set's first batch
                first = self._batch(list(range(min(self.batch_size, self.n))))
            for _ in range(most - done):
                yield first, False

    def _agreed(self, code: int, failed: bool) -> tuple[int, bool]:
        """(the strongest stop code any rank has, whether any rank failed). Collective (lockstep)."""
        votes = torch.zeros(len(_STOP_CODES) + 1, dtype=torch.float64, device=self.ctx.device)
        if code:
            votes[_STOP_CODES.index(code)] = 1.0
        votes[-1] = float(failed)
        self.ctx.all_reduce_sum(votes)
        total = votes.tolist()
        agreed = [c for c, v in zip(_STOP_CODES, total[:-1], strict=True) if v]
        return (max(agreed) if agreed else 0), bool(total[-1])

    def _slice_len(self, rank: int) -> int:
        return (rank + 1) * self.n // self.ctx.world_size - rank * self.n // self.ctx.world_size

    def _my_batches(self) -> Iterator[Any]:
        start, end = self.ctx.rank * self.n // self.ctx.world_size, (self.ctx.rank + 1) * self.n // self.ctx.world_size
        if not self.seed_samples:  # nothing to seed: the plain loader a user would write over the slice (faster)
            plain = DataLoader(Subset(self.dataset, range(start, end)), batch_size=self.batch_size,
                               collate_fn=self.task.collate_fn)  # fmt: skip
            yield from plain
            return
        chunks = [list(range(i, min(i + self.batch_size, end))) for i in range(start, end, self.batch_size)]
        loader = DataLoader(self.samples, batch_sampler=[[(i, i) for i in c] for c in chunks], collate_fn=self.collate)
        for _, batch in loader:
            yield batch

    def _batch(self, indices: list[int]) -> Any:
        return self.collate([self.samples[(i, i)] for i in indices])[1]

    def _evaluate(self, batch: Any) -> tuple[dict[str, Any], int]:
        """Per-metric float64 sums over one batch (0-dim tensors, or floats for the default loss on the CPU), and
        its size."""
        batch = to_device(batch, self.ctx.device)
        size = _batch_size(batch)
        with torch.no_grad(), self.autocast():
            if self.task.evaluate is None:  # the batch's mean loss, weighted by its size
                loss = self.task.loss(self.model, batch).detach()
                on_host = self.ctx.device.type == "cpu"  # a float on the CPU; a tensor on a GPU (no host sync)
                return {"loss": float(loss) * size if on_host else loss.double().reshape(()) * size}, size
            out = self.task.evaluate(self.model, batch)
        if not isinstance(out, Mapping) or not out:
            raise ConfigError("the task's evaluate() must return a mapping of metric names to per-sample tensors")
        sums = {}
        for name, value in out.items():
            if not isinstance(value, torch.Tensor) or value.ndim != 1 or len(value) != size:
                shape = list(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                raise ConfigError(
                    f"the task's evaluate() returned {shape} for metric {name!r}: expected per-sample values of "
                    f"shape [{size}]. HINT: return one value per sample, not a mean"
                )
            sums[str(name)] = value.detach().double().sum()
        return sums, size


def _agreed_names(reports: list[tuple[str, Any]]) -> list[str]:
    """The metric names every rank's probe found, from each rank's ``(kind, names or error text)``. A rank that
    failed fails this one too (a usage error with its very line); names that differ are a ConfigError naming each
    rank's."""
    for rank, (kind, value) in enumerate(reports):
        if kind == "usage":
            raise ConfigError(value)
        if kind == "failed":
            raise RuntimeError(f"evaluation failed on rank {rank} (its log says why)")
    by_names: dict[tuple[str, ...], list[int]] = {}
    for rank, (_, names) in enumerate(reports):
        by_names.setdefault(tuple(names), []).append(rank)
    if len(by_names) > 1:
        shown = "; ".join(f"{_ranks(ranks)}: {', '.join(names)}" for names, ranks in by_names.items())
        raise ConfigError(
            f"the task's evaluate() returns other metric names on other ranks ({shown}). HINT: return the same "
            "metric names on every rank (they are summed across ranks name by name)"
        )
    return list(reports[0][1])


def _check_names(names: list[str], metric: str | None) -> None:
    """ConfigError for a metric named like a column of the row's own, or a chosen ``metric`` not among ``names``."""
    clash = [name for name in names if name in OWN_NAMES]
    if clash:
        raise ConfigError(
            f"the task's evaluate() returns a metric named {clash[0]!r}: eval/{clash[0]} is the orchestrator's own "
            "column (eval/samples: the samples evaluated, eval/time_s: the eval's seconds). HINT: rename that metric"
        )
    if metric is not None and metric not in names:
        raise ConfigError(
            f"config key 'eval.metric' = {metric!r}: the task's evaluate() does not produce it. "
            f"HINT: it produces {', '.join(names)}"
        )


def _ranks(ranks: list[int], most: int = 4) -> str:
    """``rank 1`` / ``ranks 0, 2`` / ``ranks 0, 2, 4, 6, ... (9 ranks)``."""
    shown = ", ".join(map(str, ranks[:most])) + (f", ... ({len(ranks)} ranks)" if len(ranks) > most else "")
    return f"rank {shown}" if len(ranks) == 1 else f"ranks {shown}"


class _preserved_state:
    """Eval mode inside; afterwards the model's mode and every RNG exactly as before (evaluation draws nothing)."""

    def __init__(self, model: nn.Module, device: torch.device) -> None:
        self.model, self.device = model, device

    def __enter__(self) -> None:
        self.training = self.model.training
        self.rng = (torch.random.get_rng_state(), random.getstate(), _np.random.get_state() if _np else None)
        self.cuda_rng = torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None
        self.model.eval()

    def __exit__(self, *exc: object) -> None:
        self.model.train(self.training)
        torch.random.set_rng_state(self.rng[0])
        random.setstate(self.rng[1])
        if _np is not None:
            _np.random.set_state(self.rng[2])
        if self.cuda_rng is not None:
            torch.cuda.set_rng_state(self.cuda_rng, self.device)


def _batch_size(batch: Any) -> int:
    """The number of samples in a collated batch: the first dimension of its first tensor."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0])
    if isinstance(batch, Mapping):
        return _batch_size(next(iter(batch.values())))
    if isinstance(batch, (list, tuple)):
        return _batch_size(batch[0])
    raise ConfigError(f"cannot tell the size of an eval batch of type {type(batch).__name__}")
