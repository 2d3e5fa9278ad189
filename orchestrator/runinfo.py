"""``orchestrator status RUN_DIR`` and ``orchestrator plot RUN_DIR``: follow a run without wandb."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from orchestrator.slurm import status_info as slurm_status_info
from workers.entry import EXIT_OK, EXIT_USAGE
from workers.fsutil import RunDirLock
from workers.tracking import METRICS_FILE, TRACKING_FILE, read_metrics


def _is_running(run_dir: Path) -> bool:
    """A launch holds ``run.dir/.lock`` while it runs (the kernel drops it when the holder dies)."""
    if not (run_dir / ".lock").exists():
        return False
    try:
        RunDirLock(run_dir).acquire().release()
        return False
    except BlockingIOError:
        return True


def status(run_dir: Path) -> dict[str, Any]:
    if not (run_dir / "config.yaml").exists():
        raise FileNotFoundError(f"'{run_dir}' is not a run dir (no config.yaml)")
    rows = read_metrics(run_dir)
    last = rows[-1] if rows else {}
    latest = run_dir / "checkpoints" / "latest"
    tracking = json.loads((run_dir / TRACKING_FILE).read_text()) if (run_dir / TRACKING_FILE).exists() else {}
    return {
        "run_dir": str(run_dir), "state": "running" if _is_running(run_dir) else "not running",
        "step": last.get("step"), "loss": last.get("loss"), "samples_per_s": last.get("samples_per_s"),
        "restarts": last.get("restarts"), "world_size": last.get("world_size"),
        "latest_checkpoint": latest.read_text().strip() if latest.exists() else None,
        "wandb_run_id": tracking.get("wandb_run_id"),
        **slurm_status_info(run_dir),
    }  # fmt: skip


def plot(run_dir: Path, out: Path) -> Path:
    """Loss, learning rate and throughput against the global step, from ``metrics.jsonl``, as a PNG."""
    import matplotlib  # noqa: PLC0415 - only for this command

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    rows = read_metrics(run_dir)
    if not rows:
        raise FileNotFoundError(f"'{run_dir / METRICS_FILE}' has no metrics yet")
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
    fig.suptitle(str(run_dir))
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".tmp-{out.name}-{os.getpid()}.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, out)
    return out


def run(args: argparse.Namespace) -> int:
    run_dir = Path(args.run_dir)
    try:
        if args.command == "status":
            info = status(run_dir)
            if args.json:
                print(json.dumps(info, indent=1))
            else:
                for key, value in info.items():
                    print(f"{key.replace('_', ' ')}: {'-' if value is None else value}")
        else:
            print(f"wrote {plot(run_dir, Path(args.out) if args.out else run_dir / 'metrics.png')}")
    except FileNotFoundError as exc:
        print(f"orchestrator: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    return EXIT_OK
