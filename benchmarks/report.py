"""Render BENCHMARKS.md from ``benchmarks/results/*.json`` (written by the benchmarks; see run_all.py).

    python benchmarks/report.py [--results benchmarks/results] [--out BENCHMARKS.md]

Every number in BENCHMARKS.md comes from a result file; a benchmark not run yet shows as such.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _load(results: Path, name: str) -> dict | None:
    path = results / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _mm(d: dict, fmt: str = "{:.3f}", unit: str = "") -> str:
    """median (min–max)"""
    return f"{fmt.format(d['median'])}{unit} ({fmt.format(d['min'])}–{fmt.format(d['max'])})"


def _missing(title: str, command: str) -> str:
    return f"## {title}\n\nNot run yet: `{command}`.\n"


def loop_section(r: dict | None) -> tuple[str, list[str]]:
    title, cmd = (
        "Step overhead, launch latency, scaling: vs a hand-written DDP loop and torchrun",
        ("python benchmarks/loop_bench.py --repeats 5 --steps 3000"),
    )
    if r is None:
        return _missing(title, cmd), []
    lines = [f"## {title}", "", f"`{cmd}`", "",
             "Method: the hand-written loop is `benchmarks/handwritten_ddp.py` under `torchrun` — the same model and",
             "data (the quickstart task), global batch 64, world size 2, gloo, AdamW with warmup + cosine, gradient",
             "clipping, a `loss.item()` print every 10 steps; no checkpoints, no resume, no supervision. Ours is",
             "`orchestrator launch configs/quickstart.yaml --nproc 2` with its defaults (tracking disabled: it has its",
             "own benchmark below). Both measure their own wall clock from the end of step 10 to the end of the last",
             "step; the two runs alternate, and the ratio is taken per pair. Median (min–max). The default-path row",
             "trains `benchmarks/plain_task.py` with both: `nn.Linear(10, 2)` on a TensorDataset, a task that",
             "declares nothing (no `random_samples`), 32 samples per rank and step.", "",
             "| model | ours samples/s | hand-written samples/s | ratio | goal |",
             "|---|---:|---:|---:|---:|"]  # fmt: skip
    summary = []
    rows = [(f"hidden {row['hidden']}", row) for row in r["step_overhead"]]
    rows += [("default path (plain task)", r["plain"])] if "plain" in r else []
    for name, row in rows:
        ok, goal = ("met" if row["met"] else "**not met**"), row.get("goal", ">= 0.99").replace(">=", "≥")
        lines.append(
            f"| {name} | {_mm(row['ours_samples_per_s'], '{:.0f}')} | "
            f"{_mm(row['handwritten_samples_per_s'], '{:.0f}')} | {_mm(row['ratio'])} | {goal} ({ok}) |"
        )
        summary.append(f"| step throughput vs hand-written DDP, {name} | {goal} | "
                       f"{row['ratio']['median']:.3f} | {ok} |")  # fmt: skip
    la = r["launch"]
    ok = "met" if la["met"] else "**not met**"
    lines += ["", f"Launch latency ({la['steps']} steps, world size 2), seconds from the command's start:", "",
              "| | to the first completed step | to exit |", "|---|---:|---:|",
              f"| `orchestrator launch` | {_mm(la['ours_to_first_step_s'])} | {_mm(la['ours_to_exit_s'])} |",
              f"| `torchrun` + hand-written loop | {_mm(la['torchrun_to_first_step_s'])} | "
              f"{_mm(la['torchrun_to_exit_s'])} |", ""]  # fmt: skip
    summary.append(f"| launch → first step vs torchrun | ≤ torchrun | {la['ours_to_first_step_s']['median']:.2f} s "
                   f"vs {la['torchrun_to_first_step_s']['median']:.2f} s | {ok} |")  # fmt: skip
    if "floor" in r:
        fl = r["floor"]
        ok = "met" if fl["met"] else "**not met**"
        intro = (
            "Against the floor (`--sections floor`): the plain task, 2 ranks x 32 samples, ours vs two hand-written "
            "loops with no DataLoader — *ideal*: every batch gathered into tensors before the first step (only "
            "compute, all-reduce, optimizer); *fetch*: `dataset[i]` per sample and `default_collate` each step."
        )
        lines += [intro, "", "| loop | samples/s | ours as a share of it | goal |", "|---|---:|---:|---:|",
                  f"| ours (telemetry on) | {_mm(fl['ours_samples_per_s'], '{:.0f}')} | – | – |",
                  f"| ideal | {_mm(fl['ideal_samples_per_s'], '{:.0f}')} | {_mm(fl['ratio_of_ideal'])} | ≥ 0.90 |",
                  f"| fetch | {_mm(fl['fetch_samples_per_s'], '{:.0f}')} | {_mm(fl['ratio_of_fetch'])} | ≥ 0.95 |",
                  ""]  # fmt: skip
        shares = f"{fl['ratio_of_ideal']['median']:.3f} / {fl['ratio_of_fetch']['median']:.3f}"
        summary.append(
            f"| step throughput vs the ideal / fetch loops (plain task) | ≥ 0.90 / ≥ 0.95 | {shares} | {ok} |"
        )
    lines += ["Scaling (ours, samples/s):", "", "| model | world size 1 | world size 2 | speed-up |",
              "|---|---:|---:|---:|"]  # fmt: skip
    for row in r["scaling"]:
        lines.append(f"| hidden {row['hidden']} | {_mm(row['ws1_samples_per_s'], '{:.0f}')} | "
                     f"{_mm(row['ws2_samples_per_s'], '{:.0f}')} | {row['speedup']:.2f}× |")  # fmt: skip
    lines += ["", (NOTES / "loop.md").read_text().strip() if (NOTES / "loop.md").exists() else "", ""]
    return "\n".join(lines), summary


def checkpoint_section(r: dict | None) -> tuple[str, list[str]]:
    title, cmd = (
        "Checkpoints: training-blocked time vs `torch.save`",
        ("python benchmarks/checkpoint_bench.py --repeats 3 --out benchmarks/results/checkpoint.json"),
    )
    if r is None:
        return _missing(title, cmd), []
    lines = [f"## {title}", "", f"`{cmd}`", "", (NOTES / "checkpoint.md").read_text().strip(), "",
             "| state | raw write | `torch.save` blocked | `sync` blocked | `async` blocked | `async` until committed "
             "| sync write speed (of raw) | load |", "|---:|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    summary = []
    for row in r["results"]:
        lines.append(
            f"| {row['state_mb']:.0f} MB | {row['raw_write_mb_s']['median']:.0f} MB/s | "
            f"{_mm(row['torch.save']['blocked_s'])} s | {_mm(row['sync']['blocked_s'])} s | "
            f"**{_mm(row['async']['blocked_s'])} s** | {row['async']['total_s']['median']:.3f} s | "
            f"{row['sync']['write_mb_s']:.0f} MB/s ({row['sync']['write_mb_s'] / row['raw_write_mb_s']['median']:.0%})"
            f" | {row['load_s']['median']:.3f} s |"
        )
        factor = row["torch.save"]["blocked_s"]["median"] / row["async"]["blocked_s"]["median"]
        ok = "met" if factor > 1 else "**not met**"
        summary.append(f"| async save blocks training, {row['state_mb']:.0f} MB | < `torch.save` | "
                       f"{factor:.1f}× less than `torch.save` | {ok} |")  # fmt: skip
    big = max(r["results"], key=lambda row: row["state_mb"])
    share = big["sync"]["write_mb_s"] / big["raw_write_mb_s"]["median"]
    summary.append(f"| sync save write speed vs raw write + fsync, {big['state_mb']:.0f} MB | ≥ 70 % | {share:.0%} | "
                   f"{'met' if share >= 0.7 else '**not met**'} |")  # fmt: skip
    return "\n".join(lines) + "\n", summary


def recovery_section(local: dict | None, slurm: dict | None) -> tuple[str, list[str]]:
    lines, summary = ["## Recovery", ""], []
    if local is None:
        lines.append("Local: not run yet: `python benchmarks/recovery_bench.py --trials 5`.")
    else:
        k = local["kill_to_first_step_s"]
        lines += ["`python benchmarks/recovery_bench.py --trials 5`", "",
                  f"Local restarts ({local['setup']}): SIGKILL of the rank → the restarted group's first completed "
                  f"step: **{_mm(k, '{:.2f}')} s**; steps redone per trial (since the last checkpoint): "
                  f"{local['steps_redone']}.", ""]  # fmt: skip
        ok = "met" if k["median"] <= 1.0 else "**not met**"
        summary.append(f"| recovery: SIGKILL of a rank → next step (local) | ≤ 1.0 s | {k['median']:.2f} s | {ok} |")
    if slurm is None:
        lines.append("SLURM: not run yet: `python benchmarks/slurm_requeue_bench.py --trials 3`.")
    else:
        s = slurm["summary"]
        lines += ["`python benchmarks/slurm_requeue_bench.py --trials 3`", "",
                  f"SLURM ({slurm['setup']}; {slurm['cluster']}), median (min–max):", "",
                  "| notice → all saved, requeue asked | → requeued job started (SLURM + imports) "
                  "| → first completed step | total | steps lost |", "|---:|---:|---:|---:|---:|",
                  f"| {_mm(s['notice_to_saved_s'])} s | {_mm(s['saved_to_restarted_s'], '{:.2f}')} s | "
                  f"{_mm(s['restarted_to_first_step_s'], '{:.2f}')} s | **{_mm(s['notice_to_first_step_s'], '{:.1f}')}"
                  f" s** | {', '.join(map(str, slurm['steps_lost']))} |", ""]  # fmt: skip
        summary.append(
            f"| recovery: USR2 → requeued job's first step (SLURM) | – | "
            f"{s['notice_to_first_step_s']['median']:.1f} s, steps lost {max(slurm['steps_lost'])} | – |"
        )
    lines += [(NOTES / "recovery.md").read_text().strip(), ""]
    return "\n".join(lines), summary


def tracking_section(r: dict | None) -> tuple[str, list[str]]:
    title, cmd = (
        "Tracking: what logging costs per step",
        ("python benchmarks/tracking_bench.py --repeats 5 --out benchmarks/results/tracking.json"),
    )
    if r is None:
        return _missing(title, cmd), []
    lines = [f"## {title}", "", f"`{cmd}`", "", (NOTES / "tracking_method.md").read_text().strip(), "",
             "| model | mode | steps/s | vs no logging (medians) | paired, median (min–max) | rank-0 logging work "
             "| wandb CPU a row (of one core) |",
             "|---|---|---:|---:|---:|---:|---:|"]  # fmt: skip
    summary = []
    for row in r["results"]:
        paired = row["paired_overhead_pct"]
        lines.append(
            f"| hidden {row['hidden']} ({row['step_ms']:.1f} ms/step) | {row['mode']} | "
            f"{_mm(row['steps_per_s'], '{:.1f}')} | {row['end_to_end_overhead_pct']:+.1f} % | "
            f"{paired['median']:+.1f} % ({paired['min']:+.1f}…{paired['max']:+.1f}) | "
            f"{row['rank0_logging_work_pct_of_time']:.2f} % | "
            + (f"{row['wandb_cpu_ms_per_row']:.2f} ms ({row['wandb_cpu_pct_of_one_core']:.1f} %) |"
               if "wandb_cpu_ms_per_row" in row else "– |")
        )  # fmt: skip
        if row["mode"] == "jsonl + wandb offline":
            ok = "met" if paired["median"] <= 1 else "**not met**"
            summary.append(f"| tracking cost (paired median), hidden {row['hidden']} | ≤ 1 % | "
                           f"{paired['median']:+.1f} % | {ok} |")  # fmt: skip
    lines += ["", (NOTES / "tracking.md").read_text().strip(), ""]
    return "\n".join(lines), summary


def eval_section(r: dict | None) -> tuple[str, list[str]]:
    title, cmd = (
        "Evaluation: vs a hand-written `torch.no_grad()` loop, and what `eval.every` costs training",
        "python benchmarks/eval_bench.py --repeats 3 --out benchmarks/results/eval.json",
    )
    if r is None:
        return _missing(title, cmd), []
    lines = [f"## {title}", "", f"`{cmd}`", "", (NOTES / "eval.md").read_text().strip(), "",
             "| model | eval samples (batch) | ours samples/s | hand-written samples/s | ratio (goal ≥ 0.95) "
             "| same loss |",
             "|---|---:|---:|---:|---:|---|"]  # fmt: skip
    summary = []
    for row in r["throughput"]:
        ok = "met" if row["met"] else "**not met**"
        lines.append(f"| hidden {row['hidden']} | {row['eval_samples']} ({row['batch_size']}) | "
                     f"{_mm(row['ours_samples_per_s'], '{:.0f}')} | "
                     f"{_mm(row['handwritten_samples_per_s'], '{:.0f}')} | "
                     f"{_mm(row['ratio'])} ({ok}) | {'yes' if row['same_loss'] else 'NO'} |")  # fmt: skip
        summary.append(f"| eval throughput vs hand-written no_grad loop, hidden {row['hidden']} | ≥ 0.95 | "
                       f"{row['ratio']['median']:.3f} | {ok} |")  # fmt: skip
    tc = r["training_cost"]
    lines += ["", f"Training throughput with evals ({tc['steps']} steps, {tc['eval_samples']} eval samples in "
              f"batches of {tc['eval_batch_size']}, world size 2):", "",
              "| `eval.every` | training samples/s (evals included) | ratio to no eval |",
              "|---:|---:|---:|"]  # fmt: skip
    for run in tc["runs"]:
        every = "0 (off)" if run["every"] == 0 else str(run["every"])
        lines.append(f"| {every} | {_mm(run['samples_per_s'], '{:.0f}')} | {_mm(run['ratio_to_off'])} |")
        if run["every"]:
            summary.append(f"| training cost of eval.every={run['every']} (quickstart) | – | "
                           f"{run['ratio_to_off']['median']:.3f} of no eval | – |")  # fmt: skip
    return "\n".join(lines) + "\n", summary


def checksum_section(r: dict | None) -> tuple[str, list[str]]:
    title, cmd = (
        "The checkpoint write path without the disk: the checksum's cost",
        "python benchmarks/checksum_bench.py --repeats 5 --out benchmarks/results/checksum.json",
    )
    if r is None:
        return _missing(title, cmd), []
    lines = [f"## {title}", "", f"`{cmd}`", "", (NOTES / "checksum.md").read_text().strip(), "",
             f"| `torch.save` of {r['state_mb']:.0f} MB to /dev/null through | MB/s |", "|---|---:|"]  # fmt: skip
    for name, rate in r["mb_per_s"].items():
        lines.append(f"| {name} | {_mm(rate, '{:.0f}')} |")
    now = next(v for k, v in r["mb_per_s"].items() if "now" in k)
    alone = r["mb_per_s"]["torch.save alone"]
    summary = [f"| checksummed serialisation vs torch.save alone (no disk) | – | "
               f"{now['median'] / alone['median']:.2f} | – |"]  # fmt: skip
    return "\n".join(lines) + "\n", summary


def guard_section(r: dict | None) -> tuple[str, list[str]]:
    title, cmd = (
        "The non-finite guard: `train.nonfinite: skip` vs `off`",
        "python benchmarks/guard_bench.py --repeats 4 --out benchmarks/results/guard.json",
    )
    if r is None:
        return _missing(title, cmd), []
    lines = [f"## {title}", "", f"`{cmd}`", "", (NOTES / "guard.md").read_text().strip(), "",
             "| model | `train.grad_clip` | step (µs) | guard's work (µs) | cost (goal ≤ 1 % at hidden 512) |",
             "|---|---:|---:|---:|---:|"]  # fmt: skip
    summary = []
    for row in r["per_step"]:
        ok = "" if row["goal"] == "-" else (" (met)" if row["met"] else " (**not met**)")
        lines.append(f"| hidden {row['hidden']} | {row['grad_clip']:g} | {row['step_us']:.0f} | "
                     f"{row['guard_us']:.2f} | {100 * row['cost']:.2f} %{ok} |")  # fmt: skip
        if row["hidden"] == 512:
            clip = "clipping on (default)" if row["grad_clip"] else "clipping off"
            summary.append(f"| non-finite guard per step, hidden 512, {clip} | ≤ 1 % | {100 * row['cost']:.2f} % | "
                           f"{'met' if row['met'] else '**not met**'} |")  # fmt: skip
    lines += ["", "End to end (world size 2, training samples/s):", "",
              "| model | skip | off | ratio skip / off |", "|---|---:|---:|---:|"]  # fmt: skip
    for row in r["end_to_end"]:
        lines.append(f"| hidden {row['hidden']} | {_mm(row['skip_samples_per_s'], '{:.0f}')} | "
                     f"{_mm(row['off_samples_per_s'], '{:.0f}')} | {_mm(row['ratio'])} |")  # fmt: skip
    return "\n".join(lines) + "\n", summary


def _rank_of(trial: dict, sharded: bool) -> str:
    """' of rank N' for a sharded run's mid-save trial (rank 1 dies in its shard, rank 0 in its files)."""
    return f" of rank {trial['rank']}" if sharded and trial["mode"] == "mid-save" else ""


