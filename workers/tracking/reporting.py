"""Per-step reporting: metrics at log steps (gathered in the background with the stop check, workers.tracking.stepsync;
no per-step collective or host sync), a progress bar on rank 0's terminal, plain log lines when the output is not
a terminal."""

from __future__ import annotations

import logging
import os
import resource
import shutil
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass

import psutil
import torch

from workers.config import Config
from workers.dist import DistContext
from workers.tracking.batching import RowBatches
from workers.tracking.straggler import PER_RANK, find_straggler
from workers.tracking.throughput import Throughput
from workers.tracking.tracker import Tracker

log = logging.getLogger("workers.trainer")
_COMPUTE, _STEP = 1 + PER_RANK.index("compute_ms"), 1 + PER_RANK.index("step_time_ms")  # columns of a table row


class ProcessMemory:
    """This process's resident memory, read cheaply: ``/proc/self/statm`` through a kept descriptor (1.4 µs a read
    here; opening the file for each read 5.9 µs, psutil's ``memory_info`` 11 µs), psutil where there is no /proc
    or after :meth:`close`, which whoever made it calls when done (the descriptor is not left to the process's end)."""

    def __init__(self) -> None:
        try:
            self._fd: int | None = os.open("/proc/self/statm", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            self._fd = None
        self._page = os.sysconf("SC_PAGE_SIZE") if self._fd is not None else 0

    def rss_mb(self) -> float:
        if self._fd is not None:
            try:
                return int(os.pread(self._fd, 128, 0).split()[1]) * self._page / 2**20
            except (OSError, IndexError, ValueError):
                pass
        return psutil.Process().memory_info().rss / 2**20

    def close(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)


@dataclass
class StepStats:
    """What one optimizer step produced; tensors stay on the device until a log step needs them."""

    loss: torch.Tensor
    grad_norm: torch.Tensor | None
    lr: float
    step_time_s: float
    data_wait_s: float
    nonfinite_skipped: int | None = None  # the guard's count of skipped steps, when this step was skipped
    compute_s: float = 0.0  # forward (and the backward of micro-steps before the last): no collective waits


# rank 0's values of a log step: lr, samples/s, step time, data wait, logging time so far, wall time, extra, grad norm
_Pending = tuple[float, float, float, float, float, float, dict[str, float], float | None]


class Reporter:
    """Called every step on every rank; does real work only at log steps.

    At a log step each rank reads its values (loss, CPU %, RSS, CUDA peak, step time) and hands them to the
    step sync, which gathers them with the stop check in one background collective (workers.tracking.stepsync); the row
    is completed when that exchange has finished — at the next exchange, or when a checkpoint flushes it — and
    rank 0 writes it. No collective of its own; on GPUs reading the loss (and grad norm) is the one host sync, at
    log steps only.

    Rank 0 writes completed rows in batches (workers.tracking.batching), and all of them before a checkpoint or an
    eval, and at the end.
    """

    def __init__(
        self, cfg: Config, ctx: DistContext, tracker: Tracker, start_step: int, counts: Mapping[str, float],
        throughput: Throughput | None = None,
    ) -> None:  # fmt: skip
        """``counts``: values every row carries until changed (restarts and preemptions so far; the entry
        point that started this process knows them)."""
        self.cfg, self.ctx, self.tracker = cfg, ctx, tracker
        self.throughput = throughput or Throughput()
        self.every, self.max_steps = cfg.train.log_every, cfg.train.max_steps
        self.gbs = cfg.data.global_batch_size
        self.memory = ProcessMemory()
        usage = resource.getrusage(resource.RUSAGE_SELF)
        self.window_start, self.window_step = time.perf_counter(), start_step
        self.window_cpu_s = usage.ru_utime + usage.ru_stime
        self.data_wait = self.step_time = self.compute = 0.0
        self.warned: set[int] = set()  # ranks already named as stragglers (the console warns once per run and rank)
        self.extra: dict[str, float] = dict(counts)
        self.progress = Progress(self.max_steps, start_step) if ctx.is_main and sys.stderr.isatty() else None
        self.last_loss = float("nan")
        self.partial: dict[int, _Pending] = {}  # rank 0's values of log steps awaiting their table
        self.logging_s = 0.0  # cumulative time this rank spent reading log values
        self.write_s = 0.0  # ... and rank 0 building and writing rows (under the batches' lock)
        self.batches = RowBatches(self._write) if ctx.is_main else None

    def is_log_step(self, step: int) -> bool:
        """The same on every rank: every ``log_every`` steps, and the first and last step."""
        return step % self.every == 0 or step in (1, self.max_steps)

    def note(self, **values: float) -> None:
        """Values to put in the next logged row (e.g. checkpoint times)."""
        self.extra.update(values)

    def step(self, step: int, stats: StepStats) -> list[float] | None:
        """Account one step; at a log step return this rank's log values for the step sync to gather."""
        if stats.nonfinite_skipped is not None:
            self.extra["nonfinite_skipped"] = float(stats.nonfinite_skipped)
        self.data_wait += stats.data_wait_s
        self.step_time += stats.step_time_s
        self.compute += stats.compute_s
        if self.progress:
            self.progress.update(step, self._rate(step), self.last_loss)
        if not self.is_log_step(step):
            return None
        t0 = time.perf_counter()
        steps = max(1, step - self.window_step)
        if self.ctx.is_main:  # only rank 0 writes rows: the others just contribute their values
            self.partial[step] = self._pending_row(step, stats, steps, t0)
        usage = resource.getrusage(resource.RUSAGE_SELF)  # one call: CPU time and peak RSS (~3 µs; psutil's ~70)
        cpu_s = usage.ru_utime + usage.ru_stime  # the process's user + system time, what process_time() reads
        values = [
            float(stats.loss), 100 * (cpu_s - self.window_cpu_s) / max(t0 - self.window_start, 1e-9),
            self.memory.rss_mb(), usage.ru_maxrss / 1024,  # (Linux: KiB)
            torch.cuda.max_memory_allocated(self.ctx.device) / 2**20 if self.ctx.device.type == "cuda" else 0.0,
            1000 * self.step_time / steps, 1000 * self.data_wait / steps, 1000 * self.compute / steps,
        ]  # fmt: skip
        self.window_cpu_s = cpu_s
        self.window_start, self.window_step, self.data_wait, self.step_time = t0, step, 0.0, 0.0
        self.compute = 0.0
        self.logging_s += time.perf_counter() - t0
        return values

    def complete(self, step: int, table: list[list[float]]) -> None:
        """The gathered values of log step ``step`` (the loss and PER_RANK, per rank) arrived: rank 0 finishes its
        row and writes it, in a batch with the rows before it (workers.tracking.batching)."""
        if self.batches is not None:
            self.batches.add((step, table))

    def drain(self) -> None:
        """Write every completed row now (rank 0; nothing elsewhere): before a checkpoint or an eval, at the end."""
        if self.batches is not None:
            self.batches.drain()

    def _write(self, completed: list[tuple[int, list[list[float]]]]) -> None:
        t0 = time.perf_counter()
        for step, table in completed:
            self._emit(step, self._row(step, table))
        self.tracker.flush()
        self.write_s += time.perf_counter() - t0

    def _row(self, step: int, table: list[list[float]]) -> dict[str, float]:
        """Log step ``step``'s row: rank 0's values read at the step and every rank's gathered ones."""
        lr, rate, step_time, data_wait, logging_s, wall, extra, grad_norm = self.partial.pop(step)
        row = {
            "loss": sum(r[0] for r in table) / len(table), "lr": lr, "samples_per_s": round(rate, 2),
            **self.throughput.values(rate), "step_time_s": round(step_time, 6), "data_wait_s": round(data_wait, 6),
            "world_size": self.ctx.world_size, "logging_s_total": round(logging_s, 6), "time": round(wall, 3),
            **extra, **self._per_rank(table),
        }  # fmt: skip
        if grad_norm is not None:
            row["grad_norm"] = grad_norm
        self._note_straggler(step, row, table)
        self.last_loss = row["loss"]
        return row

    def _pending_row(self, step: int, stats: StepStats, steps: int, now: float) -> _Pending:
        """Rank 0's values of a log step, read now (the row is built when it is written) — the grad norm too,
        beside the loss: later it would wait for the next step's queued GPU work."""
        grad_norm = None if stats.grad_norm is None else float(stats.grad_norm)
        return (
            stats.lr, self._rate(step, now), self.step_time / steps, self.data_wait / steps,
            self.logging_s + self.write_s, time.time(), dict(self.extra), grad_norm,
        )  # fmt: skip

    def _emit(self, step: int, row: dict[str, float]) -> None:
        self.tracker.log(step, row, flush=False)  # drain() flushes the batch
        if self.progress:
            if step == self.max_steps:
                self.progress.update(step, row["samples_per_s"], row["loss"])
                self.progress.close()
            return
        log.info(
            "step %d/%d loss %.5f lr %.2e %.0f samples/s", step, self.max_steps, row["loss"], row["lr"],
            row["samples_per_s"],
        )  # fmt: skip

    def show_eval(self, metric: str, value: float) -> None:
        """The latest eval's value of ``eval.metric``, shown on the progress bar (rank 0, on a terminal)."""
        if self.progress:
            self.progress.eval_text = f"eval/{metric} {value:.4g} "

    def close(self) -> None:
        """End the background writer and the progress bar (if any): the console's log lines go back to plain
        writes; close the memory reader. Rows not yet written stay unwritten: :meth:`drain` first."""
        try:
            if self.batches is not None:
                self.batches.close()
            if self.progress:
                self.progress.close()
        finally:
            self.memory.close()

    def _rate(self, step: int, now: float | None = None) -> float:
        elapsed = (now or time.perf_counter()) - self.window_start
        return (step - self.window_step) * self.gbs / max(elapsed, 1e-9)

    def _note_straggler(self, step: int, row: dict[str, float], table: list[list[float]]) -> None:
        """The window's straggler into the row (wandb gets it on the same step); the console hears once per rank.
        Read from the gathered table (the row's ``rank<r>/...`` keys hold the same values, rounded)."""
        found = find_straggler([r[_COMPUTE] for r in table], [r[_STEP] for r in table])
        if found is None:
            return
        found = {"rank": found[0], "ratio": round(found[1], 2)}
        row["straggler_rank"], row["straggler_ratio"] = found["rank"], found["ratio"]
        if found["rank"] not in self.warned:
            self.warned.add(found["rank"])
            log.warning(
                "rank %d is a straggler: its compute (%.2f ms a step) is %.2fx the median of the other ranks' over "
                "the steps up to %d; the others wait for it in every all-reduce",
                found["rank"], row[f"rank{found['rank']}/compute_ms"], found["ratio"], step,
            )  # fmt: skip

    def _per_rank(self, table: list[list[float]]) -> dict[str, float]:
        per_rank = {}
        for rank, values in enumerate(table):
            for name, value in zip(PER_RANK, values[1:], strict=True):
                if name != "cuda_max_mem_mb" or self.ctx.device.type == "cuda":
                    per_rank[f"rank{rank}/{name}"] = round(value, 2)
        return per_rank


class Progress:
    """Rank 0's progress bar on a terminal (tqdm): step/total, ETA, last loss, latest eval metric, samples/s.
    While it shows, the console's log lines go through tqdm (``logging_redirect_tqdm``): they print above the bar,
    which stays at the bottom, instead of being glued to its end.
    Call :meth:`close` when training ends, however it ends."""

    def __init__(self, total: int, start_step: int) -> None:
        from tqdm import tqdm  # noqa: PLC0415 - only on a terminal
        from tqdm.contrib.logging import logging_redirect_tqdm  # noqa: PLC0415

        # One process, one bar: a thread lock (tqdm's default also makes a multiprocessing one, whose semaphore a
        # worker's os._exit would leave for the resource tracker to complain about on the user's terminal).
        tqdm.set_lock(threading.RLock())
        size = shutil.get_terminal_size((100, 24))  # a pty may report 0 x 0: tqdm would then hide the bar
        self.bar = tqdm(
            total=total, initial=start_step, file=sys.stderr, ascii="-#", mininterval=0.1, smoothing=0.1,
            ncols=size.columns or 100, nrows=size.lines or 24,
            bar_format="[{bar:30}] {n_fmt}/{total_fmt} ETA {remaining} {postfix}",
        )  # fmt: skip
        self.redirect = logging_redirect_tqdm()
        self.redirect.__enter__()
        self.closed = False
        self.eval_text = ""  # the latest eval's metric, once there is one

    def update(self, step: int, rate: float, loss: float) -> None:
        self.bar.set_postfix_str(f"loss {loss:.4f} {self.eval_text}{rate:8.0f} samples/s", refresh=False)
        self.bar.update(step - self.bar.n)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.bar.close()
            self.redirect.__exit__(None, None, None)
