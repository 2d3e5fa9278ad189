"""``profile``: a torch.profiler window over a few training steps on the listed ranks, written as a Chrome trace
(JSON with ``traceEvents``; open it in https://ui.perfetto.dev or chrome://tracing) under ``run.dir/profile/``."""

from __future__ import annotations

import logging
from typing import Any

import torch

from workers.config import Config
from workers.dist import DistContext
from workers.rundir import RunDir

log = logging.getLogger("workers.trainer")


class StepProfiler:
    """Told the step about to run (:meth:`at`), it starts the profiler at ``profile.start_step`` and writes the
    trace after ``profile.steps`` steps, at the run's last step, or at :meth:`close` (a stop inside the window).
    A start that resumes inside the window profiles the rest of it. Nothing at all on ranks not listed."""

    def __init__(self, cfg: Config, ctx: DistContext, paths: RunDir) -> None:
        pc = cfg.profile
        self.on = pc.start_step is not None and ctx.rank in pc.ranks
        self.first = pc.start_step or 0
        self.last = min(self.first + pc.steps - 1, cfg.train.max_steps)
        self.ctx, self.paths = ctx, paths
        self.prof: Any = None
        self.started_at = 0

    def at(self, step: int) -> None:
        """``step`` (1-based) is about to run."""
        if not self.on:
            return
        if self.prof is not None and step > self.last:
            self.close()
        elif self.prof is None and self.first <= step <= self.last:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if self.ctx.device.type == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self.prof = torch.profiler.profile(activities=activities, record_shapes=False)
            self.prof.__enter__()
            self.started_at = step

    def close(self, last_done: int | None = None) -> None:
        """Stop and write the trace of the steps profiled so far (``last_done``: the last of them, if known)."""
        if self.prof is None:
            return
        prof, self.prof = self.prof, None
        prof.__exit__(None, None, None)
        self.paths.profile.mkdir(parents=True, exist_ok=True)
        path = self.paths.profile_trace(self.ctx.rank, self.started_at, min(last_done or self.last, self.last))
        prof.export_chrome_trace(str(path))
        log.info("profile of steps %d..%d written to %s (open it in https://ui.perfetto.dev)",
                 self.started_at, min(last_done or self.last, self.last), path)  # fmt: skip
