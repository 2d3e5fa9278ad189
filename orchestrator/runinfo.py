"""``orchestrator status RUN_DIR`` and ``orchestrator plot RUN_DIR``: follow a run without wandb."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from orchestrator.slurm import status_info as slurm_status_info
from workers.contract import EXIT_OK, EXIT_USAGE, first_failure
from workers.fsutil import RunDirLock
from workers.rundir import RunDir
from workers.tracking import read_metrics, read_run_id


def _is_running(paths: RunDir) -> bool:
    """A launch holds the run dir's lock while it runs (the kernel drops it when the holder dies)."""
    if not paths.lock.exists():
        return False
    try:
        RunDirLock(paths.lock).acquire().release()
        return False
    except BlockingIOError:
        return True


def status(paths: RunDir) -> dict[str, Any]:
    if not paths.config.exists():
        raise FileNotFoundError(f"'{paths.root}' is not a run dir (no {paths.config.name})")
    rows = read_metrics(paths)
    last = rows[-1] if rows else {}
    running = _is_running(paths)
    info = {
        "run_dir": str(paths.root), "state": "running" if running else "not running",
        "step": last.get("step"), "loss": _round(last.get("loss"), 6),
        "samples_per_s": _round(last.get("samples_per_s"), 1), "restarts": last.get("restarts"),
        "world_size": last.get("world_size"), "latest_checkpoint": paths.latest_name(),
        "wandb_run_id": read_run_id(paths),
    }  # fmt: skip
    failure = None if running else first_failure(paths)
    if failure is not None:  # the last launch failed: say who, why, and where to read more
        info["state"] = "failed"
        info["failure"] = f"rank {failure.rank}: {failure.message} (log: {paths.rank_log(failure.rank)})"
    return {**info, **slurm_status_info(paths)}


def _round(value: object, digits: int) -> object:
    return round(value, digits) if isinstance(value, float) else value


def plot(paths: RunDir, out: Path) -> Path:
    """Loss, learning rate and throughput against the global step, from the run's metrics file, as a PNG."""
    import matplotlib  # noqa: PLC0415 - only for this command

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    rows = read_metrics(paths)
    if not rows:
        raise FileNotFoundError(f"'{paths.metrics}' has no metrics yet")
    steps = [r["step"] for r in rows]
    fig, axes = plt.subplots(3, 1, figsize=(8, 8), sharex=True)
    for ax, key, label in zip(
        axes, ("loss", "lr", "samples_per_s"), ("loss", "learning rate", "samples/s"), strict=True
    ):
        ax.plot(steps, [r.get(key) for r in rows], marker="." if len(rows) < 50 else None)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_yscale("log")
    axes[-1].set_xlabel("global step")
    fig.suptitle(str(paths.root))
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".tmp-{out.name}-{os.getpid()}.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, out)
    return out


def run(args: argparse.Namespace) -> int:
    paths = RunDir(args.run_dir)
    try:
        if args.command == "status":
            info = status(paths)
            if args.json:
                print(json.dumps(info, indent=1))
            else:
                for key, value in info.items():
                    print(f"{key.replace('_', ' ')}: {'-' if value is None else value}")
        else:
            print(f"wrote {plot(paths, Path(args.out) if args.out else paths.metrics_png)}")
    except FileNotFoundError as exc:
        print(f"orchestrator: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    return EXIT_OK
