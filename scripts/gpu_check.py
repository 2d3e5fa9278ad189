"""GPU paths that the CPU test suite cannot reach: NCCL at world size 1, CUDA placement, bf16 and fp16 (GradScaler)
steps, checkpoint save and a bitwise resume on the GPU, the non-finite guard and train.sync_batchnorm, sharded
training (train.parallel=fsdp: FSDP2 over NCCL, bf16 MixedPrecisionPolicy, a DCP save, sync and async, and a
bitwise resume, peak GPU memory vs ddp), hsdp's 2-D mesh in bf16, the GPT task's tokens/s and MFU, NCCL's flight
recorder; then a GPU
benchmark (our loop vs the hand-written DDP loop in bf16 on one GPU, and checkpoint blocked time sync vs async with
pinned memory). Prints a table; exit code 1 if any check fails.

Run with scripts/gpu_check.sh on a machine with at least one CUDA GPU.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from workers.rundir import RunDir

ROOT = Path(__file__).resolve().parents[1]
COMMON = [
    "train.max_steps=20",
    "train.checkpoint_every=10",
    "train.log_every=5",
    "tracking.mode=disabled",
    "launch.device=cuda",
    "data.global_batch_size=64",
    "train.deterministic=true",
]
rows: list[tuple[str, bool, str]] = []


# The test suite's tasks (tests/support/orch_test_tasks.py): a poisoned sample, a model with BatchNorm.
TEST_TASKS = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "tests" / "support"), str(ROOT)])}


def launch(run: Path, *overrides: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "-m",
        "orchestrator",
        "launch",
        "configs/quickstart.yaml",
        "--nproc",
        "1",
        f"run.dir={run}",
        *COMMON,
        *overrides,
    ]
    try:
        return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=150, check=False, env=env)
    except subprocess.TimeoutExpired as e:  # a hung launch is one failed check, not the end of the script
        err = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
        return subprocess.CompletedProcess(cmd, 124, "", err + "\n[gpu_check] timed out after 150 s")


def load(run: Path, step: int, name: str) -> dict:
    return torch.load(RunDir(run).step_dir(step) / name, map_location="cpu", weights_only=True)


def equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(equal(x, y) for x, y in zip(a, b, strict=True))
    return a == b


_T0 = time.monotonic()


def check(name: str, ok: bool, detail: str) -> None:
    """Record one check, and print it at once: a run cut short by its time limit still shows what passed."""
    rows.append((name, ok, detail))
    print(f"[{time.monotonic() - _T0:6.1f} s] {'PASS' if ok else 'FAIL'}  {name}  {detail}", flush=True)


def main() -> int:
    check(
        "cuda visible",
        torch.cuda.is_available(),
        torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU",
    )
    if not torch.cuda.is_available():
        return report()
    tmp = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    # GPU_CHECK_PARTS=sharded,benchmark (say) reruns only those parts, e.g. after a fix, to spare device time.
    parts = set(
        filter(
            None,
            os.environ.get("GPU_CHECK_PARTS", "precision,numerics,faults,sharded,scale,flight,benchmark").split(","),
        )
    )
    for precision in ("fp32", "bf16", "fp16") if "precision" in parts else ():
        run = tmp / precision
        proc = launch(run, f"train.precision={precision}")
        placed = "on cuda:0 (nccl" in proc.stderr
        check(
            f"{precision}: NCCL ws=1 train + save",
            proc.returncode == 0 and placed,
            f"exit {proc.returncode}" + ("" if placed else "; no 'on cuda:0 (nccl' log line"),
        )
        if proc.returncode:
            print(proc.stderr[-3000:], file=sys.stderr)
            continue
        sd = load(run, 20, "model.pt")
        check(
            f"{precision}: model.pt loads on CPU, no prefixes",
            all(not k.startswith(("module.", "_orig_mod.")) for k in sd)
            and all(t.device.type == "cpu" for t in sd.values()),
            f"{len(sd)} tensors",
        )
        if precision == "fp16":
            scaler = load(run, 20, "optim.pt")["scaler"]
            check("fp16: GradScaler state saved", bool(scaler) and "scale" in scaler, f"scale={scaler.get('scale')}")
        # bitwise resume on the GPU: drop the final checkpoint, resume from step 10, compare.
        resumed = tmp / f"{precision}-resumed"
        shutil.copytree(run, resumed)
        shutil.rmtree(RunDir(resumed).step_dir(20))
        proc = launch(resumed, f"train.precision={precision}")
        same = (
            proc.returncode == 0
            and equal(load(resumed, 20, "model.pt"), sd)
            and equal(load(resumed, 20, "optim.pt"), load(run, 20, "optim.pt"))
        )
        check(f"{precision}: resume from step 10 bitwise", same, f"exit {proc.returncode}")
        if precision == "bf16":  # async checkpoints: pinned host snapshot on CUDA, same weights as sync
            async_run = tmp / "bf16-async"
            proc = launch(async_run, f"train.precision={precision}", "train.async_checkpoint=true")
            same = proc.returncode == 0 and equal(load(async_run, 10, "model.pt"), load(run, 10, "model.pt"))
            check("bf16: async (pinned) checkpoint = sync", same, f"exit {proc.returncode}")
    if "numerics" in parts:
        numerics(tmp)
    if "faults" in parts:
        faults(tmp)
    if "sharded" in parts:
        if not (tmp / "bf16").exists():  # the bf16 ddp run the sharded peak memory is compared with
            launch(tmp / "bf16", "train.precision=bf16")
        sharded(tmp, tmp / "bf16")
    if "scale" in parts:
        scale(tmp)
    if "flight" in parts:
        flight_recorder(tmp)
    if "benchmark" in parts:
        benchmark(tmp)
    shutil.rmtree(tmp, ignore_errors=True)
    return report()


def _peak_mem_mb(run: Path) -> float | None:
    """The largest ``rank<r>/cuda_max_mem_mb`` value in the run's metrics rows."""
    values = [
        v
        for line in RunDir(run).metrics.read_text().splitlines()
        if line.strip()
        for k, v in json.loads(line).items()
        if k.endswith("cuda_max_mem_mb") and isinstance(v, (int, float))  # rank<r>/cuda_max_mem_mb
    ]
    return max(values) if values else None


