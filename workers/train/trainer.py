"""The training loop. Reads top to bottom: build the parts, start (resume or not), then step until
``train.max_steps`` — :meth:`Trainer._loop` is the whole loop on one screen.

Exactness across stops and world sizes (README.md, "Resume, on any number of workers") rests on three things:
the global batch is constant and each step consumes the next ``global_batch_size`` samples of one global order
(workers.data); randomness inside a step is re-derived from (seed, step, rank, micro-step), never carried over
from earlier steps; and checkpoints hold only world-size-independent state (workers.checkpoint).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import nn

from workers.config import Config
from workers.data import StepBatchSampler, derive_seed, make_loader, to_device
from workers.data.recorder import IndexRecorder
from workers.data.seeding import seed_all
from workers.dist import DistContext
from workers.heartbeat import Heartbeat, NoHeartbeat
from workers.optim import describe
from workers.parallel import gradient_sync, replicated
from workers.rundir import RunDir
from workers.stop import NONE, PREEMPT, REASONS, StopFlag
from workers.tracking.reporting import StepStats
from workers.tracking.session import ReportingSession
from workers.tracking.throughput import Throughput, peak_flops
from workers.train.numerics import total_norm
from workers.train.parts import Parts, build_parts
from workers.train.profiling import StepProfiler
from workers.train.start import start

log = logging.getLogger("workers.trainer")


@dataclass(frozen=True)
class FitResult:
    """How a worker's training ended."""

    step: int  # global steps completed
    stopped_early: bool  # a stop was requested (signal) and the run saved and left before max_steps
    stop_reason: str | None = None  # "stop" (SIGTERM/SIGINT) | "preempt" (SIGUSR1/2), agreed by all ranks


def step_seed(seed: int, step: int, rank: int, micro: int) -> int:
    """The RNG seed of one micro-step: a function of (seed, step, rank, micro) only (invariant 3)."""
    return derive_seed(seed, "step", step, rank, micro)


@dataclass(frozen=True)
class Run:
    """What one start trains through, made once the start's step is known: the wrapped model, this rank's
    batches, its reporting, (``data.record_indices``) its sample recorder and (``profile``) its profiler."""

    model: nn.Module  # DDP / torch.compile around parts.model
    batches: Iterator[tuple[torch.Tensor, Any]]
    report: ReportingSession
    recorder: IndexRecorder | None
    profiler: StepProfiler

    def close(self, quick: bool) -> None:
        try:
            self.profiler.close()
            if self.recorder is not None:
                self.recorder.close()
        finally:
            self.report.close(quick)


def open_run(parts: Parts, paths: RunDir, stop: StopFlag, step: int, counts: Mapping[str, float]) -> Run:
    """Wrap the model, open the reporting and the batches from this start's ``step``; say how training runs."""
    p, cfg, ctx = parts, parts.cfg, parts.progress.ctx
    model = torch.compile(p.model) if cfg.train.compile else p.model
    if ctx.distributed and cfg.train.parallel == "ddp":  # fsdp: sharded in place when the parts were built
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None
        )
    rates = Throughput(
        p.task.tokens_per_sample, p.task.flops_per_sample, peak_flops(ctx.device, cfg.train.precision), ctx.world_size
    )
    report = ReportingSession(cfg, ctx, paths, stop, step, counts, rates)
    recorder = None
    try:  # (an empty dataset, an unwritable samples folder: what was opened is closed before the error leaves)
        p.progress.tracking_run_id = report.run_id
        recorder = IndexRecorder(paths, ctx, step) if cfg.data.record_indices else None
        sampler = StepBatchSampler(len(p.task.dataset), cfg.train.seed, p.plan, ctx.rank, step, p.progress.order)
        loader = make_loader(
            p.task.dataset, sampler, cfg.data.num_workers, p.task.collate_fn, ctx.device.type == "cuda",
            # A task whose samples involve no randomness says so (``random_samples = False``): no per-sample seeding.
            seed_samples=p.task.random_samples,
        )  # fmt: skip
    except BaseException:
        Run(model, iter(()), report, recorder, StepProfiler(cfg, ctx, paths)).close(quick=True)
        raise
    model.train()  # every module, once (the evaluator puts back the mode it found)
    log.info("%s", describe(p.optim, cfg.optim))
    log.info(
        "training steps %d..%d on %s (%s, %s): world size %d, %d samples/rank/step in %d micro-batch(es) of %d",
        step, cfg.train.max_steps, ctx.device, ctx.backend, cfg.train.precision, ctx.world_size,
        p.plan.per_rank_batch, p.plan.accum_steps, p.plan.micro_batch,
    )  # fmt: skip
    return Run(model, iter(loader), report, recorder, StepProfiler(cfg, ctx, paths))


