"""Worker entry points: every way a worker process starts is here, and every one ends in :func:`run_worker`.

- our local launcher: :func:`spawned_worker` (module-level, so torch.multiprocessing can pickle it);
- SLURM through submitit: :class:`SlurmJob` (pickled by reference);
- torchrun / srun / plain python: ``python -m workers CONFIG.yaml [key=value ...]`` → :func:`main`.

A worker reports failure as data: on an exception it writes an :class:`~workers.contract.ErrorRecord` to its error
file (the launcher names it; under SLURM ``RunDir.error_file(rank)``; under torchrun also torchrun's own error file,
``TORCHELASTIC_ERROR_FILE``, in torchrun's format) and exits 1 (2 for a usage error).

Top layer of the workers package: imports the trainer lazily (torch stays unloaded for ``--help`` and config
errors); must not import the launch side (``orchestrator``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import traceback
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from workers import slurm_job as slurm
from workers.config import Config, config_from_dict, load_config, plan_batches
from workers.contract import (
    ENV_LAUNCHER,
    ENV_SLOT,
    ENV_TORCHELASTIC_ERROR_FILE,
    EXIT_FAILED,
    EXIT_OK,
    EXIT_USAGE,
    ErrorRecord,
)
from workers.errors import UsageError
from workers.lifeline import Ties, forget_fork_server
from workers.logsetup import CONSOLE_ONLY, FILE_ONLY, register_stack_dumps, setup_logging
from workers.preflight import lock_run_dir, preflight, save_resolved_config
from workers.rundir import RunDir
from workers.stop import StopFlag, die_with_parent

if typing.TYPE_CHECKING:
    from workers.dist import DistContext

log = logging.getLogger("workers")


@dataclass(frozen=True)
class WorkerStart:
    """What the code that started this worker knows and hands to :func:`run_worker` (never via the environment)."""

    error_file: Path | None = None  # where to write the error record on failure (the launcher reads it)
    torchelastic_error_file: Path | None = None  # torchrun's per-rank error file, written in torchrun's format
    heartbeat_file: Path | None = None  # watched by our launcher; None: nobody watches
    counts: tuple[tuple[str, float], ...] = (("restarts", 0.0),)  # restarts so far, for the metrics rows
    owns_run_dir: bool = True  # no launcher locked the run dir and wrote its config: rank 0 does
    print_usage_errors: bool = True  # rank 0 prints a usage error as one line (our launcher prints it itself)
    report_pipe: Any = None  # our launcher's pipe: the error record reaches it even when no file can be written


def _diagnostics(paths: RunDir, rank: int, backend: str) -> None:
    """What a hang report reads from this rank: its own stack dump on the stacks signal (where py-spy cannot read
    it), and on NCCL torch's flight recorder (the last collectives, dumped on a timeout into the logs folder)."""
    register_stack_dumps(paths, rank)
    if backend == "nccl":
        for key, value in (("TORCH_NCCL_TRACE_BUFFER_SIZE", "2000"), ("TORCH_NCCL_DUMP_ON_TIMEOUT", "1"),
                           ("TORCH_FR_DUMP_TEMP_FILE", str(paths.nccl_trace_prefix))):  # fmt: skip
            os.environ.setdefault(key, value)  # read when the process group starts; a user's own values win


def run_worker(cfg: Config, stop: StopFlag, start: WorkerStart) -> int:
    """Train on this process's rank. Returns an exit code; never raises.

    Must be called on all ranks of the job (it joins the process group and takes part in collectives).
    Callers install ``stop`` as early as they can, so a signal during the slow imports is a graceful stop.
    """

    from workers.dist import DistContext, check_precision  # noqa: PLC0415
    from workers.heartbeat import NoHeartbeat  # noqa: PLC0415
    from workers.train.trainer import Trainer  # noqa: PLC0415

    paths = RunDir(cfg.run.dir)
    rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))
    ctx, heartbeat, lock = None, NoHeartbeat(), None
    try:
        ctx = DistContext.from_env(cfg.launch.device)
        rank = ctx.rank
        plan_batches(cfg, ctx.world_size)  # a bad combination fails before anything is written
        check_precision(cfg.train.precision, ctx.device.type)
        _set_up_process(cfg, ctx)
        if ctx.is_main and start.owns_run_dir:
            lock = lock_run_dir(paths)
            save_resolved_config(cfg, paths)
        setup_logging(paths, rank)
        if ctx.source == "slurm" and ctx.is_main and not slurm.on_start(cfg, paths, ctx.world_size):
            return EXIT_FAILED  # a lost node spent the job's restarts (recorded): the other ranks end with the step
        heartbeat = _watch(cfg, paths, ctx, start).start()
        _diagnostics(paths, rank, ctx.backend)
        ctx.init_process_group(cfg.launch.collective_timeout_s)
        result = Trainer(cfg, ctx, paths, stop, heartbeat, dict(start.counts)).fit()
        ctx.barrier()
        log.info("done at step %d%s", result.step, _stop_note(result.stopped_early, stop))
        if ctx.source == "slurm" and ctx.is_main:  # every rank has saved: now rank 0 may requeue the job
            return slurm.on_finish(cfg, paths, stop, result.step, result.stop_reason)
        return EXIT_OK
    except UsageError as exc:
        _report(start, ErrorRecord.from_exception(rank, exc, slurm.job_id()))
        if start.print_usage_errors and rank == 0:  # one line, not one per rank
            print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except BaseException as exc:
        record = ErrorRecord.from_exception(rank, exc, slurm.job_id())
        _report(start, record)
        _log_failure(record, start)
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


