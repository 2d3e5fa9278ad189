"""Scale: the global order's cost at any dataset size, ddp vs fsdp vs hsdp at world size 4, and the memory of the GPT
task on token files of 100 MB and 2 GB.

- ``order``: a rank's sampler (2 ranks x 32 samples a step, rank 0) over ``--steps`` steps, for datasets of 10**6,
  10**9 and 10**12 samples: wall time per step (the indices of a step, computed a block of 256 steps at a time),
  against the loop benchmark's toy step (``benchmarks/results/loop.json``, floor: the ideal loop's step); memory:
  the process's RSS growth from building the order to the end, and what the order holds (its block). The
  ``randperm`` scheme (runs begun before the Feistel one) for 10**6 only: it materialises 8 bytes a sample.
- ``parallel``: ddp, fsdp and hsdp (shard groups of 2) at 4 ranks on this CPU: the state each rank holds
  (parameters, gradients, AdamW moments: sharded_bench's memory job, ~100 MB in all), and end to end the quickstart
  at hidden 2048 (4.3 M parameters), global batch 64: the median step time and the largest rank's peak RSS (torch
  itself, FSDP's all-gather buffers and the allocator's retained memory included).
- ``tokens``: the GPT task (configs/gpt.yaml's model, seq_len 64) on a token file of random ids of 100 MB and of
  2 GB (real bytes on disk), 2 ranks, 100 steps: every process's peak RSS (the ranks' own ``rss_peak_mb``; the
  launcher's through ``getrusage``).

    python benchmarks/scale_bench.py [--parts order parallel tokens] [--repeats 2] [--out results/scale.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil

ROOT = Path(__file__).resolve().parents[1]
PEAK = ROOT / "tests" / "support" / "peak_rss.py"


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests" / "support")])}


def _toy_step_ms() -> float | None:
    """The loop benchmark's ideal step (the floor's toy: 2 ranks x 32 samples), in ms."""
    path = ROOT / "benchmarks" / "results" / "loop.json"
    if not path.is_file():
        return None
    floor = json.loads(path.read_text()).get("floor") or {}
    rate = (floor.get("ideal_samples_per_s") or {}).get("median")
    return 1000 * 64 / rate if rate else None


def order_part(steps: int) -> list[dict]:
    from workers.config import config_from_dict, plan_batches  # noqa: PLC0415
    from workers.data import StepBatchSampler  # noqa: PLC0415

    plan = plan_batches(config_from_dict({}, ["data.global_batch_size=64"]), 2)
    toy = _toy_step_ms()
    rows = []
    for n, scheme in [(10**6, "randperm"), (10**6, "feistel"), (10**9, "feistel"), (10**12, "feistel")]:
        proc = psutil.Process()
        before = proc.memory_info().rss
        sampler = StepBatchSampler(n, 0, plan, rank=0, start_step=0, scheme=scheme)
        it = iter(sampler)
        t0 = time.perf_counter()
        for _ in range(steps * plan.accum_steps):
            next(it)
        per_step_us = 1e6 * (time.perf_counter() - t0) / steps
        grown = (proc.memory_info().rss - before) / 2**20
        held = 8 * n if scheme == "randperm" else 8 * sampler.block_steps * plan.per_rank_batch
        rows.append({
            "n": n, "scheme": scheme, "steps": steps, "per_step_us": round(per_step_us, 2),
            "share_of_toy_step": round(per_step_us / 1000 / toy, 5) if toy else None,
            "rss_growth_mb": round(grown, 1), "order_holds_bytes": held,
        })  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)
    for n in (10**9, 10**12):
        rows.append({"n": n, "scheme": "randperm", "not_run": f"would materialise {8 * n / 1e9:,.0f} GB per rank"})
    return rows


def _launch(run: Path, nproc: int, *overrides: str, config: str = "configs/quickstart.yaml") -> tuple[float, list]:
    cmd = [sys.executable, str(PEAK), sys.executable, "-m", "orchestrator", "launch", config, "--nproc", str(nproc),
           f"run.dir={run}", "tracking.mode=disabled", "eval.every=0", *overrides]  # fmt: skip
    proc = subprocess.run(cmd, check=False, env=_env(), cwd=ROOT, text=True, capture_output=True, timeout=1200)
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-3000:])
    launcher = float(re.search(r"PEAK_RSS_MB (\S+)", proc.stderr).group(1))
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return launcher, [r for r in rows if "rank0/rss_peak_mb" in r]


def parallel_part(repeats: int) -> list[dict]:
    """Per mode at world size 4: the state each rank holds (benchmarks/sharded_bench.py's memory job: parameters,
    gradients and AdamW moments after one step, the local shards of DTensors; ~100 MB of state) and, end to end,
    the step time and peak RSS of the quickstart at hidden 2048."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from sharded_bench import run_job  # noqa: PLC0415

    modes = {"ddp": [], "fsdp": ["train.parallel=fsdp"], "hsdp": ["train.parallel=hsdp", "train.shard_size=2"]}
    state = {m: max(r["total"] for r in run_job(4, kind="memory", mode=m, mb=100)) / 1e6 for m in modes}
    found: dict[str, list[tuple[float, float]]] = {m: [] for m in modes}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(repeats):
            for mode, extra in modes.items():  # interleaved: the machine's drift hits every mode alike
                _, rows = _launch(Path(tmp) / f"{mode}-{r}", 4, "task.args={hidden: 2048}", "train.max_steps=60",
                                  "train.log_every=10", "data.global_batch_size=64", "train.checkpoint_every=1000",
                                  *extra)  # fmt: skip
                peak = max(rows[-1][f"rank{k}/rss_peak_mb"] for k in range(4))
                step = statistics.median(r["rank0/step_time_ms"] for r in rows[1:])  # past the first window
                found[mode].append((peak, step))
    out = []
    for mode, runs in found.items():
        peak, step = statistics.median(p for p, _ in runs), statistics.median(s for _, s in runs)
        out.append({"mode": mode, "world_size": 4, "state_per_rank_mb": round(state[mode], 1),
                    "state_of_ddp": round(state[mode] / state["ddp"], 3), "e2e_step_time_ms": round(step, 1),
                    "e2e_max_rank_peak_rss_mb": round(peak, 1), "repeats": repeats})  # fmt: skip
        print(json.dumps(out[-1]), flush=True)
    return out


