"""The ``orchestrator`` command line.

``launch`` runs a config locally; ``ckpt inspect`` / ``ckpt export`` read checkpoints. Exit codes: 0 done,
1 training failed (the report names the rank that failed first), 2 usage or config error (one line, no
traceback, nothing written).
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import TYPE_CHECKING

from workers.config import Config, ConfigError, load_config
from workers.entry import EXIT_FAILED, EXIT_OK, EXIT_USAGE

if TYPE_CHECKING:
    from orchestrator.launcher import PrestartedGroup

log = logging.getLogger("orchestrator")


class _Parser(argparse.ArgumentParser):
    """argparse that reports usage errors as one line with exit code 2 (argparse's own code too)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}. HINT: {self.prog} --help\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="orchestrator", description="Train one config the same way everywhere.")
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

    submit = sub.add_parser("submit", help="run a config on SLURM (through submitit); prints the job id")
    submit.add_argument("config", help="the run's YAML config")
    submit.add_argument("--nodes", type=int, default=None, help="nodes (default: slurm.nodes)")
    submit.add_argument(
        "--tasks-per-node", type=int, default=None, help="workers per node (default: slurm.tasks_per_node, or G)"
    )
    submit.add_argument("--gpus-per-node", type=int, default=None, metavar="G", help="GPUs per node")
    submit.add_argument("--partition", default=None, help="SLURM partition (default: slurm.partition)")
    submit.add_argument("--time", type=int, default=None, metavar="MIN", help="time limit per job, minutes")
    submit.add_argument("--wait", action="store_true", help="follow the job to its end, streaming rank 0's log")
    submit.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
    cancel = sub.add_parser("cancel", help="cancel a run's SLURM job(s)")
    cancel.add_argument("run_dir")

    stat = sub.add_parser("status", help="a run's state, step, loss, throughput, restarts, wandb run id")
    stat.add_argument("run_dir")
    stat.add_argument("--json", action="store_true", help="print one JSON object")
    plot = sub.add_parser("plot", help="draw loss, learning rate and throughput from metrics.jsonl to a PNG")
    plot.add_argument("run_dir")
    plot.add_argument("--out", default=None, help="PNG path (default: RUN_DIR/metrics.png)")

    ckpt = sub.add_parser("ckpt", help="inspect or export checkpoints")
    ckpt_sub = ckpt.add_subparsers(dest="ckpt_command", required=True, parser_class=_Parser)
    inspect = ckpt_sub.add_parser("inspect", help="describe a checkpoint, a run dir or a weights file")
    inspect.add_argument("path")
    inspect.add_argument("--json", action="store_true", help="print one JSON object")
    export = ckpt_sub.add_parser("export", help="write a plain, prefix-free model state_dict")
    export.add_argument("src", help="checkpoint folder, run dir, or weights file (module./_orig_mod. ok)")
    export.add_argument("dest", help="output .pt file")
    export.add_argument("--force", action="store_true", help="overwrite DEST if it exists")
    return parser


def _setup_console_logging() -> None:
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s [launcher] %(levelname)s: %(message)s",
        datefmt="%H:%M:%S",
    )


def cmd_launch(args: argparse.Namespace) -> int:
    from orchestrator.launcher import PrestartedGroup  # noqa: PLC0415
    from workers.entry import lock_run_dir, preflight, save_resolved_config  # noqa: PLC0415

    overrides = list(args.overrides) + ([f"launch.nproc={args.nproc}"] if args.nproc is not None else [])
    cfg = load_config(args.config, overrides)  # config errors surface here, before torch is imported
    # The workers start now and import torch while the checks below run (they wait at a gate, writing nothing):
    # the two slow imports overlap instead of following each other.
    group = PrestartedGroup(cfg)
    try:
        preflight(cfg, cfg.launch.nproc)
        _check_devices(cfg)
        lock = lock_run_dir(cfg)  # held until the launch (restarts included) is over
    except BaseException:
        group.abort()
        raise
    try:
        save_resolved_config(cfg)
        _setup_console_logging()
        return _launch_with_restarts(cfg, group)
    finally:
        lock.release()


