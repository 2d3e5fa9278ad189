"""Worker entry points. Every launch path ends in :func:`run_worker`.

- our local launcher: :func:`spawned_worker` (module-level, so torch.multiprocessing can pickle it);
- torchrun / srun / plain python: ``python -m workers CONFIG.yaml [key=value ...]`` → :func:`main`.

A worker reports failure as data: on an exception it writes ``{rank, kind, message, traceback, time}`` as JSON to
the file named by ``ORCH_ERROR_FILE`` (when set) and exits 1 (2 for a config error).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import sys
import time
import traceback
import typing
from pathlib import Path
from typing import Any

from workers import slurm
from workers.config import (
    Config,
    ConfigError,
    check_resume_compatible,
    config_from_dict,
    dump_config,
    load_config,
    plan_batches,
)
from workers.fsutil import RunDirLock, atomic_write
from workers.heartbeat import HEARTBEAT_DIR_ENV
from workers.stop import StopFlag, die_with_parent

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
ERROR_FILE_ENV = "ORCH_ERROR_FILE"
log = logging.getLogger("workers")


def setup_logging(run_dir: Path, rank: int) -> None:
    """Rank-prefixed lines to ``logs/rank-<r>.log``; rank 0 also to the console (stderr)."""
    fmt = logging.Formatter(f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
    root = logging.getLogger()
    root.handlers.clear()
    root.setLevel(logging.INFO)
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    handler: logging.Handler = logging.FileHandler(run_dir / "logs" / f"rank-{rank}.log")
    handler.setFormatter(fmt)
    root.addHandler(handler)
    if rank == 0:
        console = logging.StreamHandler(sys.stderr)
        console.setFormatter(fmt)
        root.addHandler(console)


def write_error_file(rank: int, exc: BaseException, kind: str) -> None:
    path = os.environ.get(ERROR_FILE_ENV)
    if not path:
        return
    record = {
        "rank": rank,
        "kind": kind,
        "message": f"{type(exc).__name__}: {exc}",
        "traceback": "".join(traceback.format_exception(exc)),
        "time": time.time(),
        "job_id": os.environ.get("SLURM_JOB_ID"),  # tells this job's failure from an older job's
    }
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write(Path(path), json.dumps(record))


def preflight(cfg: Config, world_size: int) -> None:
    """Every check that can fail on user input, before anything is written. Raises ConfigError.

    Imports the task factory's module (and so, usually, torch); the config itself was checked without it.
    """
    from workers.tasks import resolve_factory  # noqa: PLC0415

    plan_batches(cfg, world_size)
    if cfg.train.init_from and not Path(cfg.train.init_from).exists():
        raise ConfigError(f"config key 'train.init_from' = {cfg.train.init_from!r}: no such file or folder")
    ckpt_dir = cfg.run_dir / "checkpoints"
    if not cfg.run.resume and ckpt_dir.is_dir() and any(ckpt_dir.glob("step-*")):
        raise ConfigError(
            f"config key 'run.resume' = False but '{ckpt_dir}' already holds checkpoints. "
            "HINT: use a new run.dir, move the checkpoints away, or resume"
        )
    resolve_factory(cfg.task.factory)
    if cfg.run.resume:
        newest = _newest_train_state(ckpt_dir)
        if newest is not None:
            check_resume_compatible(cfg, newest, str(cfg.run_dir))


def _newest_train_state(ckpt_dir: Path) -> dict[str, Any] | None:
    """train_state.json of the newest folder with a manifest (JSON only: no torch, no hashing here)."""
    found = ckpt_dir.glob("step-*/manifest.json") if ckpt_dir.is_dir() else []
    folders = sorted((m for m in found if re.fullmatch(r"step-\d{8}", m.parent.name)), reverse=True)
    for manifest in folders:
        try:
            return json.loads((manifest.parent / "train_state.json").read_text())
        except (OSError, ValueError):
            continue
    return None


def lock_run_dir(cfg: Config) -> RunDirLock:
    """Hold ``run.dir/.lock`` for this launch; ConfigError (exit 2) when another launch holds it."""
    try:
        return RunDirLock(cfg.run_dir).acquire()
    except BlockingIOError as exc:
        raise ConfigError(f"{exc}. HINT: wait for it to end, or use another run.dir") from None


def save_resolved_config(cfg: Config) -> None:
    """Write ``run.dir/config.yaml`` (rank 0; only after the config has been validated)."""
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(cfg.run_dir / "config.yaml", dump_config(cfg))


def _error_kind(exc: BaseException) -> str:
    """``config`` and ``checkpoint`` errors don't heal by restarting; anything else might."""
    from workers.checkpoint import CheckpointError  # noqa: PLC0415 - torch is loaded by now

    if isinstance(exc, ConfigError):
        return "config"
    return "checkpoint" if isinstance(exc, CheckpointError) else "exception"


