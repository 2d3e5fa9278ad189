"""Per-step reporting: metrics at log steps (one small all-gather, no per-step collective or host sync), a
progress bar on rank 0's terminal, plain log lines when the output is not a terminal."""

from __future__ import annotations

import logging
import os
import sys
import time
from dataclasses import dataclass

import psutil
import torch

from workers import slurm
from workers.config import Config
from workers.dist import DistContext
from workers.tracking import Tracker

log = logging.getLogger("workers.trainer")
_PER_RANK = ("cpu_percent", "rss_mb", "cuda_max_mem_mb", "step_time_ms")


@dataclass
class StepStats:
    """What one optimizer step produced; tensors stay on the device until a log step needs them."""

    loss: torch.Tensor
    grad_norm: torch.Tensor | None
    lr: float
    step_time_s: float
    data_wait_s: float


def _restart_counts(cfg: Config, ctx: DistContext) -> dict[str, float]:
    """Restarts of this run so far: the local launcher's count, or SLURM's requeues and, of those, preemptions."""
    if ctx.source == "slurm":
        events = slurm.read_events(cfg.run_dir)
        return {
            "restarts": float(os.environ.get("SLURM_RESTART_COUNT", "0") or 0),
            "preemptions": float(sum(1 for e in events if e.get("event") == "requeue" and e["kind"] == "preemption")),
        }
    return {"restarts": float(os.environ.get("ORCH_RESTART_COUNT", "0"))}


class Reporter:
    """Called every step on every rank; does real work only at log steps (a collective then, on all ranks)."""

    def __init__(self, cfg: Config, ctx: DistContext, tracker: Tracker, start_step: int) -> None:
        self.cfg, self.ctx, self.tracker = cfg, ctx, tracker
        self.every, self.max_steps = cfg.train.log_every, cfg.train.max_steps
        self.gbs = cfg.data.global_batch_size
        self.proc = psutil.Process()
        self.proc.cpu_percent(None)  # start the CPU-time window
        self.window_start, self.window_step = time.perf_counter(), start_step
        self.data_wait = self.step_time = 0.0
        self.extra: dict[str, float] = _restart_counts(cfg, ctx)
        self.progress = Progress(self.max_steps, start_step) if ctx.is_main and sys.stderr.isatty() else None
        self.last_loss = float("nan")
        self.logging_s = self.gather_s = 0.0  # cumulative time in log steps: sinks + console / the all-gather
        self.slowest_step_s = 0.0  # the slowest rank's mean step time in the last log window (same on all ranks)

    def note(self, **values: float) -> None:
        """Values to put in the next logged row (e.g. checkpoint times)."""
        self.extra.update(values)

    def step(self, step: int, stats: StepStats) -> None:
        self.data_wait += stats.data_wait_s
        self.step_time += stats.step_time_s
        if self.progress:
            self.progress.update(step, self._rate(step), self.last_loss)
        if step % self.every and step not in (1, self.max_steps):
            return
        t_log = time.perf_counter()
        steps = max(1, step - self.window_step)
        loss, per_rank = self._gather(stats.loss, self.step_time / steps)
        t_gathered = time.perf_counter()
        now = time.perf_counter()
        row = {
            "loss": loss, "lr": stats.lr, "samples_per_s": round(self._rate(step, now), 2),
            "step_time_s": round(self.step_time / steps, 6), "data_wait_s": round(self.data_wait / steps, 6),
            "world_size": self.ctx.world_size, "logging_s_total": round(self.logging_s, 6),
            "gather_s_total": round(self.gather_s, 6), "time": round(time.time(), 3), **self.extra,
            **per_rank,
        }  # fmt: skip
        if stats.grad_norm is not None:
            row["grad_norm"] = float(stats.grad_norm)
        self.window_start, self.window_step, self.data_wait, self.step_time = now, step, 0.0, 0.0
        self.last_loss = loss
        if self.ctx.is_main:
            self.tracker.log(step, row)
            if not self.progress:
                log.info(
                    "step %d/%d loss %.5f lr %.2e %.0f samples/s",
                    step,
                    self.max_steps,
                    loss,
                    stats.lr,
                    row["samples_per_s"],
                )
        # What logging cost rank 0, reported in the next row: the all-gather (mostly waiting for the slowest
        # rank, a wait the next gradient all-reduce would have had anyway) and the rest (sinks, console).
        self.gather_s += t_gathered - t_log
        self.logging_s += time.perf_counter() - t_gathered
        if self.progress and step == self.max_steps:
            self.progress.close()

    def _rate(self, step: int, now: float | None = None) -> float:
        elapsed = (now or time.perf_counter()) - self.window_start
        return (step - self.window_step) * self.gbs / max(elapsed, 1e-9)

    def _gather(self, loss: torch.Tensor, step_time_s: float) -> tuple[float, dict[str, float]]:
        """One all-gather of [loss, cpu %, RSS MB, CUDA peak MB, step ms] from every rank. Collective.

        Also sets ``slowest_step_s``, the same on every rank (it paces the stop agreement)."""
        mine = torch.tensor(
            [float(loss), self.proc.cpu_percent(None), self.proc.memory_info().rss / 2**20,
             torch.cuda.max_memory_allocated(self.ctx.device) / 2**20 if self.ctx.device.type == "cuda" else 0.0,
             1000 * step_time_s],
            dtype=torch.float64, device=self.ctx.device,
        )  # fmt: skip
        rows = [mine]
        if self.ctx.distributed and self.ctx.world_size > 1:
            rows = [torch.empty_like(mine) for _ in range(self.ctx.world_size)]
            torch.distributed.all_gather(rows, mine)
        table = torch.stack(rows).cpu()
        self.slowest_step_s = float(table[:, 4].max()) / 1000
        per_rank = {}
        for rank, values in enumerate(table.tolist()):
            for name, value in zip(_PER_RANK, values[1:], strict=True):
                if name != "cuda_max_mem_mb" or self.ctx.device.type == "cuda":
                    per_rank[f"rank{rank}/{name}"] = round(value, 2)
        return float(table[:, 0].mean()), per_rank


class Progress:
    """A one-line progress bar on a terminal: step/total, ETA, last loss, samples/s (redrawn at most 10×/s)."""

    def __init__(self, total: int, start_step: int) -> None:
        self.total, self.start, self.t0, self.last_draw = total, start_step, time.perf_counter(), 0.0

    def update(self, step: int, rate: float, loss: float) -> None:
        now = time.perf_counter()
        if now - self.last_draw < 0.1 and step != self.total:
            return
        self.last_draw = now
        frac = step / self.total
        bar = "#" * int(30 * frac) + "-" * (30 - int(30 * frac))
        per_step = (now - self.t0) / max(step - self.start, 1)
        eta = per_step * (self.total - step)
        sys.stderr.write(f"\r[{bar}] {step}/{self.total} ETA {eta:5.0f}s loss {loss:.4f} {rate:8.0f} samples/s")
        sys.stderr.flush()

    def close(self) -> None:
        sys.stderr.write("\n")
        sys.stderr.flush()