def sharded(tmp: Path, ddp_run: Path) -> None:
    """train.parallel=fsdp on the GPU: FSDP2 over NCCL (one rank: the mesh, DTensors, the bf16 policy and DCP are all
    real), its checkpoint (shards, model.pt, sync and async with the GPU staging copy), a bitwise resume, and the
    peak memory next to the bf16 ddp run's."""
    fsdp = ["train.parallel=fsdp", "train.precision=bf16", "train.export_model=every"]
    run = tmp / "fsdp-bf16"
    proc = launch(run, *fsdp)
    policy = "bf16 parameters, fp32 reductions" in proc.stderr
    check(
        "fsdp: bf16 policy, NCCL, train + sharded save",
        proc.returncode == 0 and policy,
        f"exit {proc.returncode}" + ("" if policy else "; no 'bf16 parameters, fp32 reductions' log line"),
    )
    if proc.returncode:
        print(proc.stderr[-3000:], file=sys.stderr)
        return
    folder = RunDir(run).step_dir(20)
    sd = load(run, 20, "model.pt")
    shards = folder / "dcp" / "__0_0.distcp"
    check(
        "fsdp: model.pt full + plain, shard file written",
        shards.is_file() and all(t.device.type == "cpu" and not k.startswith("module.") for k, t in sd.items()),
        f"{len(sd)} tensors",
    )
    from workers.checkpoint import dcp_io  # noqa: PLC0415

    gathered = dcp_io.read_full(folder / "dcp", dcp_io.MODEL_PREFIX)
    check("fsdp: ckpt shards == model.pt", equal(gathered, sd), "")
    resumed = tmp / "fsdp-resumed"
    shutil.copytree(run, resumed)
    shutil.rmtree(RunDir(resumed).step_dir(20))
    proc = launch(resumed, *fsdp)
    same = (
        proc.returncode == 0
        and equal(load(resumed, 20, "model.pt"), sd)
        and equal(
            dcp_io.read_full(RunDir(resumed).step_dir(20) / "dcp", dcp_io.OPTIM_PREFIX),
            dcp_io.read_full(folder / "dcp", dcp_io.OPTIM_PREFIX),
        )
    )
    check("fsdp: resume from step 10 bitwise (model + optimizer)", same, f"exit {proc.returncode}")
    async_run = tmp / "fsdp-async"
    proc = launch(async_run, *fsdp, "train.async_checkpoint=true")
    same = proc.returncode == 0 and equal(load(async_run, 10, "model.pt"), load(run, 10, "model.pt"))
    check("fsdp: async (GPU staging) checkpoint = sync", same, f"exit {proc.returncode}")
    into_ddp = tmp / "fsdp-to-ddp"
    shutil.copytree(run, into_ddp)
    shutil.rmtree(RunDir(into_ddp).step_dir(20))
    proc = launch(into_ddp, "train.precision=bf16", "train.parallel=ddp")
    check("fsdp checkpoint -> ddp resume on the GPU", proc.returncode == 0, f"exit {proc.returncode}")
    mem = {"ddp": _peak_mem_mb(ddp_run), "fsdp": _peak_mem_mb(run)}
    check(
        "fsdp: peak GPU memory vs ddp (1 rank: no saving expected)",
        all(mem.values()),
        f"ddp {mem['ddp']} MB, fsdp {mem['fsdp']} MB",
    )