def run_worker(cfg: Config, stop: StopFlag | None = None) -> int:
    """Train on this process's rank. Returns an exit code; never raises.

    Must be called on all ranks of the job (it joins the process group and takes part in collectives).
    Callers should install ``stop`` as early as they can, so a signal during the slow imports is a graceful stop.
    """
    import torch  # noqa: PLC0415 - keep `python -m workers --help` and config errors torch-free

    from workers.dist import DistContext, check_precision, cpu_threads_per_worker  # noqa: PLC0415
    from workers.heartbeat import NoHeartbeat, heartbeat_from_env  # noqa: PLC0415
    from workers.trainer import Trainer  # noqa: PLC0415

    stop = stop or StopFlag().install()
    rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))
    if "SLURM_PROCID" in os.environ and "RANK" not in os.environ:  # a task of a SLURM job: no launcher names it
        _slurm_error_file(cfg, rank)
    ctx, heartbeat, lock = None, NoHeartbeat(), None
    try:
        ctx = DistContext.from_env(cfg.launch.device)
        rank = ctx.rank
        plan_batches(cfg, ctx.world_size)  # a bad combination fails before anything is written
        check_precision(cfg.train.precision, ctx.device.type)
        torch.set_num_threads(cpu_threads_per_worker(ctx.local_world_size, slurm=ctx.source == "slurm"))
        if cfg.train.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read when cuBLAS initialises
            torch.use_deterministic_algorithms(True)
            torch.backends.cudnn.benchmark = False
        if ctx.is_main and ctx.source != "launcher":  # our launcher already did both
            lock = lock_run_dir(cfg)
            save_resolved_config(cfg)
        setup_logging(cfg.run_dir, rank)
        if ctx.source == "slurm" and ctx.is_main:
            slurm.on_start(cfg, ctx.world_size)
        heartbeat = heartbeat_from_env(rank).start()
        ctx.init_process_group(cfg.launch.collective_timeout_s)
        result = Trainer(cfg, ctx, stop, heartbeat).fit()
        ctx.barrier()
        log.info("done at step %d%s", result.step, " (stopped early)" if result.stopped_early else "")
        if ctx.source == "slurm" and ctx.is_main:  # every rank has saved: now rank 0 may requeue the job
            return slurm.on_finish(cfg, stop, result.step, result.stop_reason)
        return EXIT_OK
    except ConfigError as exc:
        write_error_file(rank, exc, "config")
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except BaseException as exc:
        write_error_file(rank, exc, _error_kind(exc))
        log.error("rank %d failed:\n%s", rank, "".join(traceback.format_exception(exc)))
        if not logging.getLogger().handlers:
            traceback.print_exc()
        return EXIT_FAILED
    finally:
        heartbeat.stop()
        if lock is not None:
            lock.release()
        if ctx is not None:
            with contextlib.suppress(Exception):
                ctx.destroy()


def _slurm_error_file(cfg: Config, rank: int) -> None:
    """Under SLURM no launcher names the error file: use ``logs/error-rank-<r>.json`` and drop a stale one from
    an earlier incarnation of the job (a requeue must not look failed)."""
    path = Path(os.environ.setdefault(ERROR_FILE_ENV, str(cfg.run_dir / "logs" / f"error-rank-{rank}.json")))
    path.unlink(missing_ok=True)


GATE_WAIT, GATE_GO, GATE_ABORT = 0, 1, 2


def spawned_worker(
    cfg_dict: dict[str, Any],
    rank: int,
    world_size: int,
    port: int,
    logs_dir: str,
    launcher_pid: int,
    attempt: int,
    gate: Any = None,
) -> None:
    """Entry of a worker started by the local launcher (picklable: module-level).

    ``gate`` (a shared int, for the first group of a launch): the worker does its slow imports while the launcher
    is still checking the run, then waits for GATE_GO before touching anything; GATE_ABORT (the checks failed) or
    a dead launcher end it without a trace.
    """
    stop = StopFlag().install()  # first: a stop request during start-up is then a graceful one
    if not die_with_parent(launcher_pid):  # the launcher died before prctl took effect
        os._exit(EXIT_FAILED)
    if gate is not None and not _pass_gate(gate, launcher_pid):
        os._exit(EXIT_OK)
    os.environ.update({
        "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size),
        "LOCAL_WORLD_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
        "ORCH_LAUNCHER": "launcher", "ORCH_RESTART_COUNT": str(attempt),
        ERROR_FILE_ENV: str(Path(logs_dir) / f"error-rank-{rank}.json"),
        HEARTBEAT_DIR_ENV: logs_dir,
    })  # fmt: skip
    exit_now(run_worker(config_from_dict(cfg_dict), stop))


def _pass_gate(gate: Any, launcher_pid: int) -> bool:
    """Import what training needs (the slow part of a start), then wait for the launcher's verdict."""
    import torch  # noqa: F401, PLC0415 - warm the imports while the launcher checks the run

    import workers.trainer  # noqa: F401, PLC0415

    while gate.value == GATE_WAIT:
        if os.getppid() != launcher_pid:
            return False
        time.sleep(0.005)
    return gate.value == GATE_GO


def exit_now(code: int) -> typing.NoReturn:
    """Flush logs and output, then leave without interpreter teardown: after the process group is gone, the
    destructors of torch's communication threads can abort the process ("terminate called without an active
    exception") and turn a clean finish into a crash. Every worker entry ends here."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main(argv: list[str] | None = None) -> int:
    """``python -m workers CONFIG.yaml [key=value ...]``: the entry for torchrun, srun or a plain process."""
    stop = StopFlag().install()
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(
            "usage: python -m workers CONFIG.yaml [key.sub=value ...]\n"
            "  (under torchrun: torchrun --nproc-per-node N -m workers CONFIG.yaml ...)"
        )
        return EXIT_OK if argv else EXIT_USAGE
    try:
        cfg = load_config(argv[0], argv[1:])
        preflight(cfg, int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", "1"))))
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    return run_worker(cfg, stop)
