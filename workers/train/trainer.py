"""The training loop. Reads top to bottom: set up, maybe resume, then step until ``train.max_steps``.

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
from pathlib import Path
from typing import Any

import torch
from torch import nn

from workers.checkpoint import (
    Checkpointer,
    first_mismatch,
    load_full_weights,
    locate_weights,
    read_located,
    read_train_state,
    unwrap,
)
from workers.config import (
    BatchPlan,
    Config,
    check_not_past_the_end,
    check_resume_compatible,
    config_changes,
    dump_config,
    load_config,
    plan_batches,
)
from workers.contract import TrainState
from workers.data import StepBatchSampler, derive_seed, make_loader, to_device
from workers.data.recorder import IndexRecorder
from workers.data.seeding import seed_all
from workers.dist import DistContext, autocast_for
from workers.errors import CheckpointError, ConfigError, NonFiniteError
from workers.eval.evaluator import Evaluator
from workers.eval.selection import ModelSelection, selection_metric
from workers.heartbeat import Heartbeat, NoHeartbeat
from workers.optim import apply_on_resume, describe, group_settings
from workers.optim import build as build_optim
from workers.parallel import gradient_sync, is_sharded, nonfinite_anywhere, nonfinite_mask, replicated, shard
from workers.rundir import CONFIG_FILE, RunDir, step_dir_name
from workers.stop import NONE, PREEMPT, REASONS, StopFlag
from workers.tasks import build_task
from workers.tracking import Tracker
from workers.tracking.reporting import Reporter, StepStats
from workers.tracking.stepsync import StepSync
from workers.train.numerics import NonFiniteGuard, WatchedBuffers, first_nonfinite_lr, last_good, total_norm

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


class Trainer:
    """Owns one worker's training: model, optimizer, data, checkpoints. Built and run on every rank."""

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
        self.plan: BatchPlan = plan_batches(cfg, ctx.world_size)
        self.ckpt = Checkpointer(
            paths,
            ctx,
            keep=cfg.train.keep_checkpoints,
            async_save=cfg.train.async_checkpoint,
            extra_files={CONFIG_FILE: dump_config(cfg).encode()},  # each checkpoint knows how it was made
            parallel=cfg.train.parallel,
        )
        self.sharded = False  # FSDP2 sharded the model (fsdp with a process group)
        self.step = 0
        self.wrapped: nn.Module | None = None  # the DDP / compiled module once training starts
        self.tracker: Tracker | None = None
        self.reporter: Reporter | None = None
        self.sync: StepSync | None = None  # built with the loop; save() needs it

    # ------------------------------------------------------------ setup

    def _build(self) -> None:
        torch.manual_seed(self.cfg.train.seed)  # the contract: factories run with torch seeded by train.seed
        self.task = build_task(self.cfg.task.factory, dict(self.cfg.task.args))
        self.model = self._sync_batchnorm(self.task.model.to(self.ctx.device))
        if self.cfg.train.parallel == "fsdp":  # before the optimizer: it must hold the sharded parameters
            tcfg = self.cfg.train
            self.model = shard(self.model, self.task, self.ctx, tcfg.precision, tcfg.reshard_after_forward)
            self.sharded = is_sharded(self.model)
        self.optim = build_optim(self.cfg.optim, self.task, self.model, self.cfg.train.max_steps)
        self.optimizer, self.scheduler = self.optim.optimizer, self.optim.scheduler
        fp16 = self.cfg.train.precision == "fp16" and self.ctx.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=fp16)
        # fp16's GradScaler skips its own overflow steps; the guard watches every other run.
        self.guard = NonFiniteGuard(self.cfg, self.plan.global_batch_size) if not fp16 else None
        if fp16 and self.cfg.train.nonfinite != "skip":
            log.warning("train.nonfinite=%s has no effect with fp16: its GradScaler skips overflowing steps itself",
                        self.cfg.train.nonfinite)  # fmt: skip
        self.evaluator, self.selection = self._make_evaluation()

    def _sync_batchnorm(self, model: nn.Module) -> nn.Module:
        """``train.sync_batchnorm``: BatchNorm statistics over the global batch. torch's SyncBatchNorm has CUDA
        kernels only, so on any other device it is a config error (found before the first step)."""
        if not self.cfg.train.sync_batchnorm:
            return model
        if self.ctx.device.type != "cuda":
            raise ConfigError(
                f"config key 'train.sync_batchnorm' = True: torch's SyncBatchNorm runs on CUDA GPUs only, this run is "
                f"on {self.ctx.device.type}. HINT: set train.sync_batchnorm=false (each rank then normalises over "
                "its own samples)"
            )
        if not self.ctx.distributed:
            log.info("train.sync_batchnorm: one process, BatchNorm already sees the whole batch")
            return model
        converted = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        count = sum(isinstance(m, nn.SyncBatchNorm) for m in converted.modules())
        log.info("train.sync_batchnorm: %d BatchNorm layer(s) now SyncBatchNorm", count)
        return converted  # the task's hooks (optimizer, evaluate) are given this model

    def _make_evaluation(self) -> tuple[Evaluator | None, ModelSelection | None]:
        """The task's evaluation and its model selection, when the config asks for evals. The metric names are
        checked on one batch now, before the first training step: an unknown ``eval.metric``, or selection asked
        for (patience, keep_best) with no metric to select by, is a usage error found at once."""
        ecfg = self.cfg.eval
        if not ecfg.enabled:
            return None, None
        if getattr(self.task, "eval_dataset", None) is None:
            key, value = ("eval.every", ecfg.every) if ecfg.every else ("eval.at_end", ecfg.at_end)
            raise ConfigError(
                f"config key '{key}' = {value!r}: the task has no eval_dataset. HINT: give the task an eval_dataset "
                "(and optionally evaluate(model, batch)), or turn evaluation off"
            )
        evaluator = Evaluator(self.task, self.model, self.ctx, ecfg.batch_size, self.cfg.train.seed, self._autocast,
                              lockstep=self.sharded)  # fmt: skip
        names = evaluator.probe(ecfg.metric)
        return evaluator, ModelSelection(ecfg, selection_metric(ecfg, names))

    def _restore(self) -> None:
        self.ckpt.clean_stale_temporaries()
        folder = self.ckpt.find_resume_point() if self.cfg.run.resume else None
        if folder is not None:
            saved = read_train_state(folder)
            check_resume_compatible(self.cfg, saved, str(folder), len(self.task.dataset))
            check_not_past_the_end(self.cfg, saved, str(folder))
            if saved.max_steps is not None and self.cfg.train.max_steps < saved.max_steps:
                log.warning(
                    "train.max_steps is %d, the run was saved with %d: the LR schedule now decays to step %d",
                    self.cfg.train.max_steps, saved.max_steps, self.cfg.train.max_steps,
                )  # fmt: skip
            fresh = group_settings(self.optimizer)  # the settings as built now, before the saved ones replace them
            state = self.ckpt.load(folder, self.model, self.optimizer, self.scheduler, self.scaler, saved)
            self.step = state.step
            if self.guard is not None:
                self.guard.restore(state)
            if (
                self.selection is not None
                and state.selection is not None
                and not self.selection.restore(state.selection)
            ):
                log.warning(
                    "eval.metric or eval.mode changed since the checkpoint: model selection starts afresh"
                    if self.selection.metric is not None
                    else "no eval.metric now (and no loss to default to): the checkpoint's model selection stops"
                )
            apply_on_resume(self.optim, fresh, self.cfg.optim, self.cfg.train.max_steps)
            log.info(
                "resumed from %s: step %d, %d samples seen, saved at world size %d, now %d",
                folder,
                self.step,
                state.samples_seen,
                state.world_size,
                self.ctx.world_size,
            )
            self._note_config_changes(folder)
        elif self.cfg.train.init_from:
            self._init_from(self.cfg.train.init_from)

    def _note_config_changes(self, folder: Path) -> None:
        """Say which keys differ from the config the checkpoint was saved with (an fsdp run relaunched without
        ``train.parallel=fsdp`` would otherwise go on as ddp without a word). After every resume check passed: a
        refused resume stays one line."""
        try:
            saved = load_config(folder / CONFIG_FILE)
        except ConfigError:
            return  # an older checkpoint without its config, or one that no longer reads: nothing to compare
        changes = config_changes(saved, self.cfg)
        if changes and self.ctx.is_main:
            log.warning(
                "the config differs from the one %s was saved with: %s. HINT: `orchestrator resume %s` continues "
                "with the run's saved config", folder.name, "; ".join(changes), self.paths.root,
            )  # fmt: skip

    def _init_from(self, source: str) -> None:
        """Start from the weights in ``train.init_from``; anything wrong with them is the user's to fix (exit 2)."""
        try:
            origin = locate_weights(source)  # a run dir: its newest valid checkpoint, named in the log below
            weights = read_located(origin)
        except CheckpointError as exc:
            raise ConfigError(f"config key 'train.init_from' = {source!r}: {exc}") from None
        problem = first_mismatch(unwrap(self.model), weights)
        if problem:
            raise ConfigError(
                f"config key 'train.init_from' = {source!r}: does not fit the task's model: {problem}. "
                "HINT: check task.factory / task.args, or the file"
            )
        load_full_weights(unwrap(self.model), weights)  # sliced to this rank's shards when sharded
        log.info("initialised weights from %s", origin)

    def _wrap(self) -> nn.Module:
        model = self.model
        if self.cfg.train.compile:
            model = torch.compile(model)
        if self.ctx.distributed and self.cfg.train.parallel == "ddp":  # fsdp: sharded in place by _build
            ids = [self.ctx.device.index] if self.ctx.device.type == "cuda" else None
            model = nn.parallel.DistributedDataParallel(model, device_ids=ids)
        return model

    def _batches(self) -> Iterator[tuple[torch.Tensor, Any]]:
        sampler = StepBatchSampler(len(self.task.dataset), self.cfg.train.seed, self.plan, self.ctx.rank, self.step)
        loader = make_loader(
            self.task.dataset,
            sampler,
            self.cfg.data.num_workers,
            getattr(self.task, "collate_fn", None),
            self.ctx.device.type == "cuda",
            # A task whose samples involve no randomness says so (``random_samples = False``): no per-sample seeding.
            seed_samples=bool(getattr(self.task, "random_samples", True)),
        )
        return iter(loader)

    # ------------------------------------------------------------ the loop

    def fit(self) -> FitResult:
        """Train to ``train.max_steps`` (or until a stop is agreed). Must be called on all ranks."""
        quick = True  # after a stop or an error, wandb gets a short time to finish: a requeue may be waiting
        try:
            result = self._fit()
            quick = result.stopped_early
        except BaseException:
            # A background save in flight still commits; its own failure must not mask the training error.
            try:
                self.ckpt.close()
            except Exception as exc:
                log.error("the background checkpoint failed too: %s", exc)
            raise
        else:
            self.ckpt.close()
            return result
        finally:
            if self.reporter is not None:
                self.reporter.close()
            if self.tracker is not None:
                self.tracker.finish(quick)

    def _fit(self) -> FitResult:
        self._build()
        self._restore()
        if self.step >= self.cfg.train.max_steps:
            log.info("nothing to do: the run is at step %d of %d", self.step, self.cfg.train.max_steps)
            return FitResult(self.step, stopped_early=False)
        if self.selection is not None and self.selection.should_stop:
            log.info("nothing to do: the run stopped early at step %d (%s)", self.step, self._best_text())
            return FitResult(self.step, stopped_early=False)
        self._watch_buffers()  # after the resume (or init_from): the state the checks compare buffers to
        model = self.wrapped = self._wrap()
        self.tracker = Tracker(self.cfg, self.paths, self.ctx.is_main, self.step)
        self.reporter = Reporter(self.cfg, self.ctx, self.tracker, self.step, self.counts)
        recorder = IndexRecorder(self.paths, self.ctx, self.step) if self.cfg.data.record_indices else None
        sync = self.sync = StepSync(self.ctx, self.stop, self.cfg.train.log_every, self.reporter.complete)
        batches = self._batches()
        log.info("%s", describe(self.optim, self.cfg.optim))
        log.info(
            "training steps %d..%d on %s (%s, %s): world size %d, %d samples/rank/step in %d micro-batch(es) of %d",
            self.step,
            self.cfg.train.max_steps,
            self.ctx.device,
            self.ctx.backend,
            self.cfg.train.precision,
            self.ctx.world_size,
            self.plan.per_rank_batch,
            self.plan.accum_steps,
            self.plan.micro_batch,
        )
        stopped = NONE
        if self.selection is not None and self.selection.pending_eval(
            self.step, self.step > 0 and self._should_evaluate()
        ):
            # Due at the step resumed from, but a stop saved first: evaluated before training on. That step's
            # checkpoint exists (``best`` names it at the next commit if it is a new best). A stop or an early stop
            # decided here ends the run with nothing to save: a relaunch evaluates again and decides the same.
            _, stopped = self._evaluate()
            if stopped or self.selection.should_stop:
                if not stopped:
                    self._log_early_stop()
                return FitResult(self.step, stopped_early=bool(stopped), stop_reason=REASONS[stopped])
        while self.step < self.cfg.train.max_steps:
            self.heartbeat.update(self.step, "train")
            self.stop.current_step = self.step + 1  # the step in flight, for the signal handler's note
            t0 = time.perf_counter()
            loss, grad_norm, data_wait = self._train_step(model, batches, recorder)
            self.step += 1
            lr = self.optimizer.param_groups[0]["lr"]  # any scheduler keeps it there
            step_time = time.perf_counter() - t0
            log_values = self.reporter.step(self.step, StepStats(loss, grad_norm, lr, step_time, data_wait))
            due = self._should_evaluate()
            if due:
                self.tracker.hold_for_eval(self.step)  # before this step's train row can be written
            stopped = sync.step(self.step, step_time, log_values)
            improved = False
            if due and not stopped:  # a stop saves first; that step is evaluated on resume
                improved, stopped = self._evaluate()  # a stop during the eval abandons it (same thing)
            early = not stopped and self.selection is not None and self.selection.should_stop
            last = bool(stopped) or early or self.step == self.cfg.train.max_steps
            if last or improved or self.step % self.cfg.train.checkpoint_every == 0:  # a new best is always saved
                self.heartbeat.update(self.step, "checkpoint")
                self.save(blocking=last)  # the final, early-stop and stop saves are always synchronous
            if early:
                self._log_early_stop()
                break
            if stopped:
                log.info(
                    "%s (%s): all ranks saved step %d and are leaving; no completed step is lost",
                    "preemption notice" if stopped == PREEMPT else "stop requested",
                    self.stop.describe(),
                    self.step,
                )
                break
        sync.flush()
        self.heartbeat.update(self.step, "done")
        return FitResult(self.step, stopped_early=bool(stopped), stop_reason=REASONS[stopped])

    def _selection_state(self) -> dict[str, Any] | None:
        """The selection as of this save (this step competes for the k best when it was evaluated)."""
        if self.selection is None:
            return None
        self.selection.checkpointed(self.step)
        return self.selection.state()

    def _should_evaluate(self) -> bool:
        """The same on every rank: every ``eval.every`` steps, and after the final step with ``eval.at_end``."""
        ecfg = self.cfg.eval
        if self.evaluator is None:
            return False
        return bool(ecfg.every and self.step % ecfg.every == 0) or (
            ecfg.at_end and self.step == self.cfg.train.max_steps
        )

    def _evaluate(self) -> tuple[bool, int]:
        """Evaluate the current weights on the whole eval set; rank 0 logs the row. Returns (whether the best
        improved, the stop code that abandoned the eval or NONE) — the same on every rank: both come out of the
        eval's one all-reduce. Must be called on all ranks."""
        self.heartbeat.update(self.step, "eval")  # ticks once a batch: a long eval is not a stuck step
        self.sync.flush()  # the training rows up to this step are written before its eval row
        # A stop abandons the eval (the step is saved, the eval runs first on resume) — except the final one: the
        # run ends at this step anyway, and an abandoned final eval would never run.
        final = self.step >= self.cfg.train.max_steps
        result = self.evaluator.run(
            interrupt=None if final else (lambda: max(self.stop.code, self.sync.agreed_code)),
            progress=lambda done: self.heartbeat.update(self.step, "eval", done),
        )
        if result.abandoned:
            self.tracker.release_held(send=False)  # wandb gets this step with its eval, on resume
            log.info(
                "eval at step %d abandoned (%s request); it runs first on resume", self.step,
                REASONS[result.stop_code],
            )  # fmt: skip
            return False, result.stop_code
        metric = self.selection.metric  # None: nothing selects; the eval is only recorded
        improved = self.selection.observe(self.step, None if metric is None else result.metrics[metric])
        self.tracker.log(self.step, result.row(), is_eval=True)
        self.tracker.release_held()
        bar = metric or next(iter(result.metrics))  # with no selection metric the progress bar shows the first
        self.reporter.show_eval(bar, result.metrics[bar])
        shown = ", ".join(f"eval/{k} {v:.6g}" for k, v in result.metrics.items())  # one spelling: the rows' keys
        log.info(
            "eval at step %d: %s (%d samples, %.2f s)%s", self.step, shown, result.samples, result.time_s,
            " — new best" if improved else "",
        )  # fmt: skip
        return improved, NONE

    def _log_early_stop(self) -> None:
        log.info(
            "early stopping at step %d: eval/%s did not improve by eval.min_delta=%g in %d evals (%s)",
            self.step, self.selection.metric, self.cfg.eval.min_delta, self.selection.bad_evals, self._best_text(),
        )  # fmt: skip

    def _best_text(self) -> str:
        s = self.selection
        return f"best eval/{s.metric} {s.best_value:.6g} at step {s.best_step}"

    def _train_step(
        self, model: nn.Module, batches: Iterator, recorder: IndexRecorder | None
    ) -> tuple[torch.Tensor, torch.Tensor | None, float]:
        """One optimizer step; returns (loss, grad norm, seconds spent waiting for data). No host sync."""
        model.train()
        self._check_finite_lr()  # before any work: a NaN/inf learning rate is the schedule's fault, found at once
        accum = self.plan.accum_steps
        loss_sum: torch.Tensor | None = None
        buffers = self.guard.snapshot(self.model) if self.guard is not None else None
        data_wait = 0.0
        for micro in range(accum):
            t0 = time.perf_counter()
            indices, batch = next(batches)
            data_wait += time.perf_counter() - t0
            if recorder:
                recorder.record(self.step, micro, indices)
            if self.ctx.device.type != "cpu":  # (on the CPU the batch is where it must be: no per-tensor calls)
                batch = to_device(batch, self.ctx.device)
            seed_all(step_seed(self.cfg.train.seed, self.step, self.ctx.rank, micro), self.ctx.device)
            # Gradients of all but the last micro-step stay local: one all-reduce per optimizer step.
            with gradient_sync(model, sync=micro == accum - 1):
                with self._autocast():  # forward under autocast; backward outside it, as torch.amp advises
                    loss = self.task.loss(model, batch)
                    if accum > 1:  # (one op less a step without accumulation: small steps feel every op)
                        loss = loss / accum
                # After the step's last forward, a watched buffer it made NaN/inf turns this rank's gradients NaN:
                # the all-reduced grad norm carries that to every rank (no extra collective), the guard skips.
                self.scaler.scale(self._alarmed(loss) if micro == accum - 1 else loss).backward()
            loss_sum = loss.detach().float() if loss_sum is None else loss_sum + loss.detach().float()
        grad_norm = None
        if self.cfg.train.grad_clip:
            self.scaler.unscale_(self.optimizer)
            grad_norm = replicated(nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.train.grad_clip))
        elif self.guard is not None and self.guard.active:  # the guard needs the norm even when nothing is clipped
            grad_norm = total_norm([p.grad for p in self.model.parameters() if p.grad is not None], self.ctx.device)
        # The gradients were all-reduced: the norm, and so this decision, is the same on every rank.
        culprit = partial(self._diverged_buffer, loss_sum)  # asked only when the norm is not finite
        if self.guard is not None and self.guard.skips(grad_norm, self.step, self.paths, culprit):
            self.optimizer.zero_grad(set_to_none=True)  # the step's samples are consumed; the weights stay
            self.guard.restore_buffers(self.model, buffers)  # and so do BatchNorm's statistics of that forward
            self.reporter.note(nonfinite_skipped=float(self.guard.skipped))
            return loss_sum, grad_norm, data_wait
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return loss_sum, grad_norm, data_wait

    def _autocast(self) -> Any:
        # A sharded model computes in its MixedPrecisionPolicy's dtype (workers.parallel): no autocast around it.
        return autocast_for("fp32" if self.sharded else self.cfg.train.precision, self.ctx.device)

    def save(self, blocking: bool = True) -> Path:
        """Collective checkpoint of the current step. Must be called on all ranks.

        ``blocking=False`` lets an async checkpointer commit in the background (see Checkpointer.save).
        """
        t0 = time.perf_counter()
        self._check_finite_state()
        if self.sync is not None:  # the rows up to this step are written before the checkpoint that ends them exists
            self.sync.flush()
        state = TrainState(
            step=self.step,
            samples_seen=self.step * self.plan.global_batch_size,
            world_size=self.ctx.world_size,
            global_batch_size=self.plan.global_batch_size,
            seed=self.cfg.train.seed,
            max_steps=self.cfg.train.max_steps,
            task=self.cfg.task.factory,
            tracking_run_id=self.tracker.run_id,
            dataset_len=len(self.task.dataset),
            task_args=dict(self.cfg.task.args),
            torch=torch.__version__,
            time=time.time(),
            optimizer=type(self.optimizer).__name__,
            selection=self._selection_state(),
            nonfinite_skipped=self.guard.skipped if self.guard else None,
            nonfinite_streak=self.guard.streak if self.guard else None,
            parallel=self.cfg.train.parallel,
        )
        final = self.step >= self.cfg.train.max_steps or (self.selection is not None and self.selection.should_stop)
        export = {"every": True, "final": final, "never": False}[self.cfg.train.export_model]
        # The wrapped module goes in: the checkpointer peels DDP / torch.compile itself, whatever it is given.
        folder = self.ckpt.save(
            self.step, self.wrapped, self.optimizer, self.scheduler, self.scaler, state, blocking=blocking,
            keep_also=self.selection.protected_steps if self.selection else frozenset(),
            best_step=self.selection.best_step if self.selection else None, export_model=export,
        )  # fmt: skip
        blocked = time.perf_counter() - t0
        done = "committed" if blocking or not self.cfg.train.async_checkpoint else "snapshot taken, writing"
        log.info("checkpoint %s %s; training blocked %.3f s", folder.name, done, blocked)
        self.reporter.note(ckpt_blocked_s=round(blocked, 6), ckpt_save_s=round(self.ckpt.last_commit_s, 6))
        return folder

    # ------------------------------------------------------------ numerics (README.md, "Non-finite steps")

    def _check_finite_state(self) -> None:
        """No checkpoint with NaN/inf weights is ever committed (retention would then delete the good ones), nor with
        a buffer that was finite at the last save (or the start) and is not now: a diverged running statistic. A
        buffer that is NaN/inf by design (a -inf causal mask) was never finite, so it is saved as it is. Raises
        NonFiniteError on every rank together. Must be called on all ranks."""
        bad, finite = self._finite_state()
        if bad is None:
            self.buffer_watch.update(finite, f"the last checkpoint, {step_dir_name(self.step)}")
            return
        if bad in self.buffer_watch.names:
            raise NonFiniteError(
                f"the buffer '{bad}' is not finite at step {self.step} (it was finite at {self.buffer_watch.since}): "
                f"not saved; {last_good(self.paths)}. HINT: find the samples with data.record_indices=true (inputs "
                "large enough to overflow a running statistic, e.g. BatchNorm's running_var); train.nonfinite=skip "
                "skips the step that makes a buffer diverge"
            )
        raise NonFiniteError(
            f"the weights are not finite at step {self.step} ('{bad}' holds NaN/inf): not saved; "
            f"{last_good(self.paths)}. HINT: lower optim.lr, set train.grad_clip, keep train.nonfinite=skip"
        )

    def _finite_state(self) -> tuple[str | None, list[bool]]:
        """(the first floating-point parameter, or watched buffer, that holds NaN/inf, or None; per buffer of
        ``self.buffer_watch.all``, whether it is finite) — the same on every rank. Not sharded: rank 0's state is
        what a save writes, so rank 0 looks and broadcasts (one collective). Sharded: every rank looks at its shards
        and its own buffers, one all-reduce. Must be called on all ranks."""
        params = [(n, p) for n, p in unwrap(self.model).named_parameters() if p.is_floating_point()]
        tensors = [p for _, p in params] + self.buffer_watch.tensors(self.buffer_watch.all)
        if self.sharded:
            flags = nonfinite_anywhere(tensors, self.ctx)
        else:
            mine = [b > 0 for b in nonfinite_mask(tensors).tolist()] if self.ctx.is_main and tensors else []
            flags = self.ctx.broadcast_object(mine)  # (only rank 0's is sent)
        param_flags, buffer_flags = flags[: len(params)], flags[len(params) :]
        watched = self.buffer_watch.names
        bad = next((n for (n, _), b in zip(params, param_flags, strict=True) if b), None)
        if bad is None:
            named = zip(self.buffer_watch.all, buffer_flags, strict=True)
            bad = next((n for (n, _, _), b in named if b and n in watched), None)
        return bad, [not b for b in buffer_flags]

    def _watch_buffers(self) -> None:
        """Start the buffer checks: the buffers finite now (after a resume or ``train.init_from``) are watched."""
        self.buffer_watch = WatchedBuffers(unwrap(self.model))
        _, finite = self._finite_state()  # (non-finite weights now: the first save names them)
        since = f"the last checkpoint, {step_dir_name(self.step)}" if self.step else "the start of the run"
        self.buffer_watch.update(finite, since)

    def _alarmed(self, loss: torch.Tensor) -> torch.Tensor:
        """``loss``, times NaN when a watched buffer holds NaN/inf (times exactly 1.0 otherwise: the same gradients,
        bit for bit). Only with the guard on: without it, the save check is what refuses such a buffer."""
        alarm = self.buffer_watch.alarm() if self.guard is not None and self.guard.active else None
        return loss if alarm is None else loss * alarm.to(loss.dtype)

    def _diverged_buffer(self, loss: torch.Tensor) -> str | None:
        """Why this step's grad norm is not finite, when it is a buffer: the first watched buffer that holds NaN/inf
        on some rank now (its forward made it so: it was finite before the step), provided no rank's loss was
        NaN/inf (then the gradients were too, and they are named as before). The same on every rank: one
        all-reduce, on the rare non-finite path only (every rank is on it: the decision rests on the all-reduced
        norm). Must be called on all ranks."""
        watched = self.buffer_watch.watched
        if not watched:  # the same on every rank
            return None
        flags = nonfinite_mask([loss, *self.buffer_watch.tensors(watched)]).to(self.ctx.device)
        counts = self.ctx.all_reduce_sum(flags).tolist()
        if counts[0]:
            return None
        return next((name for (name, _, _), c in zip(watched, counts[1:], strict=True) if c), None)

    def _check_finite_lr(self) -> None:
        """A NaN/inf learning rate is the schedule's (or the optimizer's) problem, not the data's: named as such before
        the step uses it (it would make every weight NaN). Host-side, no sync; the same on every rank (every rank
        steps the same schedule), so every rank raises NonFiniteError at the same step."""
        found = first_nonfinite_lr(self.optimizer)
        if found is None:
            return
        group, lr = found
        if self.optim.task_scheduler:
            at = getattr(self.scheduler, "last_epoch", self.step)
            source = "the task's scheduler(optimizer, max_steps)"
            hint = f"check what the task's scheduler computes at its step {at} (a NaN factor, a division by zero)"
        elif self.optim.task_optimizer:
            source = "the task's optimizer(model) (the group's lr, times the built-in schedule)"
            hint = "give every parameter group of the task's optimizer a finite lr"
        else:
            source = "optim.lr and the built-in schedule"
            hint = "check optim.lr, optim.warmup_steps and optim.schedule"
        raise NonFiniteError(
            f"the learning rate is not finite at step {self.step + 1}: param group {group} has lr {lr}, as set by "
            f"{source}; the step was not taken; {last_good(self.paths)}. HINT: {hint}"
        )
