"""The architecture holds by tool, not by memory: import contracts (import-linter, pyproject.toml), one owner of
the run dir's layout, and the typed files that cross the process boundary."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

from workers.contract import ErrorRecord, FailureKind, TrainState
from workers.errors import CheckpointError, ConfigError, RunDirLockedError

LINT = [sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command as m; sys.exit(m())"]


def _lint(tree: Path) -> subprocess.CompletedProcess:
    """Run import-linter with the project's contracts on the packages under ``tree``."""
    env = {"PYTHONPATH": str(tree), "PATH": "/usr/bin:/bin"}
    return subprocess.run(LINT, cwd=tree, env=env, capture_output=True, text=True, timeout=120)


def _copy_tree(tmp_path: Path) -> Path:
    tree = tmp_path / "tree"
    for name in ("workers", "orchestrator"):
        shutil.copytree(ROOT / name, tree / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tree / "pyproject.toml")
    return tree


def _plant(tree: Path, module: str, line: str) -> None:
    path = tree / module
    path.write_text(path.read_text() + f"\n\ndef _planted() -> None:\n    {line}  # noqa\n")


def test_the_import_contracts_hold_and_catch_a_planted_cycle_and_a_reverse_import(tmp_path):
    real = _lint(ROOT)
    assert real.returncode == 0, real.stdout + real.stderr
    assert "4 kept, 0 broken" in real.stdout

    # A lazy import inside a function is an import too: schema -> loader closes a cycle inside workers.config,
    # where no layer contract looks — only the acyclic contract can catch it.
    tree = _copy_tree(tmp_path)
    _plant(tree, "workers/config/schema.py", "from workers.config import loader")
    cycle = _lint(tree)
    assert cycle.returncode != 0
    assert "No cycles are allowed in workers.config" in cycle.stdout, cycle.stdout
    assert "1 broken" in cycle.stdout

    tree = _copy_tree(tmp_path / "again")
    _plant(tree, "workers/train/trainer.py", "import orchestrator.launcher")
    reverse = _lint(tree)
    assert reverse.returncode != 0
    assert "workers.train.trainer -> orchestrator.launcher" in reverse.stdout, reverse.stdout


# The run dir's literal names: only workers/rundir.py may spell them (acceptance of the structure issue).
# A folder name counts where it is used as a path component (`/ "best"`, `"checkpoints/…"`, `joinpath("logs")`):
# the same words are also plain dict keys ("best", "samples" in an eval result) that name no path.
_FOLDERS = r"(checkpoints|logs|latest|best|samples|wandb|submitit)"
RUN_DIR_NAMES = re.compile(
    rf"""/\s*["']{_FOLDERS}["']|["']/?{_FOLDERS}/{_FOLDERS}|["']/{_FOLDERS}["']|(join|joinpath)\([^)]*["']{_FOLDERS}["']|"""
    r"""metrics\.jsonl|metrics\.png|error-rank|heartbeat-rank|events\.jsonl|jobs\.json|tracking\.json|"""
    r"""config\.yaml|["\']\.lock["\']"""
)


def test_the_layout_pattern_tells_a_path_from_a_dict_key():
    for path_spelling in ('run / "best"', 'root.joinpath("logs")', '"checkpoints/latest"', 'p + "/samples"'):
        assert RUN_DIR_NAMES.search(path_spelling), path_spelling
    for key in ('info["best"] = 1', 'out["samples"]', '{"samples": 3}', '"eval/samples"', '"samples/s"'):
        assert not RUN_DIR_NAMES.search(key), key


def test_only_the_run_dir_module_spells_the_run_dirs_layout():
    offenders = []
    for path in sorted([*(ROOT / "workers").rglob("*.py"), *(ROOT / "orchestrator").rglob("*.py")]):
        if path == ROOT / "workers" / "rundir.py":
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if RUN_DIR_NAMES.search(line):
                offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


def test_train_state_is_read_through_one_type_and_malformed_state_is_corrupt(tmp_path):
    state = TrainState(step=8, samples_seen=192, world_size=2, global_batch_size=24, seed=3, task="m:f")
    again = TrainState.from_json(state.to_json())
    assert again == state
    old = {"step": 4, "samples_seen": 96, "world_size": 1, "global_batch_size": 24, "seed": 0, "future": [1]}
    parsed = TrainState.from_json(json.dumps(old))  # an older file without the optional fields, a newer key
    assert parsed.step == 4 and parsed.task is None and json.loads(parsed.to_json())["future"] == [1]
    no_step = {k: v for k, v in old.items() if k != "step"}
    bad_values = [{**old, "step": "x"}, {**old, "step": -1}, {**old, "seed": True}, no_step]
    for bad in ["[]", "{", '"x"', *map(json.dumps, bad_values)]:
        with pytest.raises(CheckpointError, match="train_state"):
            TrainState.from_json(bad, "x/train_state.json")