def scale(tmp: Path) -> None:
    """hsdp (a 1 x 1 mesh on one GPU: the 2-D mesh, FSDP2 over NCCL and the bf16 policy) trains and saves; the GPT
    task on a token file trains in bf16 with tokens/s and MFU (the GPU's peak is known) in its metrics rows."""
    proc = launch(tmp / "hsdp", "train.parallel=hsdp", "train.precision=bf16")
    said = "hsdp: 3 unit(s) + root sharded over groups of 1 ranks" in proc.stderr
    check(
        "hsdp: bf16 policy, 2-D mesh over NCCL, train + save", proc.returncode == 0 and said, f"exit {proc.returncode}"
    )
    tokens = tmp / "tokens.bin"
    sub = subprocess.run([sys.executable, "-m", "orchestrator", "data", "tokenize",
                          str(ROOT / "workers" / "tasks" / "data" / "tiny_corpus.txt"), str(tokens)],
                         cwd=ROOT, capture_output=True, text=True, check=False)  # fmt: skip
    args = json.dumps({"tokens": str(tokens), "seq_len": 32, "d_model": 256, "n_layers": 4, "n_heads": 4})
    run = tmp / "gpt"
    proc = launch(run, "task.factory=workers.tasks.gpt:build", f"task.args={args}", "train.precision=bf16",
                  "data.global_batch_size=32")  # fmt: skip
    rows = [json.loads(x) for x in RunDir(run).metrics.read_text().splitlines()] if proc.returncode == 0 else []
    mfu = [r["mfu"] for r in rows if "mfu" in r]
    check("gpt: token file, bf16, tokens/s and MFU reported", sub.returncode == 0 and bool(mfu) and mfu[-1] > 0,
          f"exit {proc.returncode}, mfu {mfu[-1] if mfu else None}")  # fmt: skip


