"""One start's reporting behind one call per step and one per eval: the tracker's sinks (metrics file, wandb),
the per-step reporter (rows, progress bar) and the step sync (the background exchange of log values and stop
requests). The training loop talks to this and to nothing else of tracking."""

from __future__ import annotations

import logging
from collections.abc import Mapping

from workers.config import Config
from workers.dist import DistContext
from workers.rundir import RunDir
from workers.stop import StopFlag
from workers.tracking.reporting import Reporter, StepStats
from workers.tracking.stepsync import StepSync
from workers.tracking.throughput import Throughput
from workers.tracking.tracker import Tracker

log = logging.getLogger("workers.tracking")


class ReportingSession:
    """Built on every rank when training starts (after the resume: ``start_step``); :meth:`close` at the end,
    however it ends. ``counts``: restarts (and preemptions) of the run so far, carried in every row."""

    def __init__(
        self, cfg: Config, ctx: DistContext, paths: RunDir, stop: StopFlag, start_step: int,
        counts: Mapping[str, float], throughput: Throughput | None = None,
    ) -> None:  # fmt: skip
        """``throughput``: what turns samples/s into tokens/s and MFU (the task's declarations)."""
        self.tracker = Tracker(cfg, paths, ctx.is_main, start_step)
        try:
            self.reporter = Reporter(cfg, ctx, self.tracker, start_step, counts, throughput or Throughput())
            # collective (a gloo group of its own on GPUs): every rank builds its session at the same point
            self.sync = StepSync(ctx, stop, cfg.train.log_every, self.reporter.complete)
        except BaseException:
            if hasattr(self, "reporter"):
                self.reporter.close()
            self.tracker.finish(quick=True)
            raise

    @property
    def run_id(self) -> str | None:
        """The wandb run id (rank 0, tracking on), saved in every checkpoint's train state."""
        return self.tracker.run_id

    def step(self, step: int, stats: StepStats, eval_due: bool) -> int:
        """Account completed step ``step`` on every rank; returns the stop code all ranks agreed (NONE on most
        steps). At a log step this rank's values join the background exchange; when an eval is due at this step,
        its train row reaches wandb with the eval row (Tracker.hold_for_eval) and the rows up to it are written
        before the eval starts."""
        log_values = self.reporter.step(step, stats)
        if eval_due:
            self.tracker.hold_for_eval(step)  # before this step's train row can be written
        code = self.sync.step(step, stats.step_time_s, log_values)
        if eval_due:  # the training rows up to this step are written before its eval row
            self.sync.flush()
            self.reporter.drain()
        return code

    @property
    def agreed_stop(self) -> int:
        """A stop code all ranks already agreed but not yet returned by :meth:`step` (an eval watches it)."""
        return self.sync.agreed_code

    def eval(self, step: int, row: Mapping[str, float] | None, shown: tuple[str, float] | None = None) -> None:
        """The eval at ``step`` ended: ``row`` (``eval/<name>`` values) is logged, with the held train row, and
        ``shown`` (metric, value) goes on the progress bar; None: a stop abandoned it (wandb gets this step with its
        eval on resume)."""
        if row is None:
            self.tracker.release_held(send=False)
            return
        self.tracker.log(step, dict(row), is_eval=True)
        self.tracker.release_held()
        if shown is not None:
            self.reporter.show_eval(*shown)

    def note(self, **values: float) -> None:
        """Values for the next logged row (checkpoint times)."""
        self.reporter.note(**values)

    def flush(self) -> None:
        """Write the rows up to now (before a checkpoint that ends them exists; at the end). Every rank, same step."""
        self.sync.flush()
        self.reporter.drain()

    def close(self, quick: bool) -> None:
        """Write the rows completed so far, end the progress bar and every sink; ``quick`` (after a stop or an
        error) bounds wandb's wait, and a row that cannot be written then does not hide the error being reported."""
        try:
            try:
                self._drain(quick)
            finally:  # the bar, the background writer and the memory reader end even when the last rows fail
                self.reporter.close()
        finally:
            self.tracker.finish(quick)

    def _drain(self, quick: bool) -> None:
        try:
            self.reporter.drain()
        except Exception as exc:
            if not quick:
                raise
            log.warning("the last metrics rows could not be written: %s", exc)
