"""``orchestrator sweep``: parse and check the whole sweep before anything runs, create DIR or continue the sweep in
it, run its trials; ``orchestrator sweep status DIR [--json]``."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from orchestrator.sweep.local import LocalSweep, device_groups, group_override, trial_env, unfinished
from orchestrator.sweep.report import print_status
from orchestrator.sweep.spec import SweepSpec, check_keys, parse_grid, parse_random, trial_id
from orchestrator.sweep.store import SweepDir, SweepState, check_same_sweep, draw_trials, register
from workers.config import ConfigError, load_config
from workers.contract import EXIT_OK
from workers.errors import UsageError
from workers.eval.selection import DEFAULT_METRIC
from workers.preflight import preflight
from workers.rundir import RunDir

log = logging.getLogger("orchestrator")


def spec_of(args: argparse.Namespace) -> SweepSpec:
    """The sweep the command line asks for (ConfigError: one line naming what is wrong)."""
    base = load_config(args.target, list(args.overrides))  # the base config and the overrides of every trial
    grid = dict(parse_grid(g) for g in args.grid)
    random = dict(parse_random(r) for r in args.random)
    if args.trials is not None and args.trials < 1:
        raise ConfigError(f"--trials {args.trials}: must be at least 1")
    if not 0 <= args.seed < 2**32:
        raise ConfigError(f"--seed {args.seed}: must be in [0, 2**32)")
    if args.prune not in (None, "halving"):
        raise ConfigError(f"--prune {args.prune!r}: the pruner is 'halving' (successive halving)")
    mode = args.mode or base.eval.mode
    if mode not in ("min", "max"):
        raise ConfigError(f"--mode {mode!r}: must be min or max")
    spec = SweepSpec(
        Path(args.target), grid, random, args.trials or (10 if random else 1), args.seed,
        args.metric or base.eval.metric or DEFAULT_METRIC, mode, args.prune, tuple(args.overrides),
    )  # fmt: skip
    check_keys(spec)
    return spec


def check_trials(spec: SweepSpec, sdir: SweepDir, values: list[dict], nproc: int, slurm: bool = False) -> None:
    """Every trial's config is built and checked (keys, values, batch plan at every world size it may run with,
    run dir) before anything runs."""
    if not values:
        raise ConfigError("the sweep has no trials. HINT: give --grid KEY=[...] and/or --random KEY=DIST")
    for trial in values:
        cfg = spec.config_of(trial, sdir.trial_dir(trial_id(trial)))
        if not cfg.eval.enabled:
            raise ConfigError(
                f"the sweep's metric eval/{spec.metric} needs evaluation, and the config evaluates nothing. HINT: "
                "set eval.every=N (or eval.at_end=true)"
            )
        for world in cfg.slurm.world_sizes if slurm else (nproc,):
            preflight(cfg, RunDir(cfg.run.dir), world)  # (the factory's arguments too, as `launch` checks them)
    check_metric(spec, sdir, values)


def check_metric(spec: SweepSpec, sdir: SweepDir, values: list[dict]) -> None:
    """The sweep's metric is one the task's eval produces. Only an eval tells its metric names, so the task is built
    here once per distinct ``task.*`` of the trials and one small batch evaluated on the CPU (the trials' workers
    probe the same way before their first step; found here, nothing is written and no trial starts). A probe that
    fails for another reason (a task that needs a GPU or data only the nodes see) leaves the check to the trials."""
    from workers.eval.job import metric_names  # noqa: PLC0415 - imports torch and the task

    probed: set[str] = set()
    for trial in values:
        cfg = spec.config_of(trial, sdir.trial_dir(trial_id(trial)))
        key = json.dumps([cfg.task.factory, cfg.task.args], sort_keys=True, default=str)
        if key in probed:
            continue
        probed.add(key)
        try:
            names = metric_names(cfg)
        except UsageError:
            raise
        except Exception as exc:
            log.warning("could not evaluate the task here to check --metric %r (%s: %s); each trial checks it before "
                        "its first step", spec.metric, type(exc).__name__, exc)  # fmt: skip
            return
        if spec.metric not in names:
            raise ConfigError(f"sweep --metric {spec.metric!r}: the task's eval does not produce it. HINT: use one of "
                              f"{', '.join(names)}")  # fmt: skip


def cmd_sweep(args: argparse.Namespace) -> int:
    if args.target in ("status", "cancel"):
        if len(args.overrides) != 1:
            usage = f"orchestrator sweep {args.target} DIR" + (" [--json]" if args.target == "status" else "")
            raise ConfigError(f"usage: {usage}")
        sdir = SweepDir(args.overrides[0])
        if not sdir.state.is_file():
            raise ConfigError(f"'{sdir.root}' is not a sweep dir (no {sdir.state.name})")
        if args.target == "cancel":
            from orchestrator.sweep.slurm import cancel  # noqa: PLC0415

            return cancel(sdir, SweepState.load(sdir))
        print_status(sdir, args.json)
        return EXIT_OK
    if not args.dir:
        raise ConfigError("orchestrator sweep CONFIG needs --dir DIR (the sweep's own folder; trials go inside)")
    args.overrides = [*args.overrides, *submit_options(args)]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s [sweep] %(levelname)s: %(message)s", datefmt="%H:%M:%S")
    spec, sdir = spec_of(args), SweepDir(args.dir)
    nproc = args.nproc or load_config(args.target, list(args.overrides)).launch.nproc
    if not args.slurm:
        device_groups(args.parallel, nproc)  # (more trials at once than devices: said before anything is written)
    elif args.parallel != 1:
        raise ConfigError(f"--parallel {args.parallel}: trials at once on this machine; with --slurm the array runs "
                          "its tasks at once as the cluster allows. HINT: leave --parallel out")  # fmt: skip
    elif [k for k in [*spec.grid, *spec.random] if k.startswith("slurm.")]:
        raise ConfigError("--slurm: the trials of one array share its shape; slurm.* keys cannot be searched. HINT: "
                          "sweep them in separate sweeps")  # fmt: skip
    if sdir.state.is_file():
        state = SweepState.load(sdir)
        check_same_sweep(spec, state, sdir)
        check_trials(spec, sdir, [t.overrides for t in state.trials], nproc, args.slurm)
    else:
        values = draw_trials(spec)
        check_trials(spec, sdir, values, nproc, args.slurm)
        state = register(spec, sdir, values)
    if args.slurm:
        from orchestrator.sweep.slurm import submit_array  # noqa: PLC0415

        env_of = lambda trial: trial_env(spec, sdir, trial)  # noqa: E731
        return submit_array(spec, sdir, state, unfinished(sdir, state), env_of, group_override(spec, sdir))
    return LocalSweep(spec, sdir, state, nproc, args.parallel).run()


SUBMIT = {"nodes": "nodes", "tasks_per_node": "tasks_per_node", "gpus_per_node": "gpus_per_node",
          "partition": "partition", "time": "time_min"}  # fmt: skip


def submit_options(args: argparse.Namespace) -> list[str]:
    """``--slurm``'s submit options, as the slurm.* overrides of every trial (``submit`` takes the same)."""
    given = {name: getattr(args, name) for name in SUBMIT if getattr(args, name) is not None}
    if given and not args.slurm:
        raise ConfigError(f"--{next(iter(given)).replace('_', '-')}: a SLURM option; add --slurm, or leave it out")
    return [f"slurm.{SUBMIT[name]}={value}" for name, value in given.items()]