def _token_file(path: Path, size: int) -> None:
    rng = np.random.default_rng(0)
    with open(path, "wb") as f:
        left = size // 2
        while left:
            count = min(left, 1 << 25)
            rng.integers(0, 256, count, dtype=np.uint16).tofile(f)
            left -= count


def tokens_part() -> list[dict]:
    out = []
    with tempfile.TemporaryDirectory(dir=os.environ.get("ORCH_BENCH_TMP")) as tmp:
        for label, size in (("100 MB", 100 * 10**6), ("2 GB", 2 * 10**9)):
            path = Path(tmp) / "tokens.bin"
            _token_file(path, size)
            args = json.dumps({"tokens": str(path), "seq_len": 64, "d_model": 64, "n_layers": 2, "n_heads": 4})
            launcher, rows = _launch(Path(tmp) / f"run-{size}", 2, "task.factory=workers.tasks.gpt:build",
                                     f"task.args={args}", "train.max_steps=100", "train.log_every=10",
                                     "data.global_batch_size=32")  # fmt: skip
            peaks = [rows[-1][f"rank{k}/rss_peak_mb"] for k in range(2)]
            out.append({"file": label, "bytes": size, "steps": 100, "launcher_peak_rss_mb": launcher,
                        "rank_peak_rss_mb": peaks, "limit_mb": 700, "met": max([launcher, *peaks]) < 700})  # fmt: skip
            print(json.dumps(out[-1]), flush=True)
            path.unlink()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="+", default=["order", "parallel", "tokens"])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4096)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "scale.json"))
    args = parser.parse_args()
    out = Path(args.out)
    result = json.loads(out.read_text()) if out.is_file() else {}
    result.update(benchmark="scale", machine={"cpus": os.cpu_count(), "python": platform.python_version(),
                                              "platform": platform.platform()})  # fmt: skip
    if "order" in args.parts:
        result["order"] = order_part(args.steps)
        result["order_goal"] = "a step's indices < 1% of the toy step, memory independent of n"
    if "parallel" in args.parts:
        result["parallel"] = parallel_part(args.repeats)
    if "tokens" in args.parts:
        result["tokens"] = tokens_part()
    out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
