"""Shared helpers: run the real CLI in subprocesses, kill runs with real signals, compare real checkpoints."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SUPPORT = Path(__file__).resolve().parent / "support"

# The common training setup of the end-to-end tests: global batch 24 divides world sizes 1, 2, 3 with two
# accumulation micro-steps; 200 samples, so 12 steps x 24 cross two epoch boundaries.
MAX_STEPS, EVERY, GBS = 12, 4, 24
QUICK = [
    "task.factory=orch_test_tasks:quick",
    "task.args={n: 200, hidden: 32}",
    f"train.max_steps={MAX_STEPS}",
    f"train.checkpoint_every={EVERY}",
    f"data.global_batch_size={GBS}",
    "train.grad_accum_steps=2",
    "train.log_every=2",
    "data.record_indices=true",
    "optim.warmup_steps=3",
    "tracking.mode=disabled",
]


def env() -> dict[str, str]:
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join([str(SUPPORT), str(ROOT), e.get("PYTHONPATH", "")])
    e.pop("OMP_NUM_THREADS", None)
    return e


def cli(*args: str, timeout: float = 180, check: bool = False) -> subprocess.CompletedProcess:
    """Run ``python -m orchestrator ARGS`` to the end; return the completed process (text output)."""
    proc = subprocess.run(
        [sys.executable, "-m", "orchestrator", *args],
        env=env(),
        cwd=ROOT,
        text=True,
        capture_output=True,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


def launch(
    run_dir: Path, nproc: int, *overrides: str, config: str = "configs/quickstart.yaml", check: bool = True
) -> subprocess.CompletedProcess:
    return cli("launch", config, "--nproc", str(nproc), f"run.dir={run_dir}", *QUICK, *overrides, check=check)


def latest_name(run_dir: Path) -> str | None:
    path = run_dir / "checkpoints" / "latest"
    return path.read_text().strip() if path.exists() else None


def launch_and_kill(
    run_dir: Path,
    nproc: int,
    *overrides: str,
    kill_after: str | None,
    config: str = "configs/quickstart.yaml",
    timeout: float = 120,
    until: Callable[[], bool] | None = None,
) -> None:
    """Launch, wait until checkpoint ``kill_after`` is committed (None: no checkpoint yet) and ``until()`` holds
    (when given), then SIGKILL the whole run (launcher and workers: they share the process group of a new session)."""
    cmd = [
        sys.executable,
        "-m",
        "orchestrator",
        "launch",
        config,
        "--nproc",
        str(nproc),
        f"run.dir={run_dir}",
        *QUICK,
        *overrides,
    ]
    proc = subprocess.Popen(
        cmd, env=env(), cwd=ROOT, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + timeout
    try:
        while latest_name(run_dir) != kill_after or (until is not None and not until()):
            if proc.poll() is not None:
                raise AssertionError(f"run ended before {kill_after}: {proc.stderr.read()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no {kill_after} after {timeout} s")
            time.sleep(0.01)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert latest_name(run_dir) == kill_after, "the run got past the next checkpoint before the kill"


def final_dir(run_dir: Path, step: int = MAX_STEPS) -> Path:
    folder = run_dir / "checkpoints" / f"step-{step:08d}"
    assert (folder / "manifest.json").is_file(), f"{folder} is not a committed checkpoint"
    return folder


def load(run_dir: Path, name: str = "model.pt", step: int = MAX_STEPS):
    import torch

    return torch.load(final_dir(run_dir, step) / name, map_location="cpu", weights_only=True)


def rel_diff(a: dict, b: dict) -> float:
    """‖a − b‖ / ‖b‖ over all tensors of two state_dicts with the same keys."""
    import torch

    assert a.keys() == b.keys()
    num = sum(float(torch.sum((a[k].double() - b[k].double()) ** 2)) for k in a)
    den = sum(float(torch.sum(b[k].double() ** 2)) for k in b)
    return (num / den) ** 0.5


def tensors_equal(a, b) -> bool:
    """Bitwise equality of nested state (dicts/lists of tensors and plain values)."""
    import torch

    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(tensors_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(tensors_equal(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def consumed_sequence(run_dir: Path) -> list[list[int]]:
    """The global batches actually consumed, step by step, as recorded by the workers.

    For each step the latest launch that ran it wins (a killed run's steps after its last checkpoint are
    re-run by the next launch); within a step, ranks in order, micro-steps in order.
    """
    rows = defaultdict(list)
    for path in sorted((run_dir / "samples").glob("rank-*.jsonl")):
        for line in path.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                rows[row["step"]].append(row)
    out = []
    for step in sorted(rows):
        last = max(r["attempt"] for r in rows[step])
        chosen = sorted((r for r in rows[step] if r["attempt"] == last), key=lambda r: (r["rank"], r["micro"]))
        out.append([i for r in chosen for i in r["indices"]])
    return out


def shared_runs(tmp_path_factory, name: str, build: Callable[[Path], None]) -> Path:
    """A folder of runs built once per test session by ``build(folder)`` and shared by all xdist workers (the
    first to get here builds, the others wait for it): tests read these runs, or copy them before changing them."""
    from filelock import FileLock

    root = tmp_path_factory.getbasetemp()
    root = root.parent if os.environ.get("PYTEST_XDIST_WORKER") else root  # the session's, above each worker's
    base = root / name
    with FileLock(str(root / f"{name}.lock")):
        if not (base / ".built").exists():
            shutil.rmtree(base, ignore_errors=True)  # a build that failed half-way
            base.mkdir()
            build(base)
            (base / ".built").touch()
    return base


@pytest.fixture(scope="session")
def refs(tmp_path_factory) -> dict[int, Path]:
    """Uninterrupted reference runs of the common setup at world sizes 1, 2 and 3 (built once)."""

    def build(base: Path) -> None:
        for ws in (1, 2, 3):
            extra = [f"task.args.audit_dir={base / f'audit-ws{ws}'}"] if ws == 2 else []
            launch(base / f"ws{ws}", ws, *extra)

    base = shared_runs(tmp_path_factory, "refs", build)
    return {ws: base / f"ws{ws}" for ws in (1, 2, 3)}


@pytest.fixture(scope="session")
def killed2(tmp_path_factory) -> Path:
    """A ws=2 run SIGKILLed after its step-4 checkpoint (tests copy it before resuming)."""

    def build(base: Path) -> None:
        launch_and_kill(base / "ws2", 2, "task.args.step_sleep_s=0.1", kill_after=f"step-{EVERY:08d}")

    return shared_runs(tmp_path_factory, "killed", build) / "ws2"


def wandb_view(run: Path) -> tuple[str, list[list[int]], dict]:
    """(wandb run id, logged steps per start of the run, recorded config), read back from wandb's offline files."""
    from workers.tracking.wandb_records import history_steps, offline_logs, read_records

    rid = json.loads((run / "tracking.json").read_text())["wandb_run_id"]
    logs = offline_logs(run, rid)
    run_records = [r.run for p in logs for r in read_records(p) if r.WhichOneof("record_type") == "run"]
    assert {r.run_id for r in run_records} == {rid}
    config = {u.key: json.loads(u.value_json) for u in run_records[0].config.update}
    return rid, [history_steps(p) for p in logs], config