def flight_recorder(tmp: Path) -> None:
    """NCCL's flight recorder under the settings workers/entry.py gives a GPU run records our collectives (one
    rank: a dump of its buffer after an all-reduce holds the all-reduce)."""
    code = (
        "import os, pickle, torch, torch.distributed as dist\n"
        "dist.init_process_group('nccl', init_method='tcp://127.0.0.1:29533', rank=0, world_size=1, "
        "device_id=torch.device('cuda', 0))\n"
        "t = torch.ones(4, device='cuda'); dist.all_reduce(t); torch.cuda.synchronize()\n"
        "trace = pickle.loads(torch._C._distributed_c10d._dump_nccl_trace())\n"
        "print('ENTRIES', [e.get('profiling_name') for e in trace.get('entries', [])])\n"
        "dist.destroy_process_group()\n"
    )
    env = {**os.environ, "TORCH_NCCL_TRACE_BUFFER_SIZE": "2000", "TORCH_NCCL_DUMP_ON_TIMEOUT": "1",
           "TORCH_FR_DUMP_TEMP_FILE": str(tmp / "nccl-trace-rank-")}  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120,
                          check=False)  # fmt: skip
    line = next((x for x in proc.stdout.splitlines() if x.startswith("ENTRIES")), "")
    check("flight recorder: records an NCCL all-reduce", "allreduce" in line, line or proc.stderr[-500:])


def faults(tmp: Path) -> None:
    """The launcher's death on the GPU: a long bf16 run, ``kill -9`` of the launcher's pid alone once a checkpoint
    exists; every process of the launch (a session of its own) must be gone within 5 s — CUDA workers included —
    and the GPU's memory given back; a relaunch right away must train alone (exit 0)."""
    run = tmp / "killed-launcher"
    cmd = [sys.executable, "-m", "orchestrator", "launch", "configs/quickstart.yaml", "--nproc", "1", f"run.dir={run}",
           *COMMON, "train.precision=bf16", "train.max_steps=1000000", "train.checkpoint_every=50"]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 120
    while RunDir(run).latest_name() is None and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    if proc.poll() is not None or RunDir(run).latest_name() is None:
        check("launcher kill -9: all gone in 5 s (CUDA)", False, "no checkpoint before the kill")
        proc.kill()
        return
    os.kill(proc.pid, 9)
    proc.wait()
    deadline, left = time.monotonic() + 5, []
    while time.monotonic() < deadline:
        left = _session_pids(proc.pid)
        if not left:
            break
        time.sleep(0.05)
    check("launcher kill -9: all gone in 5 s (CUDA)", not left, f"left: {left}" if left else "")
    again = launch(run, "train.precision=bf16", "train.max_steps=" + str(int(RunDir(run).latest_name()[5:]) + 20))
    check("launcher kill -9: relaunch right after trains alone", again.returncode == 0, f"exit {again.returncode}")


def _session_pids(sid: int) -> list[int]:
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                if os.getsid(int(name)) == sid and "Z" not in Path(f"/proc/{name}/stat").read_text().split()[2]:
                    found.append(int(name))
            except OSError:
                continue
    return found


def numerics(tmp: Path) -> None:
    """The non-finite guard on the GPU (fp32 skips a poisoned sample's steps; under fp16 the GradScaler skips them
    itself), and train.sync_batchnorm converting a BatchNorm model and training it under NCCL."""
    poison = ["task.factory=orch_test_tasks:quick", "task.args={n: 256, hidden: 64, poison_index: 3}"]
    for precision in ("fp32", "fp16"):
        proc = launch(tmp / f"nonfinite-{precision}", *poison, f"train.precision={precision}", env=TEST_TASKS)
        skipped = proc.stderr.count("step skipped on every rank")
        finite = proc.returncode == 0 and all(
            torch.isfinite(t).all() for t in load(tmp / f"nonfinite-{precision}", 20, "model.pt").values()
        )
        expected = skipped > 0 if precision == "fp32" else skipped == 0  # fp16: the scaler's own skips
        check(
            f"{precision}: poisoned sample, weights finite",
            finite and expected,
            f"exit {proc.returncode}, {skipped} guard skips",
        )
        if proc.returncode:
            print(proc.stderr[-3000:], file=sys.stderr)
    proc = launch(
        tmp / "syncbn",
        "task.factory=orch_test_tasks:quick",
        "task.args.batchnorm=true",
        "train.sync_batchnorm=true",
        env=TEST_TASKS,
    )
    converted = "now SyncBatchNorm" in proc.stderr
    check("sync_batchnorm: converted, trains (NCCL)", proc.returncode == 0 and converted, f"exit {proc.returncode}")
    if proc.returncode:
        print(proc.stderr[-3000:], file=sys.stderr)


