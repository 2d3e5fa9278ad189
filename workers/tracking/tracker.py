"""Metrics: the run's metrics file (``RunDir.metrics``) always, wandb on rank 0 when enabled. One continuous run
across every restart.

- The wandb run id is created once and kept in the run's tracking file (``RunDir.tracking``); every start (local
  restart, resume on another world size, SLURM requeue) calls ``wandb.init(id=..., resume="allow")`` on rank 0 with it.
- Everything is logged against the *global* step. On resume, steps already logged before the stop (the run may
  have gone past its last checkpoint) are not logged again: their values are identical, and skipping them
  keeps every curve free of duplicates and gaps.
- wandb runs in a child process of rank 0 (:class:`WandbProcess`): the training loop only queues rows.
- With ``tracking.mode: disabled`` wandb is never imported and nothing is written under ``wandb/``.
"""

from __future__ import annotations

import logging
from typing import Any, Protocol

from workers.config import Config
from workers.rundir import RunDir
from workers.tracking.metrics_file import JsonlSink, run_id
from workers.tracking.wandb_run import WandbProcess, wandb_mode

log = logging.getLogger("workers.tracking")


class Sink(Protocol):
    skip_through: int  # steps <= this are already in this sink (logged before a stop): not logged again

    def log(self, step: int, row: dict[str, Any]) -> None: ...
    def flush(self) -> None: ...
    def finish(self, quick: bool = False) -> None: ...


class Tracker:
    """Rank 0's metric sinks behind one call; on other ranks it holds nothing and logs nothing.

    An eval step's rows: the metrics file gets the train row at once, then the eval row. wandb gets both together,
    only once the eval has finished (:meth:`hold_for_eval` ... :meth:`release_held`): a wandb step, once written,
    cannot take more keys from a later start, so when the eval of a step does not finish in this start (a stop
    abandons it, a kill), wandb must not have that step yet — the next start back-fills the train row from the
    metrics file and logs the eval row beside it.
    """

    def __init__(self, cfg: Config, paths: RunDir, is_main: bool, start_step: int = 0) -> None:
        """``start_step``: the step this start resumes from (0 for a fresh start); later rows are a dead attempt's."""
        self.sinks: list[Sink] = []
        self.run_id: str | None = None
        self.held_step: int | None = None
        self.held: dict[str, Any] = {}
        if not is_main:
            return
        self.sinks.append(JsonlSink(paths, start_step))
        if cfg.tracking.mode != "disabled":
            self.run_id = run_id(paths)
            self.sinks.append(WandbProcess(cfg, self.run_id, wandb_mode(cfg), start_step))

    def log(self, step: int, row: dict[str, Any], is_eval: bool = False, flush: bool = True) -> None:
        """``is_eval``: an eval row, which may be at the step this start resumed from (an eval that a stop
        abandoned there runs first on resume; its row is in no sink yet). ``flush=False``: more rows follow at
        once (a batch); the caller ends the batch with :meth:`flush`."""
        for sink in self.sinks:
            if step > sink.skip_through or (is_eval and step == sink.skip_through):
                if step == self.held_step and isinstance(sink, WandbProcess):
                    self.held.update(row)
                else:
                    sink.log(step, row)
        if flush:
            self.flush()

    def flush(self) -> None:
        """Hand the rows logged so far on: to the metrics file's disk cache, to wandb's process."""
        for sink in self.sinks:
            sink.flush()

    def hold_for_eval(self, step: int) -> None:
        """An eval is due at ``step``: its rows reach wandb together, at :meth:`release_held`."""
        self.held_step, self.held = step, {}

    def release_held(self, send: bool = True) -> None:
        """Send the held step's rows to wandb as one (``send=False``: the eval did not finish; drop them)."""
        if send and self.held_step is not None and self.held:
            for sink in self.sinks:
                if isinstance(sink, WandbProcess):
                    sink.log(self.held_step, self.held)
                    sink.flush()
        self.held_step, self.held = None, {}

    def finish(self, quick: bool = False) -> None:
        """End every sink; ``quick`` (after a stop or an error) bounds the wait for wandb to a few seconds."""
        for sink in self.sinks:
            sink.finish(quick)
