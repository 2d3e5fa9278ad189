"""``orchestrator status RUN_DIR`` and ``orchestrator plot RUN_DIR``: follow a run without wandb."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from orchestrator.slurm_submit import status_info as slurm_status_info
from workers.config import Config, load_config
from workers.contract import EXIT_OK, EXIT_USAGE, TrainState, first_failure, is_int
from workers.errors import CheckpointError, ConfigError
from workers.fsutil import RunDirLock, read_lines
from workers.rundir import STATE_FILE, RunDir
from workers.tracking import read_metrics, read_run_id
from workers.tracking.straggler import ranks_of, straggler_of


def _is_running(paths: RunDir) -> bool:
    """A launch holds the run dir's lock while it runs (the kernel drops it when the holder dies)."""
    return RunDirLock.is_held(paths.lock)


def status(paths: RunDir) -> dict[str, Any]:
    if not paths.config.exists():
        raise FileNotFoundError(f"'{paths.root}' is not a run dir (no {paths.config.name})")
    rows = read_metrics(paths)
    train_rows = [r for r in rows if not _is_eval(r)]
    last = train_rows[-1] if train_rows else {}
    running = _is_running(paths)
    cfg = _saved_config(paths)
    failure = None if running else first_failure(paths)
    info = {
        "run_dir": str(paths.root), "state": "running" if running else _ended_state(paths, cfg, failure is not None),
        "step": last.get("step"), "target_step": cfg.train.max_steps if cfg else None,
        "loss": _round(last.get("loss"), 6), "samples_per_s": _round(last.get("samples_per_s"), 1),
        "tokens_per_s": _round(last.get("tokens_per_s"), 1), "mfu": _round(last.get("mfu"), 4),
        "restarts": _count(last.get("restarts")), "world_size": _count(last.get("world_size")),
        "latest_checkpoint": paths.latest_name(), "wandb_run_id": read_run_id(paths), **_eval_info(paths, rows),
        "ranks": ranks_of(last), "straggler": straggler_of(last),  # (the last logged window's)
        "world_sizes": _world_history(train_rows), "dropped_slots": _dropped_slots(paths),
    }  # fmt: skip
    if failure is not None:  # the last launch failed: say who, why, and where to read more
        info["failure"] = f"rank {failure.rank}: {failure.message} (log: {paths.rank_log(failure.rank)})"
    return {**info, **slurm_status_info(paths)}


# The states of a run, as ``status`` names them.
RUNNING, DONE, STOPPED, EARLY_STOPPED, FAILED, NOT_STARTED = (
    "running", "done", "stopped", "early-stopped", "failed", "not started",
)  # fmt: skip


def _ended_state(paths: RunDir, cfg: Config | None, failed: bool) -> str:
    """A run no launch holds now: failed (its last launch did), done (its newest checkpoint is at max_steps),
    early-stopped (eval.patience ran out), stopped (interrupted: the same command resumes it), or not started."""
    if failed:
        return FAILED
    name = paths.latest_name()
    if name is None:
        return NOT_STARTED
    try:
        saved = TrainState.read(paths.checkpoints / name / STATE_FILE)
    except CheckpointError:
        return STOPPED
    if cfg is not None and saved.step >= cfg.train.max_steps:
        return DONE
    patience = cfg.eval.patience if cfg is not None else None
    bad_evals = (saved.selection or {}).get("bad_evals")
    if patience is not None and is_int(bad_evals) and bad_evals >= patience:
        return EARLY_STOPPED
    return STOPPED


def _saved_config(paths: RunDir) -> Config | None:
    try:
        return load_config(paths.config)
    except ConfigError:
        return None  # a config that no longer reads: the state is told without it


def _world_history(rows: list[dict[str, Any]]) -> list[dict[str, int]]:
    """Each world size the run trained on, from the step of its first logged row: ``[{"step", "world_size"}]``."""
    history: list[dict[str, int]] = []
    for row in rows:
        world = row.get("world_size")
        if isinstance(world, (int, float)) and (not history or history[-1]["world_size"] != world):
            history.append({"step": int(row.get("step", 0)), "world_size": int(world)})
    return history


def _dropped_slots(paths: RunDir) -> list[dict[str, Any]]:
    """The device slots the local launcher left out (elastic capacity), oldest first."""
    keys = ("slot", "attempt", "reason", "world_size")
    return [{k: e.get(k) for k in keys} for e in read_lines(paths.launch_events) if e["event"] == "slot-dropped"]