def should_watch_itself(cfg: Config, ctx: DistContext, start: WorkerStart) -> bool:
    """Whether this rank runs its own hang watch (workers.selfwatch): where no launcher of ours watches it (no
    heartbeat file) and a hang can only be a group's — a torchrun or SLURM group of two ranks or more, with
    ``launch.hang_timeout_s`` on — and never under a debugger (``sys.gettrace()``), whose breakpoints stop a rank
    for as long as the user looks."""
    return (
        start.heartbeat_file is None and cfg.launch.hang_timeout_s > 0 and ctx.source in ("torchrun", "slurm")
        and ctx.world_size > 1 and sys.gettrace() is None
    )  # fmt: skip


def _watch(cfg: Config, paths: RunDir, ctx: DistContext, start: WorkerStart) -> Any:
    """This rank's progress watch: the heartbeat file our launcher reads, or — where no launcher of ours watches
    (SLURM, torchrun) — the rank's own watch (workers.selfwatch), which reports a hang with its stacks and ends it."""
    from workers.heartbeat import heartbeat_for  # noqa: PLC0415
    from workers.selfwatch import SelfWatch  # noqa: PLC0415

    if not should_watch_itself(cfg, ctx, start):
        return heartbeat_for(start.heartbeat_file, ctx.rank)
    attempt = int(dict(start.counts).get("restarts", 0))
    return SelfWatch(
        paths, ctx.rank, attempt, cfg.launch.hang_timeout_s, lambda message: hang_exit(start, ctx.rank, message)
    )


def hang_exit(start: WorkerStart, rank: int, message: str) -> typing.NoReturn:
    """End a rank whose own watch found it hung: its error record (a HangError), then ``os._exit`` — called on
    the watch's thread while the hung thread may hold any lock (a logging handler's, a buffered file's), so the
    record is written with os-level calls only, a failure to write it is one line on fd 2, and nothing is logged,
    flushed or torn down (``exit_now`` would: ``logging.shutdown`` takes every handler's lock)."""
    from workers.selfwatch import HangError, say  # noqa: PLC0415

    record = ErrorRecord.from_exception(rank, HangError(message), slurm.job_id())
    for path, write in ((start.error_file, record.write), (start.torchelastic_error_file, record.write_torchelastic)):
        if path is None:
            continue
        try:
            write(path, raw=True)
        except OSError as exc:  # a full or read-only disk: the watch's line on stderr has said where the rank is
            say(f"rank {rank}: could not write the error record {path}: {exc}")
    os._exit(EXIT_FAILED)


def _log_failure(record: ErrorRecord, start: WorkerStart) -> None:
    """A known failure (non-finite, disk, checkpoint) is one line on the console — none under our launcher, which
    reports it once for the group — and its traceback goes to the rank's log file only; anything else is logged
    with its traceback."""
    if not record.kind.known:
        log.error("rank %d failed:\n%s", record.rank, record.traceback)
        return
    if start.print_usage_errors:
        log.error("rank %d failed: %s", record.rank, record.detail, extra=CONSOLE_ONLY)
    log.error("rank %d failed:\n%s", record.rank, record.traceback, extra=FILE_ONLY)


def _report(start: WorkerStart, record: ErrorRecord) -> None:
    """Write the error record where the starter asked (ours, and torchrun's in its own format)."""
    if start.report_pipe is not None:
        with contextlib.suppress(OSError, ValueError):
            start.report_pipe.send_bytes(record.to_json().encode())
    for path, write in ((start.error_file, record.write), (start.torchelastic_error_file, record.write_torchelastic)):
        if path is None:
            continue
        try:
            write(path)
        except OSError as exc:  # a full or read-only disk: the message still reaches stderr and the log
            log.error("could not write the error record %s: %s", path, exc)


# ---------------------------------------------------------------- our local launcher