def test_error_records_carry_the_failure_kind_as_an_enum(tmp_path):
    path = tmp_path / "error.json"
    cases = {
        ConfigError("bad key"): FailureKind.CONFIG,
        RunDirLockedError("held"): FailureKind.CONFIG,
        CheckpointError("corrupt"): FailureKind.CHECKPOINT,
        RuntimeError("boom"): FailureKind.EXCEPTION,
    }
    for exc, kind in cases.items():
        try:
            raise exc
        except Exception as caught:
            ErrorRecord.from_exception(1, caught, "77").write(path)
        record = ErrorRecord.read(path)
        assert record.kind is kind and record.rank == 1 and record.job_id == "77"
        assert kind.retryable == (kind is FailureKind.EXCEPTION)
        assert json.loads(path.read_text())["kind"] == kind.value
        assert record.traceback.startswith("Traceback") and record.detail == str(exc)
    for junk in ("", "[]", '{"rank": 0}', '{"rank": "0", "kind": "config", "message": "m"}', '{"kind": "nope"}'):
        path.write_text(junk)
        assert ErrorRecord.read(path) is None


def test_every_end_to_end_test_file_proves_some_package():
    from conftest import SUITES

    grouped = {name for files in SUITES.values() for name in files}
    loose = [p.name for p in sorted((ROOT / "tests").glob("test_*.py")) if p.name not in grouped]
    assert not loose, f"add these to SUITES in tests/conftest.py: {loose}"


def test_each_package_group_selects_its_files_tests():
    """``pytest -m GROUP`` collects the tests of every file SUITES names for GROUP (conftest.py marks them, the
    SLURM tests mark themselves), and nothing of a file outside the group."""
    from conftest import SUITES

    for group, files in SUITES.items():
        cmd = [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:xdist", "-o", "addopts=", "-m", group]
        targets = [f"tests/{files[0]}", "tests/test_architecture.py" if group != "launch" else "tests/test_sweep.py"]
        proc = subprocess.run([*cmd, *targets], cwd=ROOT, capture_output=True, text=True, timeout=120)
        collected = {line.split("::")[0] for line in proc.stdout.splitlines() if "::" in line}
        assert collected == {targets[0]}, f"pytest -m {group} collected {collected}:\n{proc.stdout}{proc.stderr}"


def _sources() -> list[Path]:
    return sorted([*(ROOT / "workers").rglob("*.py"), *(ROOT / "orchestrator").rglob("*.py")])


def test_no_module_class_or_function_grows_past_what_one_reader_holds():
    """Structure v2's limits: a module of at most 450 lines, a class of 250, a function of 60."""
    import ast

    limits = {ast.ClassDef: 250, ast.FunctionDef: 60, ast.AsyncFunctionDef: 60}
    too_big = []
    for path in _sources():
        text = path.read_text()
        if len(text.splitlines()) > 450:
            too_big.append(f"{path.relative_to(ROOT)}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            limit = limits.get(type(node))
            if limit and node.end_lineno - node.lineno + 1 > limit:
                too_big.append(f"{path.relative_to(ROOT)}: {node.name} {node.end_lineno - node.lineno + 1} lines")
    assert not too_big, "\n".join(too_big)


def test_the_task_contract_is_read_in_one_module():
    """The task's optional hooks are looked up once, into the typed Task (workers/tasks/spec.py); everything else
    reads its attributes."""
    hooks = "collate_fn|eval_dataset|evaluate|optimizer|scheduler|shard_units|random_samples"
    lookup = re.compile(rf"""\b(getattr|hasattr)\([^,()]+,\s*["']({hooks})["']""")
    found = [
        f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
        for path in _sources()
        if path != ROOT / "workers" / "tasks" / "spec.py"
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if lookup.search(line)
    ]
    assert not found, "\n".join(found)
    assert lookup.search((ROOT / "workers" / "tasks" / "spec.py").read_text())  # (the pattern finds the real one)
