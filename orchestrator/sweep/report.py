"""Where each trial of a sweep stands, and the best: ``orchestrator sweep status DIR [--json]`` (the contract in
DESIGN.md, "Sweeps"). Read-only: a trial's state comes from its run dir (running, done, failed), the Optuna
journal (pruned) and ``sweep.json`` (failed before its run dir said so: a launch that never started)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

from orchestrator.runinfo import status as run_status
from orchestrator.sweep.spec import SweepSpec
from orchestrator.sweep.store import SweepDir, SweepState, Trial, open_study
from workers.rundir import RunDir
from workers.tracking import read_metrics

PENDING, RUNNING, DONE, FAILED, PRUNED = "pending", "running", "done", "failed", "pruned"


def best_metric(paths: RunDir, metric: str, mode: str) -> dict[str, Any] | None:
    """The trial's best eval value of ``metric`` (by ``mode``) and its step, from its metrics rows."""
    key = f"eval/{metric}"
    values = [(r[key], r["step"]) for r in read_metrics(paths) if isinstance(r.get(key), (int, float))]
    values = [(v, s) for v, s in values if math.isfinite(v)]
    if not values:
        return None
    value, step = (min if mode == "min" else max)(values, key=lambda e: e[0])
    return {"name": metric, "value": value, "step": step}


def trial_info(trial: Trial, sdir: SweepDir, state: SweepState, pruned: set[int]) -> dict[str, Any]:
    identity = state.identity
    paths = RunDir(sdir.trial_dir(trial.id))
    info: dict[str, Any] = {"id": trial.id, "overrides": trial.overrides, "state": PENDING, "step": None,
                            "metric": None, "run_dir": str(paths.root)}  # fmt: skip
    if paths.config.exists():
        run = run_status(paths)
        saved = run.get("latest_checkpoint")  # (the last logged row may be older than the last save)
        info["step"] = max(run.get("step") or 0, int(saved.split("-")[1]) if saved else 0) or None
        info["metric"] = best_metric(paths, identity["metric"], identity["mode"])
        if run["state"] == "running":
            info["state"] = RUNNING
        elif trial.number in pruned:
            info["state"] = PRUNED
        elif run["state"] in ("done", "early-stopped"):
            info["state"] = DONE
        elif run["state"] == "failed":  # (its last launch failed: a local one, or a SLURM task out of restarts)
            info["state"] = FAILED
            info["error"] = run.get("failure") or state.failed.get(trial.id, "its last launch failed")
    if info["state"] == PENDING and trial.id in state.failed:  # (a rerun tries it again)
        info["state"] = FAILED
        info["error"] = state.failed[trial.id]
    return info


def sweep_status(sdir: SweepDir) -> dict[str, Any]:
    """The JSON form (DESIGN.md, "Sweeps")."""
    state = SweepState.load(sdir)
    pruned = pruned_numbers(sdir)
    trials = [trial_info(t, sdir, state, pruned) for t in state.trials]
    mode = state.identity["mode"]
    scored = [t for t in trials if t["metric"] is not None and t["state"] == DONE]
    best = None
    if scored:
        top = (min if mode == "min" else max)(scored, key=lambda t: t["metric"]["value"])
        best = {"id": top["id"], "overrides": top["overrides"], "value": top["metric"]["value"]}
    return {"dir": str(sdir.root), "metric": state.identity["metric"], "mode": mode, "trials": trials, "best": best}


def pruned_numbers(sdir: SweepDir) -> set[int]:
    """The Optuna trial numbers the pruner stopped (read from the journal)."""
    from optuna.trial import TrialState  # noqa: PLC0415 - only sweeps import Optuna

    if not sdir.journal.exists():
        return set()
    study = open_study(SweepSpec(Path(".")), sdir)  # (reading needs no pruner or direction of its own)
    return {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.PRUNED,))}


def print_status(sdir: SweepDir, as_json: bool) -> None:
    info = sweep_status(sdir)
    if as_json:
        print(json.dumps(info, indent=1))
        return
    rows = sorted(info["trials"], key=lambda t: _order(t, info["mode"]))
    print(f"sweep {info['dir']}: {len(rows)} trial(s), metric eval/{info['metric']} ({info['mode']})")
    print(f"{'trial':<44} {'state':<8} {'step':>6} {info['metric']:>12}")
    for t in rows:
        value = "-" if t["metric"] is None else f"{t['metric']['value']:.6g}"
        step = "-" if t["step"] is None else str(t["step"])
        print(f"{t['id']:<44} {t['state']:<8} {step:>6} {value:>12}")
    best = info["best"]
    print(f"best: {best['id']} ({best['value']:.6g})" if best else "best: - (no trial has finished with the metric)")
    sys.stdout.flush()


def _order(trial: dict[str, Any], mode: str) -> tuple[bool, float]:
    if trial["metric"] is None:
        return True, 0.0
    value = trial["metric"]["value"]
    return False, value if mode == "min" else -value


def plot_sweep(sdir: SweepDir, out: Path) -> list[str]:
    """Every trial's eval curve of the sweep's metric in one figure (PNG at ``out``), the best trial drawn thickest.
    Returns the ids of the trials whose curve the figure holds (read back from its lines)."""
    import matplotlib  # noqa: PLC0415 - only for this command

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    info = sweep_status(sdir)
    key = f"eval/{info['metric']}"
    fig, ax = plt.subplots(figsize=(9, 5.5))
    for trial in info["trials"]:
        rows = [r for r in read_metrics(RunDir(trial["run_dir"])) if isinstance(r.get(key), (int, float))]
        if not rows:
            continue
        best = info["best"] is not None and trial["id"] == info["best"]["id"]
        style = "--" if trial["state"] == PRUNED else "-"
        ax.plot([r["step"] for r in rows], [r[key] for r in rows], style, marker=".", lw=2.5 if best else 1.2,
                label=f"{trial['id']} ({trial['state']})", gid=trial["id"])  # fmt: skip
    drawn = [line.get_gid() for line in ax.get_lines()]
    if not drawn:
        plt.close(fig)
        raise FileNotFoundError(f"no trial of the sweep in '{sdir.root}' has an eval of {key} yet")
    ax.set_xlabel("global step")
    ax.set_ylabel(key)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.suptitle(f"sweep {sdir.root} ({info['mode']} {key}; dashed: pruned)")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return drawn
