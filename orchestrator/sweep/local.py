"""A sweep's trials on this machine: one after another, or ``--parallel K`` at once with the devices split between
them (GPUs: disjoint ``CUDA_VISIBLE_DEVICES``; CPU: disjoint cores, by affinity). Each trial is an ordinary
``orchestrator launch`` of its run dir ``DIR/<trial id>/`` — preemptible, resumed exactly — so a sweep that stops
(Ctrl-C, a kill) continues where it was when the same command runs again: finished and pruned trials are left
alone, an interrupted one resumes, pending ones start. A failed trial is recorded and the sweep goes on."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from orchestrator.sweep.report import DONE, PRUNED, best_metric, pruned_numbers, trial_info
from orchestrator.sweep.spec import SweepSpec
from orchestrator.sweep.store import STUDY, SweepDir, SweepState, Trial, open_study
from workers.config import ConfigError
from workers.contract import ENV_SWEEP_TRIAL, EXIT_FAILED, EXIT_OK, EXIT_USAGE
from workers.rundir import RunDir

log = logging.getLogger("orchestrator")
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def device_groups(parallel: int, nproc: int = 1) -> list[dict[str, Any]]:
    """How ``parallel`` trials at once split this machine: per trial, ``{"gpus": "0,1"}`` or ``{"cores": {..}}``.
    ConfigError when there are fewer devices than trials, or (GPUs) fewer per trial than ``nproc`` workers."""
    if parallel < 1:
        raise ConfigError(f"--parallel {parallel}: must be at least 1")
    gpus = _gpus()
    devices = gpus or sorted(os.sched_getaffinity(0))
    if gpus and len(gpus) // parallel < nproc:
        raise ConfigError(f"--parallel {parallel} x --nproc {nproc}: each trial needs {nproc} GPU(s) and {len(gpus)} "
                          f"are visible. HINT: --parallel {max(1, len(gpus) // nproc)}")  # fmt: skip
    if parallel > len(devices):
        what = f"{len(gpus)} GPU(s)" if gpus else f"{len(devices)} CPU core(s)"
        raise ConfigError(f"--parallel {parallel}: more trials at once than the {what} here. HINT: use at most "
                          f"--parallel {len(devices)}")  # fmt: skip
    groups = [devices[i::parallel] for i in range(parallel)]
    if gpus:
        return [{"gpus": ",".join(map(str, g))} for g in groups]
    return [{"cores": set(g)} for g in groups]


def _gpus() -> list[str]:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [d for d in visible.split(",") if d.strip() and d.strip() != "-1"]
    try:
        return [str(i) for i in range(len(os.listdir("/proc/driver/nvidia/gpus")))]
    except OSError:
        return []


def unfinished(sdir: SweepDir, state: SweepState) -> list[Trial]:
    """The trials still to run: neither done nor pruned (pending, failed, interrupted)."""
    pruned = pruned_numbers(sdir)
    return [t for t in state.trials if trial_info(t, sdir, state, pruned)["state"] not in (DONE, PRUNED)]


def trial_env(spec: SweepSpec, sdir: SweepDir, trial: Trial) -> dict[str, str]:
    """What makes a run a trial of this sweep: the journal, the trial, the metric (workers.eval.pruning); the
    sweep's DIR, the trial's id and overrides (its wandb run's config: workers.tracking.wandb_run)."""
    return {ENV_SWEEP_TRIAL: json.dumps({
        "journal": str(sdir.journal.resolve()), "study": STUDY, "number": trial.number, "metric": spec.metric,
        "prune": spec.prune is not None, "dir": str(sdir.root.resolve()), "trial": trial.id,
        "overrides": trial.overrides,
    })}  # fmt: skip


def group_override(spec: SweepSpec, sdir: SweepDir) -> list[str]:
    """wandb: one group per sweep (unless the config names its own)."""
    cfg = spec.config_of({}, sdir.trial_dir("probe"))
    return [] if cfg.tracking.group else [f"tracking.group={sdir.root.resolve().name}"]


class LocalSweep:
    """Runs the sweep's unfinished trials to their end (or until a stop request)."""

    def __init__(self, spec: SweepSpec, sdir: SweepDir, state: SweepState, nproc: int, parallel: int) -> None:
        self.spec, self.sdir, self.state, self.nproc = spec, sdir, state, nproc
        self.groups = device_groups(parallel, nproc)
        self.group_of_sweep = group_override(spec, sdir)  # (every trial's; built once)
        self.stopping = False

    def run(self) -> int:
        todo = unfinished(self.sdir, self.state)
        log.info("sweep %s: %d trial(s), %d to run", self.sdir.root, len(self.state.trials), len(todo))
        running: dict[int, tuple[Trial, subprocess.Popen]] = {}  # device group -> its trial
        usage_error = False
        with self._stop_requests(running):
            while (todo and not self.stopping and not usage_error) or running:
                for group in [g for g in range(len(self.groups)) if g not in running]:
                    if todo and not self.stopping and not usage_error:
                        trial = todo.pop(0)
                        # (a stop request waits until the new trial is registered: it is then passed on to it)
                        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
                        try:
                            running[group] = (trial, self._start(trial, self.groups[group]))
                        finally:
                            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
                for group, (trial, proc) in list(running.items()):
                    if proc.poll() is not None:
                        del running[group]
                        usage_error |= self._finished(trial, proc.returncode)
                time.sleep(0.1)
        if usage_error:
            return EXIT_USAGE
        if self.stopping:
            log.warning("sweep stopped; the same command continues it (finished trials are kept)")
            return EXIT_OK
        return EXIT_FAILED if self.state.failed else EXIT_OK

    def _start(self, trial: Trial, group: dict[str, Any]) -> subprocess.Popen:
        overrides = self.spec.trial_overrides(trial.overrides, self.sdir.trial_dir(trial.id), self.group_of_sweep)
        cmd = [sys.executable, "-m", "orchestrator", "launch", str(self.spec.config), "--nproc", str(self.nproc),
               *overrides]  # fmt: skip
        env = {**os.environ, **trial_env(self.spec, self.sdir, trial)}
        if "gpus" in group:
            env["CUDA_VISIBLE_DEVICES"] = group["gpus"]
        cores = group.get("cores")
        shown = " ".join(f"{k}={v}" for k, v in trial.overrides.items())
        log.info("trial %s: %s", trial.id, shown or "(the base config)")
        # The trial shares the sweep's process group: a terminal's Ctrl-C reaches its launcher directly.
        proc = subprocess.Popen(cmd, env=env)
        if cores:  # at once, while the interpreter starts: every process the launch starts later inherits it
            os.sched_setaffinity(proc.pid, cores)
        return proc

    def _finished(self, trial: Trial, code: int) -> bool:
        """Record how the trial ended; True for a usage error (the sweep stops: the others would repeat it)."""
        if code == EXIT_OK:
            self.state.failed.pop(trial.id, None)
            if trial_info(trial, self.sdir, self.state, set())["state"] == DONE:  # (not a trial stopped on request)
                self._tell(trial)
        elif code == EXIT_USAGE:
            log.error("trial %s: a usage error (above); the sweep stops: the other trials would meet it too", trial.id)
        elif not self.stopping:
            self.state.failed[trial.id] = f"exit code {code}"
            log.error("trial %s failed (exit code %d); the sweep goes on", trial.id, code)
        self.state.save(self.sdir)
        return code == EXIT_USAGE

    def _tell(self, trial: Trial) -> None:
        """A finished trial's value goes to Optuna (a pruned one was told by its own rank 0)."""
        from optuna.trial import TrialState  # noqa: PLC0415

        study = open_study(self.spec, self.sdir)
        frozen = next(t for t in study.get_trials(deepcopy=False) if t.number == trial.number)
        metric = best_metric(RunDir(self.sdir.trial_dir(trial.id)), self.spec.metric, self.spec.mode)
        if frozen.state == TrialState.RUNNING and metric is not None:
            study.tell(trial.number, metric["value"])

    @contextmanager
    def _stop_requests(self, running: dict[int, tuple[Trial, subprocess.Popen]]) -> Iterator[None]:
        """SIGINT/SIGTERM/SIGHUP: no new trial starts; the running ones are asked to stop (they save) and the
        sweep ends when they have. A terminal's Ctrl-C reaches the trials directly; a signal to the sweep alone
        is passed on."""

        def handle(signum: int, _frame: Any) -> None:
            self.stopping = True
            for _, proc in running.values():
                with contextlib.suppress(ProcessLookupError):  # (it may have just ended)
                    os.kill(proc.pid, signum)

        old = {s: signal.signal(s, handle) for s in STOP_SIGNALS}
        try:
            yield
        finally:
            for s, h in old.items():
                signal.signal(s, h)
