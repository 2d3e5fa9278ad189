"""The ``orchestrator`` command line.

``launch`` runs a config locally (``resume`` a run again from its saved config), ``submit`` on SLURM; ``status`` /
``plot`` follow a run, ``stacks`` shows where its ranks are; ``eval`` evaluates saved weights; ``ckpt inspect`` /
``ckpt export`` read checkpoints. Exit codes: 0 done, 1 training failed (the report names the rank that failed
first), 2 usage or config error (one line, no traceback, nothing written).
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import logging
import os
import sys
import typing
from pathlib import Path

from workers import __version__
from workers.config import load_config
from workers.contract import EXIT_FAILED, EXIT_OK, EXIT_USAGE
from workers.errors import ClusterRefusedError, ConfigError, UsageError
from workers.rundir import RunDir

log = logging.getLogger("orchestrator")


class _Parser(argparse.ArgumentParser):
    """argparse that reports usage errors as one line with exit code 2 (argparse's own code too)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}. HINT: {self.prog} --help\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="orchestrator", description="Train one config the same way everywhere.")
    parser.add_argument("--version", action="version", version=f"orchestrator {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    launch = sub.add_parser("launch", help="run a config locally with N worker processes")
    launch.add_argument("config", help="the run's YAML config")
    launch.add_argument("--nproc", type=int, default=None, help="worker processes (default: launch.nproc)")
    launch.add_argument(
        "overrides",
        nargs="*",
        metavar="key.sub=value",
        help="config overrides (anywhere on the line), e.g. train.max_steps=500",
    )

    resume = sub.add_parser("resume", help="continue a run from its own saved config, locally")
    resume.add_argument("run_dir")
    resume.add_argument("--nproc", type=int, default=None, help="worker processes (default: the run's launch.nproc)")
    resume.add_argument("overrides", nargs="*", metavar="key.sub=value", help="changes to the saved config")

    submit = sub.add_parser("submit", help="run a config on SLURM (through submitit); prints the job id")
    submit.add_argument("config", help="the run's YAML config")
    submit.add_argument(
        "--nodes", default=None, metavar="N|MIN-MAX",
        help="nodes, or a range: the job runs on whatever SLURM grants in it, and a requeued job on whatever it "
        "gets then (default: slurm.nodes)",
    )  # fmt: skip
    submit.add_argument(
        "--tasks-per-node", type=int, default=None, help="workers per node (default: slurm.tasks_per_node, or G)"
    )
    submit.add_argument("--gpus-per-node", type=int, default=None, metavar="G", help="GPUs per node")
    submit.add_argument("--partition", default=None, help="SLURM partition (default: slurm.partition)")
    submit.add_argument("--time", type=int, default=None, metavar="MIN", help="time limit per job, minutes")
    submit.add_argument(
        "--max-restarts", type=int, default=None, metavar="N",
        help="requeues after a failed job step: a crashed rank, a lost node (default: launch.max_restarts)",
    )  # fmt: skip
    submit.add_argument("--wait", action="store_true", help="follow the job to its end, streaming rank 0's log")
    submit.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
    cancel = sub.add_parser("cancel", help="cancel a run's SLURM job(s)")
    cancel.add_argument("run_dir")

    from orchestrator.sweep.command import add_parser as add_sweep  # noqa: PLC0415

    add_sweep(sub)
    data = sub.add_parser("data", help="prepare data: token files for the built-in GPT task")
    data_sub = data.add_subparsers(dest="data_command", required=True, parser_class=_Parser)
    tokenize = data_sub.add_parser("tokenize", help="write a byte-level token file (vocabulary 256) of a UTF-8 text")
    tokenize.add_argument("text", help="the text file")
    tokenize.add_argument("out", help="the token file to write (its folder is made)")
    tokenize.add_argument("--dtype", default="uint16", help="uint16 (default) or uint32")
    _add_read_commands(sub)
    return parser


def _add_read_commands(sub: typing.Any) -> None:
    """The commands that follow or read a run (they change nothing in it)."""
    stat = sub.add_parser("status", help="a run's state, step, loss, throughput, restarts, wandb run id")
    stat.add_argument("run_dir")
    stat.add_argument("--json", action="store_true", help="print one JSON object")
    plot = sub.add_parser("plot", help="draw loss, learning rate and throughput from the run's metrics to a PNG")
    plot.add_argument("run_dir")
    plot.add_argument("--out", default=None, help="PNG path (default: <run dir name>-plot.png here)")

    evaluate = sub.add_parser(
        "eval", help="evaluate a run's best (else latest) checkpoint, a checkpoint folder or a weights file"
    )
    evaluate.add_argument("path", help="run dir, checkpoint folder, or weights file (then --config)")
    evaluate.add_argument("--nproc", type=int, default=1, help="worker processes (default 1; any N, same numbers)")
    evaluate.add_argument("--json", action="store_true", help="print one JSON object")
    evaluate.add_argument("--config", default=None, help="the config that builds the model (default: the run's)")
    evaluate.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")

    ckpt = sub.add_parser("ckpt", help="inspect or export checkpoints")
    ckpt_sub = ckpt.add_subparsers(dest="ckpt_command", required=True, parser_class=_Parser)
    inspect = ckpt_sub.add_parser("inspect", help="describe a checkpoint, a run dir or a weights file")
    inspect.add_argument("path")
    inspect.add_argument("--json", action="store_true", help="print one JSON object")
    export = ckpt_sub.add_parser("export", help="write a plain, prefix-free model state_dict")
    export.add_argument("src", help="checkpoint folder, run dir, or weights file (module./_orig_mod. ok)")
    export.add_argument("dest", help="output .pt file")
    export.add_argument("--force", action="store_true", help="overwrite DEST if it exists")
    stacks = sub.add_parser(
        "stacks",
        help="print the Python stack of every thread of a running run's ranks",
    )
    stacks.add_argument("run_dir")
    stacks.add_argument("--last", action="store_true", help="print the stacks recorded at the run's last hang")


class _LineClearing(logging.Formatter):
    """On a terminal, each launcher line first clears the line it lands on: rank 0's progress bar may be drawn
    there (another process's; it draws itself again at its next update)."""

    def format(self, record: logging.LogRecord) -> str:
        return "\r\x1b[K" + super().format(record)


def _setup_console_logging() -> None:
    handler = logging.StreamHandler(sys.stderr)
    fmt = "%(asctime)s [launcher] %(levelname)s: %(message)s"
    tty = sys.stderr.isatty()
    handler.setFormatter((_LineClearing if tty else logging.Formatter)(fmt, datefmt="%H:%M:%S"))
    logging.basicConfig(level=logging.INFO, handlers=[handler])


def cmd_launch(args: argparse.Namespace) -> int:
    from orchestrator.launcher import PrestartedGroup  # noqa: PLC0415 - the launch side, only for launch
    from orchestrator.resume import resume_config  # noqa: PLC0415
    from orchestrator.supervisor import run_with_restarts  # noqa: PLC0415
    from orchestrator.undo import RunDirSnapshot  # noqa: PLC0415
    from workers.preflight import (  # noqa: PLC0415
        cheap_checks,
        check_devices,
        lock_run_dir,
        preflight,
        save_resolved_config,
    )

    overrides = list(args.overrides) + ([f"launch.nproc={args.nproc}"] if args.nproc is not None else [])
    # config errors surface here, before torch is imported
    cfg = resume_config(args.run_dir, overrides) if args.command == "resume" else load_config(args.config, overrides)
    paths = RunDir(cfg.run.dir)
    cheap_checks(cfg, paths, cfg.launch.nproc)  # before any interpreter is started: `--nproc 48` answers at once
    # The workers start now and import torch while the checks below run (they wait at a gate, writing nothing):
    # the two slow imports overlap instead of following each other.
    group = PrestartedGroup(cfg)
    try:
        preflight(cfg, paths, cfg.launch.nproc)
        check_devices(cfg)
        before = RunDirSnapshot.take(paths)  # a usage error the workers find puts the run dir back as it was
        lock = lock_run_dir(paths)  # held until the launch (restarts included) is over
    except BaseException:
        group.abort()
        raise
    try:
        save_resolved_config(cfg, paths)
        _setup_console_logging()
        return run_with_restarts(cfg, paths, group, lock, undo=before.restore)
    finally:
        lock.release()


def cmd_submit(args: argparse.Namespace) -> int:
    from orchestrator import slurm_submit as slurm  # noqa: PLC0415
    from workers.config import check_node_range  # noqa: PLC0415
    from workers.preflight import preflight, save_resolved_config  # noqa: PLC0415

    flags = {
        "nodes": args.nodes, "tasks_per_node": args.tasks_per_node, "gpus_per_node": args.gpus_per_node,
        "partition": args.partition, "time_min": args.time,
    }  # fmt: skip
    if args.gpus_per_node and args.tasks_per_node is None:
        flags["tasks_per_node"] = args.gpus_per_node  # one task per GPU
    overrides = list(args.overrides) + [f"slurm.{k}={v}" for k, v in flags.items() if v is not None]
    overrides += [f"launch.max_restarts={args.max_restarts}"] if args.max_restarts is not None else []
    cfg = load_config(args.config, overrides)
    paths = RunDir(cfg.run.dir)
    check_node_range(cfg)  # every world size the range can produce divides the batch (no cluster needed to say so)
    slurm.require_slurm()
    slurm.require_controller()
    preflight(cfg, paths, cfg.slurm.world_size)
    active = slurm.active_jobs(paths)
    if active:
        job_id, state = active[0]
        raise ClusterRefusedError(
            f"run dir '{paths.root}' already has job {job_id} ({state.describe()}). "
            f"HINT: orchestrator cancel {paths.root}, or wait for it to end"
        )  # (UNKNOWN included: two jobs on one run dir would fight over it)
    offset = slurm.log_offset(paths)
    job_id = slurm.submit(cfg, paths)
    save_resolved_config(cfg, paths)  # after SLURM accepted it: a refused submission leaves the run dir as it was
    s = cfg.slurm
    print(job_id)
    print(
        f"submitted job {job_id}: {s.nodes} node(s) x {s.tasks_per_node} task(s), run dir {paths.root}\n"
        f"  follow: orchestrator status {paths.root}    stop: orchestrator cancel {paths.root}",
        file=sys.stderr,
    )
    return slurm.follow(paths, job_id, offset) if args.wait else EXIT_OK


def cmd_cancel(args: argparse.Namespace) -> int:
    from orchestrator import slurm_submit as slurm  # noqa: PLC0415

    paths = RunDir(args.run_dir)
    if not slurm.load_jobs(paths):
        raise ConfigError(f"'{paths.root}' has no SLURM jobs (no {paths.slurm_jobs}). HINT: is it the right run dir?")
    cancelled, problems = slurm.cancel(paths)
    print(f"cancelled job(s) {', '.join(cancelled)}" if cancelled else f"no active job for {paths.root}")
    for problem in problems:
        print(f"orchestrator: error: could not cancel {problem}", file=sys.stderr)
    return EXIT_FAILED if problems else EXIT_OK


def cmd_tokenize(args: argparse.Namespace) -> int:
    from workers.tasks.tokens import tokenize  # noqa: PLC0415

    count = tokenize(Path(args.text), Path(args.out), args.dtype)
    print(f"wrote {count} token ids ({args.dtype}, byte-level: vocabulary 256) to {args.out}")
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    # `python -m orchestrator` puts the current directory on sys.path, the console script does not: make them the
    # same, so a task package next to the user's config imports in both (the workers inherit sys.path).
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # Overrides may follow options (`launch cfg.yaml --nproc 2 a.b=1`): argparse leaves those as extras.
    if (
        extra
        and args.command in ("launch", "resume", "submit", "eval", "sweep")
        and all("=" in e and not e.startswith("-") for e in extra)
    ):
        args.overrides = list(args.overrides) + extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        if args.command in ("launch", "resume"):
            return cmd_launch(args)
        if args.command == "submit":
            return cmd_submit(args)
        if args.command == "cancel":
            return cmd_cancel(args)
        if args.command == "eval":
            from orchestrator import evalcmd  # noqa: PLC0415

            return evalcmd.run(args)
        if args.command == "sweep":
            from orchestrator.sweep.command import cmd_sweep  # noqa: PLC0415

            return cmd_sweep(args)
        if args.command == "data":
            return cmd_tokenize(args)
        if args.command == "stacks":
            from orchestrator import stacks  # noqa: PLC0415

            return stacks.run(args.run_dir, last=args.last)
        if args.command == "plot":
            from orchestrator.sweep.command import is_sweep, plot  # noqa: PLC0415

            if is_sweep(args.run_dir):  # every trial's eval curve in one figure
                return plot(args)
        if args.command in ("status", "plot"):
            from orchestrator import runinfo  # noqa: PLC0415

            return runinfo.run(args)
        from orchestrator import ckpt_tools  # noqa: PLC0415

        return ckpt_tools.run(args)
    except UsageError as exc:
        print(f"orchestrator: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return EXIT_FAILED
    except BrokenPipeError:  # `orchestrator ckpt inspect --json | head`: the reader left; so do we, quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK


def run() -> typing.NoReturn:
    """The process entry (the ``orchestrator`` console script, ``python -m orchestrator``): :func:`main`, then
    leave without tearing the interpreter down. After a launch that is ~0.7 s of a CPU spent unloading torch's
    modules, paid by whoever waits for the command; the exit handlers still run (multiprocessing removes its
    temporary folder, logging flushes). Callers inside Python use :func:`main`, which returns."""
    try:
        code = main()
    except SystemExit as exc:  # argparse: --help, usage errors
        code = exc.code
    if code is None:
        code = EXIT_OK
    elif not isinstance(code, int):
        print(code, file=sys.stderr)
        code = EXIT_FAILED
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError):  # `... | head`: the reader left; nothing more to say
            stream.flush()
    os._exit(code)