# A GPU-sized step for the benchmark: the quickstart MLP at width 8192 (~67 M parameters) in bf16, batch 4096.
BENCH = ["task.args.hidden=8192", "task.args.n=65536", "data.global_batch_size=4096", "train.precision=bf16",
         "train.max_steps=300", "train.log_every=10", "train.deterministic=false"]  # fmt: skip


def _ours(run: Path, *extra: str) -> tuple[float, subprocess.CompletedProcess]:
    proc = launch(run, *BENCH, *extra)
    if proc.returncode:
        return 0.0, proc
    rows = {r["step"]: r for r in map(json.loads, RunDir(run).metrics.read_text().splitlines())}
    return (300 - 10) * 4096 / (rows[300]["time"] - rows[10]["time"]), proc


def _handwritten(out: Path) -> float:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1", "--standalone",
           "benchmarks/handwritten_ddp.py", "--device", "cuda", "--bf16", "--hidden", "8192", "--samples", "65536",
           "--gbs", "4096", "--steps", "300", "--warm", "10", "--out", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=150, check=False)
    if proc.returncode:
        print(proc.stderr[-2000:], file=sys.stderr)
        return 0.0
    t = json.loads(out.read_text())
    return (300 - 10) * 4096 / (t["end"] - t["warm"])


def _blocked(stderr: str) -> list[float]:
    return [float(m) for m in re.findall(r"checkpoint step-\d+ [a-z, ]+; training blocked ([0-9.]+) s", stderr)]


def benchmark(tmp: Path) -> None:
    """Our loop vs the hand-written DDP loop on one GPU (bf16), 2 interleaved pairs; then checkpoint blocked time,
    sync vs async (pinned host copy), for the same ~67 M-parameter model (+ AdamW state: ~800 MB)."""
    ratios = []
    for i in range(2):
        ours, proc = _ours(tmp / f"bench-ours-{i}", "train.checkpoint_every=1000")
        hand = _handwritten(tmp / f"bench-hand-{i}.json")
        if ours and hand:
            ratios.append((ours, hand))
        elif proc.returncode:
            print(proc.stderr[-2000:], file=sys.stderr)
    detail = "; ".join(f"{o:.0f} vs {h:.0f} samples/s = {o / h:.3f}" for o, h in ratios) or "did not run"
    check("bench: bf16 throughput, ours / hand-written", bool(ratios), detail)
    blocked = {}
    for mode in ("false", "true"):
        _, proc = _ours(tmp / f"bench-ckpt-{mode}", "train.checkpoint_every=100", f"train.async_checkpoint={mode}")
        blocked[mode] = _blocked(proc.stderr)[:2]  # the periodic saves at steps 100 and 200 (the final is sync)
    check(
        "bench: checkpoint blocked s, sync vs async",
        all(blocked.values()),
        f"sync {blocked['false']} vs async (pinned) {blocked['true']}",
    )


def report() -> int:
    """Print the table (and write it to the file named by the first argument, if any); 1 if any check failed."""
    width = max(len(r[0]) for r in rows)
    lines = [f"{'check':<{width}}  result  detail"]
    lines += [f"{name:<{width}}  {'PASS' if ok else 'FAIL':<6}  {detail}" for name, ok, detail in rows]
    text = "\n".join(lines) + "\n"
    print(text, end="")
    if len(sys.argv) > 1:
        Path(sys.argv[1]).write_text(text)
    return 0 if all(ok for _, ok, _ in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
