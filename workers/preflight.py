"""Pre-flight: every check that can fail on user input, run before anything is written or any worker trains.

Used by the launch side (``orchestrator launch`` / ``submit``, while prestarted workers wait at their gate) and by
the torchrun / srun entry (:func:`workers.entry.main`). Raises UsageError subclasses only (exit 2, never retried).
Must not import the trainer or the launch side; imports torch only inside :func:`check_devices`.
"""

from __future__ import annotations

import os
from pathlib import Path

from workers.config import Config, check_resume_compatible, dump_config, plan_batches
from workers.contract import TrainState
from workers.errors import CheckpointError, ConfigError, RunDirLockedError
from workers.fsutil import RunDirLock, atomic_write
from workers.rundir import STATE_FILE, RunDir
from workers.tasks import check_factory_args, resolve_factory


def preflight(cfg: Config, paths: RunDir, world_size: int) -> None:
    """Check the batch plan, ``train.init_from``, ``run.resume``, the task factory and resume compatibility.

    Imports the task factory's module (and so, usually, torch); the config itself was checked without it.
    The newest committed folder is read unverified here: whether the run is already past ``train.max_steps`` is
    checked by the workers, at the checkpoint they really resume from.
    """
    cheap_checks(cfg, paths, world_size)
    if not cfg.run.resume and paths.step_folders():
        raise ConfigError(
            f"config key 'run.resume' = False but '{paths.checkpoints}' already holds checkpoints. "
            "HINT: use a new run.dir, move the checkpoints away, or resume"
        )
    check_factory_args(cfg.task.factory, resolve_factory(cfg.task.factory), dict(cfg.task.args))
    if cfg.run.resume:
        newest = newest_train_state(paths)
        if newest is not None:
            check_resume_compatible(cfg, newest, str(paths.root))


def cheap_checks(cfg: Config, paths: RunDir, world_size: int) -> None:
    """The checks that need neither torch nor the task: run before any worker process is started."""
    plan_batches(cfg, world_size)
    check_run_dir(paths)
    if cfg.train.init_from and not Path(cfg.train.init_from).exists():
        raise ConfigError(f"config key 'train.init_from' = {cfg.train.init_from!r}: no such file or folder")


def check_run_dir(paths: RunDir) -> None:
    """``run.dir`` is a folder (or can become one) that this process may write into."""
    try:
        _check_run_dir(paths)
    except OSError as exc:  # e.g. a parent folder this user may not search
        raise ConfigError(f"config key 'run.dir' = '{paths.root}': cannot be used ({exc.strerror or exc})") from None


def _check_run_dir(paths: RunDir) -> None:
    root = paths.root
    if root.is_symlink() and not root.exists():
        raise ConfigError(f"config key 'run.dir' = '{root}': is a symlink to nothing. HINT: fix or remove the link")
    if root.exists() and not root.is_dir():
        raise ConfigError(f"config key 'run.dir' = '{root}': is a file, not a folder. HINT: use another run.dir")
    if root.is_dir():
        _check_holds_no_other_files(paths)
    existing = root
    while not existing.exists():  # the nearest ancestor that exists must be a writable folder
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"config key 'run.dir' = '{root}': '{existing}' is a file, so no folder can be made under it")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(
            f"config key 'run.dir' = '{root}': '{existing}' is not writable (permissions or a read-only file system). "
            "HINT: use a run.dir you can write to"
        )
    for name in (paths.config, paths.checkpoints, paths.logs):
        if name.exists() and not os.access(name, os.W_OK):
            raise ConfigError(f"config key 'run.dir' = '{root}': '{name}' is not writable. HINT: check its permissions")


def _check_holds_no_other_files(paths: RunDir) -> None:
    """An existing ``run.dir`` is empty or a run's own (:meth:`RunDir.holds_a_run`); else ConfigError naming what is
    there. A run writes its config, logs, checkpoints and more into its folder (workers.rundir) and replaces a config
    file there: among a user's own files (a data folder, the home folder, a repository, /etc) it would mix its files
    with theirs and overwrite one of the same name."""
    if paths.holds_a_run():
        return
    entries = sorted(os.listdir(paths.root))
    if not entries:
        return
    shown = ", ".join(entries[:3]) + (f", ... ({len(entries)} entries)" if len(entries) > 3 else "")
    raise ConfigError(
        f"config key 'run.dir' = '{paths.root}': is a folder of other files ({shown}), not a run dir; a run would "
        "write its config, logs and checkpoints among them. HINT: name a new or empty folder, e.g. run.dir=runs/my-run"
    )


def newest_train_state(paths: RunDir) -> TrainState | None:
    """The train state of the newest committed folder whose state reads (no torch, no hashing: the workers verify
    the checkpoint itself when they resume)."""
    for _, folder in paths.committed_folders():
        try:
            return TrainState.read(folder / STATE_FILE)
        except CheckpointError:
            continue
    return None


def check_devices(cfg: Config) -> None:
    """Pre-flight against the hardware: enough GPUs for ``launch.nproc``, fp16 only on CUDA."""
    import torch  # noqa: PLC0415 - only the launcher's check needs it, after the config was checked

    from workers.dist import check_precision  # noqa: PLC0415 - imports torch

    cuda = torch.cuda.is_available() and cfg.launch.device != "cpu"
    if cfg.launch.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("config key 'launch.device' = 'cuda': no CUDA device is visible. HINT: use auto or cpu")
    if cuda and cfg.launch.nproc > torch.cuda.device_count():
        raise ConfigError(
            f"config key 'launch.nproc' = {cfg.launch.nproc}: only {torch.cuda.device_count()} "
            "GPU(s) visible (one worker per GPU). HINT: lower --nproc or set launch.device=cpu"
        )
    check_precision(cfg.train.precision, "cuda" if cuda else "cpu")


def lock_run_dir(paths: RunDir) -> RunDirLock:
    """Hold the run dir's lock for this launch; RunDirLockedError (exit 2) when another launch holds it."""
    try:
        return RunDirLock(paths.lock).acquire()
    except BlockingIOError as exc:
        raise RunDirLockedError(f"{exc}. HINT: wait for it to end, or use another run.dir") from None


def save_resolved_config(cfg: Config, paths: RunDir) -> None:
    """Write the run's resolved config file (only after the config has been validated)."""
    paths.root.mkdir(parents=True, exist_ok=True)
    atomic_write(paths.config, dump_config(cfg))
