"""How a save gathers and writes the state: the strategy of a run whose rank 0 holds the whole state
(:class:`FullWrites`: ddp, one process); the sharded one is workers.checkpoint.sharded. Both hand rank 0's part to
the :class:`~workers.checkpoint.commit.Committer`, and keep at most one save in flight."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch
from torch import nn

from workers.checkpoint.commit import Committer, Payload
from workers.checkpoint.files import snapshot, write_error
from workers.checkpoint.states import OptimizerState, SavePlan
from workers.contract import TrainState, disk_trouble
from workers.dist import DistContext


class Writes:
    """What both strategies share: the state they save, the committer, the background thread (``async_save``)."""

    def __init__(
        self, ctx: DistContext, committer: Committer, model: nn.Module, optim: OptimizerState, async_save: bool
    ) -> None:
        self.ctx, self.committer, self.model, self.optim = ctx, committer, model, optim
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ckpt") if async_save else None
        self._in_flight: Future | None = None
        self.last_commit_s = 0.0  # how long the last committed save took to write (rank 0; async: background)

    def save(self, target: Path, train_state: TrainState, plan: SavePlan, blocking: bool) -> None:
        raise NotImplementedError

    def use_async(self, blocking: bool) -> bool:
        return self._pool is not None and not blocking

    def submit(self, fn: Callable[..., None], *args: object) -> None:
        """Run ``fn(*args)`` in the background thread (only with ``async_save``)."""
        assert self._pool is not None
        self._in_flight = self._pool.submit(fn, *args)

    def wait(self) -> None:
        """Wait for the in-flight background save, if any; re-raise its error in the training thread."""
        if self._in_flight is not None:
            future, self._in_flight = self._in_flight, None
            future.result()

    def close(self) -> None:
        """Finish any in-flight save and stop the background thread (call before the process exits)."""
        try:
            self.wait()
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True)


class FullWrites(Writes):
    """Rank 0 holds the whole state and writes it all; the other ranks write nothing. Blocking: rank 0 commits,
    then every rank passes a barrier. Async: rank 0 copies the state to host memory (pinned on a GPU) and a
    background thread commits it — no collective ever runs in that thread."""

    def save(self, target: Path, train_state: TrainState, plan: SavePlan, blocking: bool) -> None:
        if self.ctx.is_main:
            self.wait()  # at most one save in flight; also surfaces a failed background write
            model_state, rest = self.model.state_dict(), self.optim.state_dict()
            if self.use_async(blocking):  # copy now: the live tensors change with the next step
                pin = self.ctx.device.type == "cuda"
                model_state, rest = snapshot(model_state, pin), snapshot(rest, pin)
                if pin:
                    torch.cuda.current_stream().synchronize()  # the pinned copies must be complete
                self.submit(self._commit, target, Payload(train_state.step, model_state, rest, train_state, plan))
            else:
                self._commit(target, Payload(train_state.step, model_state, rest, train_state, plan))
        if blocking or self._pool is None:
            self.ctx.barrier()

    def _commit(self, target: Path, payload: Payload) -> None:
        """Rank 0: write everything into a temporary folder, fsync, rename into place, update ``latest``."""
        t0 = time.perf_counter()
        try:
            tmp = self.committer.fresh_tmp(target, str(os.getpid()))
            self.committer.commit(target, tmp, payload, {})
        except (OSError, RuntimeError) as exc:  # RuntimeError: torch's zip writer on a full disk ("unexpected pos")
            if not isinstance(exc, OSError) and disk_trouble(exc) is None:
                raise
            raise write_error(target, exc) from exc
        self.committer.after_commit(payload)
        self.last_commit_s = time.perf_counter() - t0