def spawned_worker(
    cfg_dict: dict[str, Any],
    rank: int,
    world_size: int,
    port: int,
    parent_pid: int,
    attempt: int,
    report_pipe: Any = None,
    ties: Ties | None = None,
    slots: tuple[int, ...] | None = None,
) -> None:
    """Entry of a worker started by the local launcher (picklable: module-level).

    ``slots``: the device slot of every rank of the group (default: rank r on slot r); this rank's is its
    ``ORCH_SLOT``. ``CUDA_VISIBLE_DEVICES`` lists the group's devices only (none of a dropped slot), so the local
    rank indexes them (set before anything touches CUDA: the fork server never does).

    ``parent_pid``: the launcher's fork server (it dies with the launcher, and the worker with it); 0: unknown,
    watch whichever process forked this one. ``ties``: the launcher's lifeline and run-dir lock
    (:mod:`workers.lifeline`): the worker ends the moment its launcher does.
    """
    stop = StopFlag().install()  # first: a stop request during start-up is then a graceful one
    _keep_ties(ties, parent_pid)
    # The torch.distributed contract, read by DistContext and the env:// rendezvous.
    os.environ.update({
        "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size),
        "LOCAL_WORLD_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
        ENV_LAUNCHER: "launcher",
    })  # fmt: skip
    _take_slot(rank, slots or tuple(range(world_size)))
    cfg = config_from_dict(cfg_dict)
    paths = RunDir(cfg.run.dir)
    start = WorkerStart(
        error_file=paths.error_file(rank), heartbeat_file=paths.heartbeat_file(rank),
        counts=(("restarts", float(attempt)),), owns_run_dir=False, print_usage_errors=False, report_pipe=report_pipe,
    )  # fmt: skip
    exit_now(run_worker(cfg, stop, start))


def _set_up_process(cfg: Config, ctx: DistContext) -> None:
    """This process's slot (torchrun, srun: the local rank), threads and determinism, before any work."""
    import torch  # noqa: PLC0415 - the entry stays torch-free until a worker runs

    from workers.dist import cpu_threads_per_worker  # noqa: PLC0415

    os.environ.setdefault(ENV_SLOT, str(ctx.local_rank))
    torch.set_num_threads(cpu_threads_per_worker(ctx.local_world_size, slurm=ctx.source == "slurm"))
    if cfg.train.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read when cuBLAS initialises
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False


def _take_slot(rank: int, slots: tuple[int, ...]) -> None:
    """This rank's ``ORCH_SLOT``, and ``CUDA_VISIBLE_DEVICES`` naming the group's devices only (see
    :func:`spawned_worker`)."""
    os.environ[ENV_SLOT] = str(slots[rank])
    os.environ["CUDA_VISIBLE_DEVICES"] = group_devices(slots, os.environ.get("CUDA_VISIBLE_DEVICES"))


def group_devices(slots: tuple[int, ...], visible: str | None) -> str:
    """The ``CUDA_VISIBLE_DEVICES`` of a group on ``slots`` (rank r's device is the r-th): the devices the launch
    saw (``visible``, None: all, numbered from 0) at those slots only, so a dropped slot's device is left out —
    the highest one too. An empty ``visible`` (no GPU on purpose) stays empty."""
    devices = [d.strip() for d in visible.split(",") if d.strip()] if visible is not None else None
    if devices is None:
        return ",".join(str(s) for s in slots)
    return ",".join(devices[s] for s in slots if s < len(devices))


def _stop_note(stopped: bool, stop: StopFlag) -> str:
    """How a run that left before ``train.max_steps`` on a request was stopped, naming the real signal (never
    "stopped early": that is early stopping on the eval metric)."""
    if not stopped:
        return ""
    return f" — stopped on request ({stop.signal_name or 'by another rank'}); the same command resumes it"


def _keep_ties(ties: Ties | None, parent_pid: int) -> None:
    """A local worker's first act after its stop flag: keep its ties to the launcher; end at once if the fork
    server (so the launcher) died before ``PR_SET_PDEATHSIG`` took effect."""
    if ties is not None:
        ties.keep()
    else:
        forget_fork_server()
    if not die_with_parent(parent_pid or os.getppid()):
        os._exit(EXIT_FAILED)


def eval_worker(
    cfg_dict: dict[str, Any],
    weights: str,
    rank: int,
    world_size: int,
    port: int,
    parent_pid: int,
    conn: Any,
    ties: Ties | None = None,
) -> None:
    """Entry of a worker started by ``orchestrator eval`` (picklable: module-level). Evaluates ``weights`` on its
    share of the eval set and sends one message back over ``conn``: ``{"ok": True, "result": {...}}`` (rank 0's
    holds the numbers) or ``{"ok": False, "usage": bool, "error": str}``. Logs to the console only: it writes
    nothing anywhere."""
    StopFlag().install()  # a Ctrl-C reaches the whole group: the parent ends the workers itself
    _keep_ties(ties, parent_pid)
    os.environ.update({
        "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size),
        "LOCAL_WORLD_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
        ENV_LAUNCHER: "eval",
    })  # fmt: skip
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format=f"[eval rank {rank}] %(message)s")
    exit_now(_evaluate_and_report(config_from_dict(cfg_dict), Path(weights), conn))