def chaos_section(r: dict | None, parallel: str = "ddp") -> tuple[str, list[str]]:
    sharded = parallel == "fsdp"
    title = "Chaos: random SIGKILLs with restarts" + (", sharded (fsdp)" if sharded else "")
    cmd = (f"python scripts/chaos.py --trials {24 if sharded else 50} --seed 0"
           + (" --parallel fsdp --out benchmarks/results/chaos-fsdp.json" if sharded
              else " --out benchmarks/results/chaos.json"))  # fmt: skip
    if r is None:
        return _missing(title, cmd), []
    modes: dict[str, int] = {}
    for t in r["trials"]:
        key = f"{t['mode']}{_rank_of(t, sharded)} {'async' if t['async'] else 'sync'}"
        modes[key] = modes.get(key, 0) + 1
    secs = sorted(t["seconds"] for t in r["trials"])
    note = NOTES / ("chaos-fsdp.md" if sharded else "chaos.md")
    lines = [f"## {title}", "", f"`{cmd}`", "", note.read_text().strip(), "",
             f"**{r['survived']}/{r['total']} survived** (seed {r['seed']}; a rank was really killed in "
             f"{r['killed']}/{r['total']}). Trials: " + ", ".join(f"{n} × {k}" for k, n in sorted(modes.items()))
             + f". Each took {secs[0]:.1f}–{secs[-1]:.1f} s (median {secs[len(secs) // 2]:.1f} s), restart included.",
             ""]  # fmt: skip
    ok = "met" if r["survived"] == r["total"] else "**not met**"
    what = "chaos (fsdp): random SIGKILLs, rank 1 mid-shard too" if sharded else "chaos: random SIGKILLs"
    return "\n".join(lines), [f"| {what}, bitwise-equal finish | all | {r['survived']}/{r['total']} "
                              f"| {ok} |"]  # fmt: skip