class Trainer:
    """One worker's training. Built and run on every rank; the parts are built with it (workers.train.parts)."""

    def __init__(
        self,
        cfg: Config,
        ctx: DistContext,
        paths: RunDir,
        stop: StopFlag | None = None,
        heartbeat: Heartbeat | None = None,
        counts: Mapping[str, float] | None = None,
    ) -> None:
        """``counts``: restarts (and preemptions) of the run so far, carried in every metrics row."""
        self.cfg, self.ctx, self.paths, self.stop = cfg, ctx, paths, stop or StopFlag()
        self.heartbeat = heartbeat or NoHeartbeat()
        self.counts = dict(counts or {"restarts": 0.0})
        self.parts: Parts = build_parts(cfg, ctx, paths)

    @property
    def step(self) -> int:
        """Optimizer steps completed (the run's, across starts)."""
        return self.parts.progress.step

    def fit(self) -> FitResult:
        """Train to ``train.max_steps`` (or until a stop is agreed). Must be called on all ranks."""
        run: Run | None = None
        quick = True  # after a stop or an error, wandb gets a short time to finish: a requeue may be waiting
        try:
            start(self.parts, self.ctx, self.paths)
            done = self._nothing_to_do()
            if done is not None:
                self.parts.ckpt.close()
                return done
            self.parts.numerics.watch_buffers(self.step)  # after the start: what the buffer checks compare to
            run = open_run(self.parts, self.paths, self.stop, self.step, self.counts)
            result = self._loop(run)
            quick = result.stopped_early
        except BaseException:
            # A background save in flight still commits; its own failure must not mask the training error.
            try:
                self.parts.ckpt.close()
            except Exception as exc:
                log.error("the background checkpoint failed too: %s", exc)
            raise
        else:
            self.parts.ckpt.close()
            return result
        finally:
            if run is not None:
                run.close(quick)

    def _loop(self, run: Run) -> FitResult:
        """The loop: step, report, evaluate when due, save when due, leave on a stop or an early stop."""
        p, max_steps = self.parts, self.cfg.train.max_steps
        pending = self._pending_eval(run)
        if pending is not None:
            return FitResult(self.step, stopped_early=bool(pending), stop_reason=REASONS[pending])
        stopped = NONE
        while self.step < max_steps:
            self.heartbeat.update(self.step, "train")
            self.stop.current_step = step = self.step + 1  # the step in flight, for the signal handler's note
            run.profiler.at(step)
            stats = self._train_step(run)
            p.progress.step = step
            due = self._eval_due()
            if due:
                self.heartbeat.update(step, "eval")  # the rows before the eval are flushed under this phase
            stopped = run.report.step(step, stats, eval_due=due)
            improved = False
            # A stop saves first and the eval runs on resume — except at the last step: a resume there has nothing
            # to do, so the final eval runs now (it is never abandoned).
            if due and (not stopped or step == max_steps):
                improved, abandoned_by = self._evaluate(run)  # a stop during the eval abandons it (same thing)
                stopped = stopped or abandoned_by
            early = not stopped and p.selection is not None and p.selection.should_stop
            last = bool(stopped) or early or step == max_steps
            if last or improved or step % self.cfg.train.checkpoint_every == 0:  # a new best is always saved
                self.heartbeat.update(step, "checkpoint")
                self.save(run, blocking=last)  # the final, early-stop and stop saves are always synchronous
            if early or stopped:
                self._log_leaving(stopped)
                break
        run.report.flush()
        run.profiler.close(self.step)
        self.heartbeat.update(self.step, "done")
        return FitResult(self.step, stopped_early=bool(stopped), stop_reason=REASONS[stopped])

    # ------------------------------------------------------------ before the loop

    def _nothing_to_do(self) -> FitResult | None:
        p = self.parts
        if self.step >= self.cfg.train.max_steps:
            log.info("nothing to do: the run is at step %d of %d", self.step, self.cfg.train.max_steps)
            return FitResult(self.step, stopped_early=False)
        if p.selection is not None and p.selection.should_stop:
            log.info("nothing to do: the run stopped early at step %d (%s)", self.step, p.progress.best_text())
            return FitResult(self.step, stopped_early=False)
        return None

    def _pending_eval(self, run: Run) -> int | None:
        """An eval due at the step resumed from, which a stop saved before: evaluated before training on. That
        step's checkpoint exists (``best`` names it at the next commit if it is a new best). A stop or an early stop
        decided here ends the run with nothing to save (returns its stop code): a relaunch evaluates again and
        decides the same. None: train on."""
        selection = self.parts.selection
        if selection is None or not selection.pending_eval(self.step, self.step > 0 and self._eval_due()):
            return None
        _, stopped = self._evaluate(run)
        if stopped:
            return stopped
        if selection.should_stop:
            self._log_leaving(NONE)
            return NONE
        return None

    # ------------------------------------------------------------ one step

    def _train_step(self, run: Run) -> StepStats:
        """One optimizer step (``self.step`` is the number done before it). No host sync except the guard's."""
        p, cfg, ctx, step = self.parts, self.cfg, self.ctx, self.step
        t0 = time.perf_counter()
        if not run.model.training:  # train mode is set when the run opens (a walk over every module each step: ~1 %)
            run.model.train()
        p.numerics.check_finite_lr(step + 1)  # before any work: a NaN/inf learning rate is the schedule's fault
        accum = p.plan.accum_steps
        loss_sum: torch.Tensor | None = None
        guard = p.numerics.guard
        buffers = guard.snapshot(p.model) if guard is not None else None
        data_wait = compute = 0.0
        for micro in range(accum):
            t1 = time.perf_counter()
            indices, batch = next(run.batches)
            data_wait += time.perf_counter() - t1
            if run.recorder:
                run.recorder.record(step, micro, indices)
            if ctx.device.type != "cpu":  # (on the CPU the batch is where it must be: no per-tensor calls)
                batch = to_device(batch, ctx.device)
            seed_all(step_seed(cfg.train.seed, step, ctx.rank, micro), ctx.device)
            last, t1 = micro == accum - 1, time.perf_counter()
            # Gradients of all but the last micro-step stay local: one all-reduce per optimizer step.
            with gradient_sync(run.model, sync=last):
                with p.autocast():  # forward under autocast; backward outside it, as torch.amp advises
                    loss = p.task.loss(run.model, batch)
                    if accum > 1:  # (one op less a step without accumulation: small steps feel every op)
                        loss = loss / accum
                forward_end = time.perf_counter()
                # After the step's last forward, a watched buffer it made NaN/inf turns this rank's gradients NaN:
                # the all-reduced grad norm carries that to every rank (no extra collective), the guard skips.
                p.state.scaler.scale(p.numerics.alarmed(loss) if last else loss).backward()
            # compute: what this rank does before it can wait for the others (the last backward holds the all-reduce)
            compute += (forward_end if last else time.perf_counter()) - t1
            loss_sum = loss.detach().float() if loss_sum is None else loss_sum + loss.detach().float()
        grad_norm, skipped = self._apply_gradients(loss_sum, buffers)
        lr = p.optim.optimizer.param_groups[0]["lr"]  # any scheduler keeps it there
        return StepStats(loss_sum, grad_norm, lr, time.perf_counter() - t0, data_wait, skipped, compute)

    def _apply_gradients(
        self, loss_sum: torch.Tensor, buffers: list[torch.Tensor] | None
    ) -> tuple[torch.Tensor | None, int | None]:
        """Clip, let the guard judge the norm, and step — or skip (returns the guard's skipped count then)."""
        p, optimizer, guard = self.parts, self.parts.optim.optimizer, self.parts.numerics.guard
        grad_norm = None
        if self.cfg.train.grad_clip:
            p.state.scaler.unscale_(optimizer)
            grad_norm = replicated(nn.utils.clip_grad_norm_(p.model.parameters(), self.cfg.train.grad_clip))
        elif guard is not None and guard.active:  # the guard needs the norm even when nothing is clipped
            grad_norm = total_norm([q.grad for q in p.model.parameters() if q.grad is not None], self.ctx.device)
        # The gradients were all-reduced: the norm, and so this decision, is the same on every rank.
        culprit = partial(p.numerics.diverged_buffer, loss_sum)  # asked only when the norm is not finite
        if guard is not None and guard.skips(grad_norm, self.step, self.paths, culprit):
            optimizer.zero_grad(set_to_none=True)  # the step's samples are consumed; the weights stay
            guard.restore_buffers(p.model, buffers)  # and so do BatchNorm's statistics of that forward
            return grad_norm, guard.skipped
        p.state.scaler.step(optimizer)
        p.state.scaler.update()
        optimizer.zero_grad(set_to_none=True)
        p.optim.scheduler.step()
        return grad_norm, None

    # ------------------------------------------------------------ evaluation

    def _eval_due(self) -> bool:
        """The same on every rank: every ``eval.every`` steps, and after the final step with ``eval.at_end``."""
        ecfg = self.cfg.eval
        if self.parts.evaluator is None:
            return False
        return bool(ecfg.every and self.step % ecfg.every == 0) or (
            ecfg.at_end and self.step == self.cfg.train.max_steps
        )

    def _evaluate(self, run: Run) -> tuple[bool, int]:
        """Evaluate the current weights on the whole eval set; rank 0 logs the row. Returns (whether the best
        improved, the stop code that abandoned the eval or NONE) — the same on every rank: both come out of the
        eval's one all-reduce. Must be called on all ranks."""
        p, step = self.parts, self.step
        assert p.evaluator is not None and p.selection is not None
        self.heartbeat.update(step, "eval")  # ticks once a batch: a long eval is not a stuck step
        # A stop abandons the eval (the step is saved, the eval runs first on resume) — except the final one: the
        # run ends at this step anyway, and an abandoned final eval would never run.
        final = step >= self.cfg.train.max_steps
        result = p.evaluator.run(
            interrupt=None if final else (lambda: max(self.stop.code, run.report.agreed_stop)),
            progress=lambda done: self.heartbeat.update(step, "eval", done),
        )
        if result.abandoned:
            run.report.eval(step, None)
            log.info("eval at step %d abandoned (%s request); it runs first on resume", step, REASONS[result.stop_code])
            return False, result.stop_code
        metric = p.selection.metric  # None: nothing selects; the eval is only recorded
        improved = p.selection.observe(step, None if metric is None else result.metrics[metric])
        p.selection.judge(step, result.metrics)  # a sweep's pruner (collective when there is one)
        bar = metric or next(iter(result.metrics))  # with no selection metric the progress bar shows the first
        run.report.eval(step, result.row(), (bar, result.metrics[bar]))
        shown = ", ".join(f"eval/{k} {v:.6g}" for k, v in result.metrics.items())  # one spelling: the rows' keys
        log.info(
            "eval at step %d: %s (%d samples, %.2f s)%s", step, shown, result.samples, result.time_s,
            " — new best" if improved else "",
        )  # fmt: skip
        return improved, NONE

    def _log_leaving(self, stopped: int) -> None:
        p = self.parts
        if stopped:
            log.info(
                "%s (%s): all ranks saved step %d and are leaving; no completed step is lost",
                "preemption notice" if stopped == PREEMPT else "stop requested", self.stop.describe(), self.step,
            )  # fmt: skip
            return
        assert p.selection is not None
        log.info("%s (%s)", p.selection.leaving(self.step), p.progress.best_text())

    # ------------------------------------------------------------ saving

    def save(self, run: Run, blocking: bool = True) -> None:
        """Collective checkpoint of the current step. Must be called on all ranks. ``blocking=False`` lets an
        async checkpointer commit in the background (see Checkpointer.save)."""
        t0 = time.perf_counter()
        self.parts.numerics.check_finite_state(self.step)
        run.report.flush()  # the rows up to this step are written before the checkpoint that ends them exists
        folder = self.parts.ckpt.save(self.step, blocking=blocking)
        blocked = time.perf_counter() - t0
        done = "committed" if blocking or not self.cfg.train.async_checkpoint else "snapshot taken, writing"
        log.info("checkpoint %s %s; training blocked %.3f s", folder.name, done, blocked)
        run.report.note(ckpt_blocked_s=round(blocked, 6), ckpt_save_s=round(self.parts.ckpt.last_commit_s, 6))