def cmd_submit(args: argparse.Namespace) -> int:
    from orchestrator import slurm  # noqa: PLC0415
    from workers.entry import preflight, save_resolved_config  # noqa: PLC0415

    flags = {
        "nodes": args.nodes, "tasks_per_node": args.tasks_per_node, "gpus_per_node": args.gpus_per_node,
        "partition": args.partition, "time_min": args.time,
    }  # fmt: skip
    if args.gpus_per_node and args.tasks_per_node is None:
        flags["tasks_per_node"] = args.gpus_per_node  # one task per GPU
    overrides = list(args.overrides) + [f"slurm.{k}={v}" for k, v in flags.items() if v is not None]
    cfg = load_config(args.config, overrides)
    slurm.require_slurm()
    preflight(cfg, cfg.slurm.world_size)
    active = slurm.active_jobs(cfg.run_dir)
    if active:
        job_id, state = active[0]
        raise ConfigError(
            f"run dir '{cfg.run_dir}' already has job {job_id} ({state.describe()}). "
            f"HINT: orchestrator cancel {cfg.run_dir}, or wait for it to end"
        )  # (UNKNOWN included: two jobs on one run dir would fight over it)
    offset = slurm.log_offset(cfg.run_dir)
    job_id = slurm.submit(cfg)
    save_resolved_config(cfg)  # after SLURM accepted it: a refused submission leaves the run dir as it was
    s = cfg.slurm
    print(job_id)
    print(
        f"submitted job {job_id}: {s.nodes} node(s) x {s.tasks_per_node} task(s), run dir {cfg.run_dir}\n"
        f"  follow: orchestrator status {cfg.run_dir}    stop: orchestrator cancel {cfg.run_dir}",
        file=sys.stderr,
    )
    return slurm.follow(cfg.run_dir, job_id, offset) if args.wait else EXIT_OK


def cmd_cancel(args: argparse.Namespace) -> int:
    from pathlib import Path  # noqa: PLC0415

    from orchestrator import slurm  # noqa: PLC0415

    run_dir = Path(args.run_dir)
    if not slurm.load_jobs(run_dir):
        raise ConfigError(f"'{run_dir}' has no SLURM jobs (no {slurm.JOBS_FILE}). HINT: is it the right run dir?")
    cancelled, problems = slurm.cancel(run_dir)
    print(f"cancelled job(s) {', '.join(cancelled)}" if cancelled else f"no active job for {run_dir}")
    for problem in problems:
        print(f"orchestrator: error: could not cancel {problem}", file=sys.stderr)
    return EXIT_FAILED if problems else EXIT_OK


def _check_devices(cfg: Config) -> None:
    """Pre-flight against the hardware: enough GPUs for --nproc, fp16 only on CUDA."""
    import torch  # noqa: PLC0415

    from workers.dist import check_precision  # noqa: PLC0415

    cuda = torch.cuda.is_available() and cfg.launch.device != "cpu"
    if cfg.launch.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("config key 'launch.device' = 'cuda': no CUDA device is visible. HINT: use auto or cpu")
    if cuda and cfg.launch.nproc > torch.cuda.device_count():
        raise ConfigError(
            f"config key 'launch.nproc' = {cfg.launch.nproc}: only {torch.cuda.device_count()} "
            "GPU(s) visible (one worker per GPU). HINT: lower --nproc or set launch.device=cpu"
        )
    check_precision(cfg.train.precision, "cuda" if cuda else "cpu")


def _launch_with_restarts(cfg: Config, group: PrestartedGroup) -> int:
    from orchestrator.launcher import LocalLauncher, SignalRelay  # noqa: PLC0415

    restarts, prestarted = 0, group
    # One signal relay for all attempts: a Ctrl-C during a teardown or between attempts still means "stop".
    with SignalRelay() as relay:
        while True:
            log.info(
                "launching %d worker(s), run dir %s%s",
                cfg.launch.nproc,
                cfg.run.dir,
                f" (restart {restarts}/{cfg.launch.max_restarts})" if restarts else "",
            )
            result = LocalLauncher(cfg, cfg.launch.nproc, attempt=restarts).run(relay, prestarted)
            prestarted = None  # restarts spawn afresh
            if result.ok:
                log.info("run finished: %s", cfg.run.dir)
                return EXIT_OK
            if result.usage_error:
                print(f"orchestrator: error: {result.root_cause.error['message'].partition(': ')[2]}", file=sys.stderr)
                return EXIT_USAGE
            print(result.report(), file=sys.stderr)
            stopped = result.stopped_by_signal or relay.count > 0
            if stopped or not result.retryable or restarts >= cfg.launch.max_restarts:
                return EXIT_FAILED
            restarts += 1
            log.warning("restarting the group from the latest checkpoint (%d/%d)", restarts, cfg.launch.max_restarts)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # Overrides may follow options (`launch cfg.yaml --nproc 2 a.b=1`): argparse leaves those as extras.
    if extra and args.command in ("launch", "submit") and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides = list(args.overrides) + extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        if args.command == "launch":
            return cmd_launch(args)
        if args.command == "submit":
            return cmd_submit(args)
        if args.command == "cancel":
            return cmd_cancel(args)
        if args.command in ("status", "plot"):
            from orchestrator import runinfo  # noqa: PLC0415

            return runinfo.run(args)
        from orchestrator import ckpt_tools  # noqa: PLC0415

        return ckpt_tools.run(args)
    except ConfigError as exc:
        print(f"orchestrator: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return EXIT_FAILED