def _evaluate_and_report(cfg: Config, weights: Path, conn: Any) -> int:
    import torch  # noqa: PLC0415 - the worker's own import

    from workers.dist import DistContext, cpu_threads_per_worker  # noqa: PLC0415
    from workers.eval.job import evaluate_weights  # noqa: PLC0415

    ctx = None
    try:
        ctx = DistContext.from_env(cfg.launch.device)
        torch.set_num_threads(cpu_threads_per_worker(ctx.local_world_size))
        ctx.init_process_group(cfg.launch.collective_timeout_s)
        result = evaluate_weights(cfg, weights, ctx)
        ctx.barrier()
        conn.send({"ok": True, "result": {"samples": result.samples, "metrics": result.metrics}})
        return EXIT_OK
    except UsageError as exc:
        conn.send({"ok": False, "usage": True, "error": str(exc)})
        return EXIT_USAGE
    except BaseException as exc:
        conn.send({"ok": False, "usage": False, "error": "".join(traceback.format_exception(exc)).strip()})
        return EXIT_FAILED
    finally:
        if ctx is not None:
            with contextlib.suppress(Exception):
                ctx.destroy()


# ---------------------------------------------------------------- SLURM


class SlurmJob:
    """What submitit runs in every task of a job. Pickled by reference (a module-level class holding a plain
    dict), so the job needs only this package on the nodes."""

    def __init__(self, cfg_dict: dict[str, Any]) -> None:
        self.cfg_dict = cfg_dict

    def __call__(self) -> typing.NoReturn:
        # Replaces submitit's handlers: its USR2 handler would checkpoint on rank 0 alone, inside the handler,
        # and its SIGTERM handler ignores the signal. Ours only set the flag that all ranks agree on.
        stop = StopFlag().install()
        # Leave at once, without returning to submitit: the job's outcome is in run.dir (events, error files),
        # not in submitit's result pickle, and interpreter teardown after the process group can abort.
        cfg = config_from_dict(self.cfg_dict)
        exit_now(run_worker(cfg, stop, _slurm_start(RunDir(cfg.run.dir))))


class SlurmSweepTrial(SlurmJob):
    """A sweep's trial as one task of the sweep's SLURM array: its config, and the variables that make it a trial
    of that sweep (``ORCH_SWEEP_TRIAL``: the pruner's journal and trial number)."""

    def __init__(self, cfg_dict: dict[str, Any], env: dict[str, str]) -> None:
        super().__init__(cfg_dict)
        self.env = env

    def __call__(self) -> typing.NoReturn:
        os.environ.update(self.env)
        super().__call__()


def _slurm_start(paths: RunDir) -> WorkerStart:
    """A task of a SLURM job: no launcher names its error file, so it is ``RunDir.error_file(rank)``; a stale one
    from an earlier incarnation of the job is removed first (a requeue must not look failed)."""
    rank = int(os.environ.get("SLURM_PROCID", "0"))
    path = paths.error_file(rank)
    with contextlib.suppress(OSError):
        path.unlink(missing_ok=True)
    counts = slurm.restart_counts(paths)
    return WorkerStart(error_file=path, counts=tuple(counts.items()), owns_run_dir=True)


# ---------------------------------------------------------------- torchrun, srun, a plain process


def exit_now(code: int) -> typing.NoReturn:
    """Flush logs and output, then leave without interpreter teardown: after the process group is gone, the
    destructors of torch's communication threads can abort the process ("terminate called without an active
    exception") and turn a clean finish into a crash. Every worker entry ends here."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _plain_start(paths: RunDir) -> WorkerStart:
    """``python -m workers`` under srun (a task of a SLURM job), torchrun, or alone."""
    if "SLURM_PROCID" in os.environ and "RANK" not in os.environ:
        return _slurm_start(paths)
    torchelastic = os.environ.get(ENV_TORCHELASTIC_ERROR_FILE)  # torchrun's summary then names our root cause
    restarts = float(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)  # torchrun's --max-restarts count
    return WorkerStart(
        torchelastic_error_file=Path(torchelastic) if torchelastic else None, counts=(("restarts", restarts),)
    )


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
        paths = RunDir(cfg.run.dir)
        preflight(cfg, paths, int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", "1"))))
    except UsageError as exc:
        if os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) == "0":  # one line, not one per rank
            print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    return run_worker(cfg, stop, _plain_start(paths))
