"""``orchestrator eval PATH [--nproc N] [--json] [--config CFG] [key=value ...]``: evaluate saved weights.

PATH is a run dir (its ``best`` checkpoint, else its newest valid one), a checkpoint folder (verified against its
manifest first), or a weights file (plain, ``module.``/``_orig_mod.`` prefixes, or a dict holding a state_dict;
then ``--config`` names the config it was trained with). The config is the run's (or the folder's own copy)
unless ``--config`` is given; ``key=value`` overrides apply on top (e.g. ``eval.batch_size=64``).

``N`` worker processes evaluate through the same code path as training's evals (workers.eval.job), so the numbers
are the run's eval rows, on any ``N``. Nothing is written: not into the run dir, not anywhere.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import multiprocessing.connection
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.launcher import free_port, kill_tree, ties, worker_context
from workers.checkpoint import find_latest_valid, read_train_state, verify
from workers.config import Config, load_config
from workers.contract import EXIT_FAILED, EXIT_OK
from workers.entry import eval_worker
from workers.errors import CheckpointError, ConfigError
from workers.rundir import CONFIG_FILE, MODEL_FILE, RunDir
from workers.tasks import check_factory_args, resolve_factory

MAX_NPROC = 1024  # a sanity bound, like launch.nproc's


@dataclass(frozen=True)
class Target:
    """What to evaluate: a weights file, the config that builds its model, and the step (None: a bare file)."""

    weights: Path
    config: Path
    step: int | None
    checkpoint: Path  # what the user named, resolved: the checkpoint folder, or the weights file


def resolve(path: Path, config: str | None) -> Target:
    """PATH → what to evaluate. UsageError (exit 2) for a path that is none of the three, or a broken checkpoint."""
    if not path.exists():
        raise ConfigError(f"'{path}' does not exist. HINT: give a run dir, a checkpoint folder or a weights file")
    run = RunDir(path)
    if run.checkpoints.is_dir():
        folder = _best_or_latest(run)
        return _folder_target(folder, Path(config) if config else run.config)
    if path.is_dir():
        return _folder_target(path, Path(config) if config else path / CONFIG_FILE)
    if config is None:
        raise ConfigError(
            f"'{path}' is a weights file: which model it belongs to is not in it. HINT: add --config CFG.yaml "
            "(the config it was trained with)"
        )
    return Target(path, Path(config), None, path)


def _best_or_latest(run: RunDir) -> Path:
    best = run.best_name()
    if best is not None:
        try:
            verify(run.checkpoints / best)
            return run.checkpoints / best
        except CheckpointError as exc:
            print(f"orchestrator: warning: the best checkpoint is unusable ({exc}); using the newest valid one",
                  file=sys.stderr)  # fmt: skip
    latest = find_latest_valid(run.checkpoints, warn=False)
    if latest is None:
        raise ConfigError(f"'{run.root}' holds no valid checkpoint. HINT: orchestrator ckpt inspect {run.root}")
    return latest


def _folder_target(folder: Path, config: Path) -> Target:
    try:
        verify(folder)
        step = read_train_state(folder).step
    except CheckpointError as exc:
        raise ConfigError(f"{exc}. HINT: orchestrator ckpt inspect {folder}") from None
    # a sharded checkpoint without the exported model.pt: the folder itself (its shards, gathered by load_weights)
    weights = folder / MODEL_FILE if (folder / MODEL_FILE).is_file() else folder
    return Target(weights, config, step, folder)


def check(cfg: Config, nproc: int) -> None:
    """What can be checked before a worker starts: the number of workers and the task factory's arguments."""
    if not 1 <= nproc <= MAX_NPROC:
        raise ConfigError(f"--nproc {nproc}: must be between 1 and {MAX_NPROC}. HINT: e.g. --nproc 2")
    check_factory_args(cfg.task.factory, resolve_factory(cfg.task.factory), dict(cfg.task.args))


def evaluate(cfg: Config, weights: Path, nproc: int) -> dict[str, Any]:
    """Run ``nproc`` eval workers to the end; rank 0's result. ConfigError for a usage error a worker found;
    RuntimeError when a worker failed or died."""
    ctx, server_pid = worker_context()  # forked by the fork server, as the launcher's workers are
    port, procs, conns = free_port(), [], []
    try:
        for rank in range(nproc):
            reader, writer = ctx.Pipe(duplex=False)
            args = (cfg.to_dict(), str(weights), rank, nproc, port, server_pid, writer, ties(None))
            proc = ctx.Process(target=eval_worker, name=f"eval-{rank}", args=args)
            proc.start()
            writer.close()
            procs.append(proc)
            conns.append(reader)
        return _collect(procs, conns)
    finally:
        kill_tree([p.pid for p in procs if p.is_alive()], 1.0)


def _collect(procs: list, conns: list) -> dict[str, Any]:
    """One message per worker; the first failure ends the wait (the others are then stopped)."""
    results: dict[int, dict[str, Any]] = {}
    while len(results) < len(procs):
        waiting = [c for r, c in enumerate(conns) if r not in results]
        for conn in multiprocessing.connection.wait(waiting):
            rank = conns.index(conn)
            try:
                message = conn.recv()
            except EOFError:  # it died without a word (a signal, a hard crash)
                procs[rank].join(5)
                raise RuntimeError(f"eval worker {rank} died (exit code {procs[rank].exitcode})") from None
            if not message["ok"]:
                if message["usage"]:
                    raise ConfigError(message["error"])
                raise RuntimeError(f"eval worker {rank} failed:\n{message['error']}")
            results[rank] = message["result"]
    for proc in procs:
        proc.join(30)
    return results[0]


def run(args: argparse.Namespace) -> int:
    target = resolve(Path(args.path), args.config)
    if not target.config.is_file():
        raise ConfigError(
            f"no config at '{target.config}'. HINT: pass the config the weights were trained with (--config)"
        )
    cfg = load_config(str(target.config), list(args.overrides))
    check(cfg, args.nproc)
    try:
        result = evaluate(cfg, target.weights, args.nproc)
    except RuntimeError as exc:
        print(f"orchestrator: error: evaluation failed: {exc}", file=sys.stderr)
        return EXIT_FAILED
    out = {"checkpoint": str(target.checkpoint), "step": target.step, **result}
    if args.json:
        print(json.dumps(out))
    else:
        print(f"checkpoint: {out['checkpoint']}")
        print(f"step: {'-' if out['step'] is None else out['step']}")
        print(f"samples: {out['samples']}")
        for name, value in out["metrics"].items():
            print(f"eval/{name}: {value:.8g}")
    return EXIT_OK