def fingerprint(root: Path, mtimes: bool = True) -> dict[str, tuple]:
    """Every entry under ``root`` (hidden ones too): size, content for files, and the mtime in ns (``mtimes``)."""
    found = {}
    for path in sorted(root.rglob("*")):
        st = path.lstat()
        content = path.read_bytes() if path.is_file() and not path.is_symlink() else b""
        found[str(path.relative_to(root))] = (st.st_size, content, st.st_mtime_ns if mtimes else 0)
    return found


def copy_run(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest)
    return dest


# Which tests prove which package: after a change to workers/<package>/, `python -m pytest -q -m <package>` runs its
# fast tests (tests/unit/) and the end-to-end tests that drive it (README.md, "Run the tests"). A test file may prove
# several packages; every test file belongs to at least one group (test_architecture checks that).
SUITES: dict[str, tuple[str, ...]] = {
    "checkpoint": (
        "test_checkpoints.py",
        "test_checkpoint_safety.py",
        "test_broken_run_state.py",
        "test_exactness.py",
        "test_sharded.py",
        "test_hsdp.py",
        "test_optimizers.py",
        "test_clean_reports.py",
        "test_resume_command.py",
        "test_fault_tolerance.py",
        "test_checkpointer.py",
        "test_checkpoint_format.py",
    ),
    "data": ("test_exactness.py", "test_units.py", "test_input_classes.py", "test_data.py", "test_order.py"),
    "eval": ("test_evaluation.py", "test_eval_defects.py", "test_readme_examples.py", "test_eval.py"),
    "tracking": (
        "test_tracking.py",
        "test_stepsync.py",
        "test_status_states.py",
        "test_read_only_commands.py",
        "test_tracking_unit.py",
    ),
    "train": (
        "test_numerics.py",
        "test_numerics_buffers.py",
        "test_exactness.py",
        "test_optimizers.py",
        "test_sharded.py",
        "test_wording.py",
        "test_trainer.py",
        "test_numerics_unit.py",
        "test_optim.py",
    ),
    "config": ("test_bad_input.py", "test_input_classes.py", "test_units.py", "test_cli.py", "test_config.py"),
    "launch": (
        "test_cli.py",
        "test_launcher_death.py",
        "test_fault_tolerance.py",
        "test_bad_input.py",
        "test_readme_examples.py",
        "test_resume_command.py",
        "test_status_states.py",
        "test_clean_reports.py",
        "test_architecture.py",
        "test_diagnosis.py",
        "test_contract.py",
        "test_dist.py",
        "test_elastic.py",
        "test_capacity.py",
        "test_selfwatch.py",
    ),
    "sweep": ("test_sweep.py", "test_sweep_spec.py"),
    "scale": ("test_scale.py", "test_order.py", "test_hsdp.py", "test_tokens.py"),
    "slurm": ("test_slurm.py",),
}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark each test with the packages its file proves (SUITES)."""
    for item in items:
        for group, files in SUITES.items():
            if item.path.name in files and group != "slurm":  # (the SLURM tests mark themselves)
                item.add_marker(getattr(pytest.mark, group))