def _count(value: object) -> object:
    """A count the metrics file holds as a float (JSON numbers of the loop's counters) as the integer it is."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _is_eval(row: dict[str, Any]) -> bool:
    return "eval/samples" in row


def _eval_info(paths: RunDir, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The latest eval (its step and metrics) and the best so far (from the checkpoint ``best`` names); empty
    for a run without evals."""
    evals = [r for r in rows if _is_eval(r)]
    info: dict[str, Any] = {}
    if evals:
        last = evals[-1]
        metrics = {
            k[5:]: v for k, v in last.items() if k.startswith("eval/") and k not in ("eval/samples", "eval/time_s")
        }
        info["last_eval"] = {"step": last["step"], "metrics": metrics}
    name = paths.best_name()
    if name is not None:
        try:
            selection = TrainState.read(paths.checkpoints / name / STATE_FILE).selection or {}
        except CheckpointError:
            selection = {}
        if selection.get("best_step") is not None:
            info["best"] = {
                "metric": selection["metric"], "value": selection["best_value"], "step": selection["best_step"],
                "checkpoint": name,
            }  # fmt: skip
    return info


def _text(key: str, value: Any) -> str:
    """A status value as one line."""
    if value is None:
        return "-"
    if key == "last_eval":
        shown = ", ".join(f"eval/{k} {v:.6g}" for k, v in value["metrics"].items())
        return f"step {value['step']}: {shown}"
    if key == "ranks":
        return (
            "; ".join(
                f"rank {r['rank']}: " + ", ".join(f"{k.replace('_', ' ')} {v:g}" for k, v in r.items() if k != "rank")
                for r in value
            )
            or "-"
        )
    if key == "straggler":
        return f"rank {value['rank']} (its compute is {value['ratio']:g}x the median of the other ranks')"
    if key == "history":
        return "".join(f"\n  {line}" for line in value) or "-"
    if key == "world_sizes":
        return ", then ".join(f"{w['world_size']} from step {w['step']}" for w in value) or "-"
    if key == "dropped_slots":
        return "; ".join(f"slot {d['slot']} before attempt {d['attempt']} ({d['reason']})" for d in value) or "-"
    if key == "best":
        return f"eval/{value['metric']} {value['value']:.6g} at step {value['step']} ({value['checkpoint']})"
    return str(value)


def _round(value: object, digits: int) -> object:
    return round(value, digits) if isinstance(value, float) else value


def default_plot_path(paths: RunDir) -> Path:
    """``<run dir name>-plot.png`` in the current directory: following a run never writes into its run dir."""
    return Path(f"{paths.root.resolve().name or 'run'}-plot.png")


def plot(paths: RunDir, out: Path) -> Path:
    """Loss, learning rate and throughput against the global step, from the run's metrics file, as a PNG."""
    import matplotlib  # noqa: PLC0415 - only for this command

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    every = read_metrics(paths)
    rows, evals = [r for r in every if not _is_eval(r)], [r for r in every if _is_eval(r)]
    if not rows:
        raise FileNotFoundError(f"'{paths.metrics}' has no metrics yet")
    steps = [r["step"] for r in rows]
    panels = [("loss", "loss"), ("lr", "learning rate"), ("samples_per_s", "samples/s")]
    fig, axes = plt.subplots(len(panels) + bool(evals), 1, figsize=(8, 8 + 2.5 * bool(evals)), sharex=True)
    for ax, (key, label) in zip(axes, panels, strict=False):
        ax.plot(steps, [r.get(key) for r in rows], marker="." if len(rows) < 50 else None)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_yscale("log")
    if evals:
        _plot_evals(axes[-1], evals, _eval_info(paths, []).get("best"))
    axes[-1].set_xlabel("global step")
    fig.suptitle(str(paths.root))
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".tmp-{out.name}-{os.getpid()}.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, out)
    return out


def _plot_evals(ax: Any, evals: list[dict[str, Any]], best: dict[str, Any] | None) -> None:
    """Every eval metric against the step; the best checkpoint's value marked."""
    names = sorted({k for r in evals for k in r if k.startswith("eval/") and k not in ("eval/samples", "eval/time_s")})
    for name in names:
        points = [(r["step"], r[name]) for r in evals if name in r]
        ax.plot(*zip(*points, strict=True), marker=".", label=name)
    if best is not None:
        ax.plot([best["step"]], [best["value"]], marker="*", markersize=14, linestyle="none",
                label=f"best eval/{best['metric']} (step {best['step']})")  # fmt: skip
    ax.set_ylabel("eval")
    ax.legend(fontsize="small")
    ax.grid(alpha=0.3)


def run(args: argparse.Namespace) -> int:
    paths = RunDir(args.run_dir)
    try:
        if args.command == "status":
            info = status(paths)
            if args.json:
                print(json.dumps(info, indent=1))
            else:
                for key, value in info.items():
                    print(f"{key.replace('_', ' ')}: {_text(key, value)}")
        else:
            print(f"wrote {plot(paths, Path(args.out) if args.out else default_plot_path(paths))}")
    except FileNotFoundError as exc:
        print(f"orchestrator: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    return EXIT_OK