def sharded_section(r: dict | None) -> tuple[str, list[str]]:
    title, cmd = (
        "Sharded training (fsdp) vs ddp: memory per rank, checkpoints, step speed",
        "python benchmarks/sharded_bench.py --repeats 3 --out benchmarks/results/sharded.json",
    )
    if r is None:
        return _missing(title, cmd), []
    lines = [f"## {title}", "", f"`{cmd}`", "", (NOTES / "sharded.md").read_text().strip(), "",
             "Bytes per rank of parameters + gradients + AdamW state after one step (the largest rank):", "",
             "| world size | ddp | fsdp | fsdp / ddp | goal ≤ 1/ws + 10 % | peak RSS ddp / fsdp |",
             "|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    summary = []
    for row in r["memory"]:
        ddp, fsdp = row["ddp"][0]["total"], max(x["total"] for x in row["fsdp"])
        ok = "met" if row["met"] else "**not met**"
        rss = f"{row['ddp'][0]['peak_rss'] / 1e6:.0f} / {max(x['peak_rss'] for x in row['fsdp']) / 1e6:.0f} MB"
        lines.append(f"| {row['world_size']} | {ddp / 1e6:.1f} MB | {fsdp / 1e6:.1f} MB | "
                     f"{row['fsdp_over_ddp']:.3f} | {row['goal']:.3f} ({ok}) | {rss} |")  # fmt: skip
        summary.append(f"| fsdp memory per rank (params+grads+optim), ws {row['world_size']} | ≤ "
                       f"{row['goal']:.3f} of ddp | {row['fsdp_over_ddp']:.3f} | {ok} |")  # fmt: skip
    lines += ["", "Checkpoints at world size 2, seconds (median; the slowest rank):", "",
              "| state | mode | sync save (blocked = committed) | async: blocked | async: committed | load |",
              "|---:|---|---:|---:|---:|---:|"]  # fmt: skip
    for row in r["checkpoint"]:
        for mode in ("ddp", "fsdp"):
            x = row[mode]
            lines.append(f"| {row['state_mb']:.0f} MB | {mode} | {x['sync_s']:.3f} | {x['async_blocked_s']:.3f} | "
                         f"{x['async_total_s']:.3f} | {x['load_s']:.3f} |")  # fmt: skip
    t = r["throughput"]
    speed = f"ddp {t['ddp']:.1f} steps/s, fsdp {t['fsdp']:.1f} steps/s ({t['fsdp'] / t['ddp']:.2f}×"
    lines += ["", f"Step throughput at world size 2 (4 × 1024 MLP, batch 64 a rank): {speed}; reported, not a goal "
              "on CPU).", ""]  # fmt: skip
    return "\n".join(lines), summary


NOTES = ROOT / "benchmarks" / "notes"


def diagnosis_section(r: dict | None) -> tuple[str, list[str]]:
    title, cmd = (
        "Diagnosis: the cost of a hang report",
        "python benchmarks/diagnosis_bench.py --repeats 3 --out benchmarks/results/diagnosis.json",
    )
    if r is None:
        return _missing(title, cmd), []
    lines = [
        f"## {title}", "", f"`{cmd}` — {r['setup']}.", "",
        "Every rank's stacks are read by py-spy (`--nonblocking`, all ranks at once) before the teardown; the same",
        "read serves `orchestrator stacks RUN`. From a SIGSTOP to the launcher's exit: the hang timeout, up to one",
        "heartbeat interval (1 s), the report, and the teardown's grace period.", "",
        "| | seconds |", "|---|---:|",
        f"| read every rank's stacks, both running | {_mm(r['capture_running_s'])} |",
        f"| read every rank's stacks, one frozen (SIGSTOP) | {_mm(r['capture_frozen_s'])} |",
        f"| SIGSTOP of rank 1 → launcher exit (hang timeout {r['hang_timeout_s']} s, grace {r['grace_s']} s) | "
        f"{_mm(r['sigstop_to_exit_s'], '{:.2f}')} |",
    ]  # fmt: skip
    summary = [f"| hang report (every rank's stacks) | – | {r['capture_frozen_s']['median']:.3f} s | – |"]
    return "\n".join(lines) + "\n", summary


def elastic_section(r: dict | None) -> tuple[str, list[str]]:
    title, cmd = (
        "Elastic capacity: from a lost node or a broken device slot to training again",
        "python benchmarks/elastic_bench.py --trials 3 --out benchmarks/results/elastic.json",
    )
    if r is None:
        return _missing(title, cmd), []
    lines, summary = [f"## {title}", "", f"`{cmd}`", ""], []
    if "slurm" in r:
        sl, t = r["slurm"], r["slurm"]["summary"]
        redone = [x["steps_redone"] for x in sl["trials"]]
        lines += [
            f"SLURM: {sl['setup']}.", "", "| | seconds |", "|---|---:|",
            f"| kill → the failure recorded by the batch script | {_mm(t['kill_to_failure_recorded_s'])} |",
            f"| → the requeued job started (on n1 alone) | {_mm(t['failure_recorded_to_restarted_s'])} |",
            f"| → its first step (world size 1) | {_mm(t['restarted_to_first_step_s'])} |",
            f"| kill → training again | {_mm(t['kill_to_first_step_s'])} |", "",
            f"Steps redone (logged before the kill, after the last checkpoint): {redone}; samples skipped or seen "
            f"twice: {sl['samples_skipped_or_repeated']}. Most of the time is SLURM's requeue and scheduling.", "",
        ]  # fmt: skip
        summary.append(f"| node loss on SLURM → training again | – | {t['kill_to_first_step_s']['median']:.1f} s | "
                       f"{max(sl['samples_skipped_or_repeated'])} samples skipped |")  # fmt: skip
    if "local" in r:
        lo = r["local"]
        drop = lo["summary"]["dropped_to_first_step_s"]
        lines += [f"Local: {lo['setup']}: the slot dropped → the first step on 2 workers: {_mm(drop)} s.", ""]
        summary.append(f"| broken local slot dropped → training again | – | {drop['median']:.3f} s | |")
    return "\n".join(lines), summary


def sweep_section(r: dict | None) -> tuple[str, list[str]]:
    title, cmd = (
        "Sweeps: what a sweep adds per trial",
        "python benchmarks/sweep_bench.py --repeats 3 --out benchmarks/results/sweep.json",
    )
    if r is None:
        return _missing(title, cmd), []
    lines = [
        f"## {title}", "", f"`{cmd}` — {r['setup']}.", "", "| | seconds |", "|---|---:|",
        f"| local: 4 trials through `orchestrator sweep` | {_mm(r['sweep_s'])} |",
        f"| local: the same 4 `orchestrator launch`es by hand | {_mm(r['by_hand_s'])} |",
        f"| local: overhead per trial | {_mm(r['overhead_per_trial_s'])} |",
    ]  # fmt: skip
    probe = (
        "The sweep checks `--metric` before any trial starts: it builds the task once per distinct task config and "
        "evaluates one small batch (torch and the task imported in the sweep process: about 2 s here, once per "
        "sweep). On these 4 trials of ~3 s that is most of the local overhead; on trials of minutes it vanishes."
    )
    summary = [f"| sweep overhead per trial (local) | – | {r['overhead_per_trial_s']['median']:.2f} s | |"]
    if isinstance(r.get("slurm"), dict):
        sl = r["slurm"]
        lines += [
            f"| SLURM: one array job (`sweep --slurm`) | {_mm(sl['sweep_s'])} |",
            f"| SLURM: 4 `orchestrator submit`s | {_mm(sl['by_hand_s'])} |",
            f"| SLURM: overhead per trial (negative: the array is faster) | {_mm(sl['overhead_per_trial_s'])} |",
            "", f"SLURM setup: {sl['setup']}.",
        ]  # fmt: skip
        per = sl["overhead_per_trial_s"]["median"]
        summary.append(f"| sweep overhead per trial (SLURM array) | – | {per:.2f} s | |")
    lines += ["", probe]
    return "\n".join(lines) + "\n", summary


def scale_section(r: dict | None) -> tuple[str, list[str]]:
    title, cmd = "Scale: the order, ddp vs fsdp vs hsdp, token files", "python benchmarks/scale_bench.py --repeats 2"
    if r is None:
        return _missing(title, cmd), []
    lines, summary = [f"## {title}", "", f"`{cmd}` (method: the module's docstring)."], []
    if r.get("order"):
        lines += ["", "The global order, rank 0 of 2 x 32 samples a step:", "",
                  "| samples | scheme | per step | of the toy step | RSS growth | the order holds |",
                  "|---:|---|---:|---:|---:|---:|"]  # fmt: skip
        for o in r["order"]:
            if "not_run" in o:
                lines.append(f"| {o['n']:.0e} | {o['scheme']} | – | – | – | {o['not_run']} |")
                continue
            share = f"{100 * o['share_of_toy_step']:.2f} %" if o.get("share_of_toy_step") else "–"
            lines.append(f"| {o['n']:.0e} | {o['scheme']} | {o['per_step_us']:.1f} µs | {share} | "
                         f"{o['rss_growth_mb']:.1f} MB | {o['order_holds_bytes']:,} B |")  # fmt: skip
        worst = max((o for o in r["order"] if o.get("share_of_toy_step")), key=lambda o: o["share_of_toy_step"])
        share = worst["share_of_toy_step"]
        summary.append(f"| a step's indices, any dataset size (feistel) | < 1 % of the toy step | "
                       f"{100 * share:.2f} % | {'met' if share < 0.01 else 'NOT met'} |")  # fmt: skip
    if r.get("parallel"):
        lines += ["", "ddp vs fsdp vs hsdp (groups of 2), 4 ranks on this CPU:", "",
                  "| mode | state per rank | of ddp | e2e step (hidden 2048) | e2e peak RSS (largest rank) |",
                  "|---|---:|---:|---:|---:|"]  # fmt: skip
        for p in r["parallel"]:
            lines.append(f"| {p['mode']} | {p['state_per_rank_mb']:.1f} MB | {p['state_of_ddp']:.3f} | "
                         f"{p['e2e_step_time_ms']:.1f} ms | {p['e2e_max_rank_peak_rss_mb']:.0f} MB |")  # fmt: skip
        lines += ["", "State: parameters, gradients and AdamW moments each rank holds. The end-to-end peak RSS of the "
                  "sharded modes is higher at this size: every rank builds the whole model before it is sharded, "
                  "and FSDP's all-gather buffers stay with the allocator; on CPU the all-gathers also make a step "
                  "slower than ddp's (hsdp's stay within groups of 2)."]  # fmt: skip
        hsdp = next(p for p in r["parallel"] if p["mode"] == "hsdp")
        summary.append(f"| hsdp (4 ranks, groups of 2): state per rank | 1/2 of ddp | {hsdp['state_of_ddp']:.3f} | |")
    if r.get("tokens"):
        lines += ["", "The GPT task on token files of random ids, 2 ranks, 100 steps (peak RSS):", "",
                  "| file | launcher | ranks | limit |", "|---|---:|---:|---:|"]  # fmt: skip
        for t in r["tokens"]:
            ranks = ", ".join(f"{v:.0f}" for v in t["rank_peak_rss_mb"])
            lines.append(f"| {t['file']} | {t['launcher_peak_rss_mb']:.0f} MB | {ranks} MB | {t['limit_mb']} MB |")
        worst = max(max(t["rank_peak_rss_mb"]) for t in r["tokens"])
        met = all(t["met"] for t in r["tokens"])
        summary.append(f"| GPT on a 2 GB token file: peak RSS per process | < 700 MB | {worst:.0f} MB | "
                       f"{'met' if met else 'NOT met'} |")  # fmt: skip
    return "\n".join(lines) + "\n", summary


def render(results: Path) -> str:
    parts, summary = [], []
    sections = [
        loop_section(_load(results, "loop")),
        checkpoint_section(_load(results, "checkpoint")),
        checksum_section(_load(results, "checksum")),
        recovery_section(_load(results, "recovery"), _load(results, "slurm_requeue")),
        tracking_section(_load(results, "tracking")),
        eval_section(_load(results, "eval")),
        guard_section(_load(results, "guard")),
        chaos_section(_load(results, "chaos")),
        sharded_section(_load(results, "sharded")),
        chaos_section(_load(results, "chaos-fsdp"), parallel="fsdp"),
        diagnosis_section(_load(results, "diagnosis")),
        elastic_section(_load(results, "elastic")),
        sweep_section(_load(results, "sweep")),
        scale_section(_load(results, "scale")),
    ]
    for text, rows in sections:
        parts.append(text)
        summary += rows
    head = [
        "# Benchmarks", "",
        "Generated by `python benchmarks/report.py` from `benchmarks/results/*.json`; `python benchmarks/run_all.py`",
        "runs every benchmark and then this. Benchmarks are not part of the test suite's pass/fail.", "",
        (NOTES / "machine.md").read_text().strip(), "",
        "| what | goal | measured (median) | |", "|---|---|---|---|", *summary, "",
    ]  # fmt: skip
    return "\n".join(head) + "\n" + "\n".join(parts).rstrip() + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md")
    args = parser.parse_args()
    args.out.write_text(render(args.results))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