def add_parser(sub: object) -> None:
    """``orchestrator sweep``'s options (DESIGN.md, "Sweeps")."""
    sweep = sub.add_parser("sweep", help="run a grid or random search of one config: each trial an ordinary run dir")  # type: ignore[attr-defined]
    sweep.add_argument("target", metavar="CONFIG|status|cancel", help="the base config (or: status DIR, cancel DIR)")
    sweep.add_argument("--dir", default=None, help="the sweep's folder: its state, and a run dir per trial")
    sweep.add_argument("--grid", action="append", default=[], metavar="KEY=[v,...]", help="a grid dimension")
    sweep.add_argument("--random", action="append", default=[], metavar="KEY=DIST",
                       help="a random dimension: uniform(a,b), loguniform(a,b), int(a,b), choice(a,b,...)")  # fmt: skip
    sweep.add_argument("--trials", type=int, default=None, help="random draws (default 10; crossed with the grid)")
    sweep.add_argument("--seed", type=int, default=0, help="seed of the random draws")
    sweep.add_argument("--metric", default=None, help="eval metric to compare trials by (default: eval.metric)")
    sweep.add_argument("--mode", default=None, help="min or max (default: eval.mode)")
    sweep.add_argument("--prune", default=None, metavar="halving", help="stop trials early by successive halving")
    sweep.add_argument("--nproc", type=int, default=None, help="workers per trial (default: launch.nproc)")
    sweep.add_argument("--parallel", type=int, default=1, help="trials at once, the devices split between them")
    sweep.add_argument(
        "--slurm", action="store_true", help="submit the trials as one SLURM array (slurm.* keys: each trial's job)"
    )
    for flag, helptext in (
        ("--nodes", "--slurm: nodes per trial, N or MIN-MAX"),
        ("--tasks-per-node", "--slurm"),
        ("--gpus-per-node", "--slurm"),
        ("--partition", "--slurm"),
        ("--time", "--slurm: minutes"),
    ):
        sweep.add_argument(flag, default=None, help=helptext)  # fmt: skip
    sweep.add_argument("--json", action="store_true", help="status: one JSON object")
    sweep.add_argument("overrides", nargs="*", metavar="key.sub=value", help="overrides for every trial")


def is_sweep(path: str) -> bool:
    return SweepDir(path).state.is_file()


def plot(args: argparse.Namespace) -> int:
    """``orchestrator plot DIR`` of a sweep: every trial's eval curve in one figure."""
    from orchestrator.sweep.report import plot_sweep  # noqa: PLC0415

    sdir = SweepDir(args.run_dir)
    out = Path(args.out) if args.out else Path(f"{sdir.root.resolve().name or 'sweep'}-plot.png")
    try:
        drawn = plot_sweep(sdir, out)
        print(f"wrote {out} ({len(drawn)} trial curve(s))")
    except FileNotFoundError as exc:
        raise ConfigError(str(exc)) from None
    return EXIT_OK
