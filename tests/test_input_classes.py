"""Bad input by class (issue 23, item 5): for each class of mistake, a few of its members, typed as a user types
them into the real CLI (subprocesses). Each is one line naming the key, value or path with a HINT, exit 2, never
retried, and nothing is written: a run dir that was absent stays absent, and a folder that is not a run dir is never
written into.

The classes: a run.dir that is an existing folder of other files (a data folder, the user's home, the repo, /etc);
a key given both dotted and nested in one YAML file; evaluate() outputs on another device than the model; an
optimizer the training loop cannot drive (LBFGS needs a closure) or that holds a parameter twice; a symlinked folder
inside a checkpoint (dcp/) at resume, in ckpt inspect, ckpt export and train.init_from; a run.dir with a line break
or another control character. (tests/test_bad_input.py holds the single cases, one per key.)
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import QUICK, ROOT, env, launch, shared_runs

CONFIG = str(ROOT / "configs" / "quickstart.yaml")  # absolute: some cases run in another working directory
TASK = "task.factory=orch_test_tasks:input_classes"  # tests/support/orch_test_tasks.py: quick + one mistake
# Every name a run writes at the top of its run dir (workers/rundir.py): none may appear in a refused folder.
RUN_NAMES = (".lock", "config.yaml", "checkpoints", "logs", "metrics.jsonl", "samples", "tracking.json", "wandb")


def _cli(*args: str, cwd: Path = ROOT, home: Path | None = None) -> subprocess.CompletedProcess:
    """``python -m orchestrator ARGS`` in ``cwd`` (with ``HOME=home`` when given), run to its end."""
    extra = {"HOME": str(home)} if home is not None else {}
    return subprocess.run([sys.executable, "-m", "orchestrator", *args], env={**env(), **extra}, cwd=cwd,
                          text=True, capture_output=True, timeout=300)  # fmt: skip


def _refused(proc: subprocess.CompletedProcess, *expected: str) -> str:
    """The process was refused as a usage error: exit 2, one line with every ``expected`` text and a HINT, no
    traceback, no restart. Returns the line."""
    err = proc.stderr
    lines = err.strip().splitlines()
    assert proc.returncode == 2, err
    assert len(lines) == 1 and lines[0].startswith("orchestrator: error:"), err
    for text in expected:
        assert text in lines[0], lines[0]
    assert "HINT: " in lines[0] and "Traceback" not in err and "restarting" not in err, lines[0]
    return lines[0]


def _fingerprint(root: Path) -> dict[str, tuple[int, int, bytes]] | None:
    """Every path under ``root`` with its size, mtime and bytes (None when ``root`` is absent)."""
    if not root.exists():
        return None
    found = {}
    for path in sorted(root.rglob("*")):
        st = path.lstat()
        content = path.read_bytes() if path.is_file() and not path.is_symlink() else b""
        found[str(path.relative_to(root))] = (st.st_size, st.st_mtime_ns, content)
    return found


def _run_names_in(folder: Path) -> list[str]:
    return [name for name in RUN_NAMES if (folder / name).exists() or (folder / name).is_symlink()]


# ---------------------------------------------------------------- 1. a folder that is not a run dir


def _data_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "data"
    (folder / "images").mkdir(parents=True)
    (folder / "notes.txt").write_text("my notes\n")
    (folder / "images" / "cat.png").write_bytes(b"\x89PNG")
    return folder


def test_a_folder_of_other_files_is_refused_untouched(tmp_path):
    folder = _data_folder(tmp_path)
    before = _fingerprint(folder)
    line = _refused(_cli("launch", CONFIG, f"run.dir={folder}", *QUICK), f"'run.dir' = '{folder}'", "not a run dir")
    assert "images" in line and "notes.txt" in line  # what is there, so the user sees which folder it is
    assert _fingerprint(folder) == before


def test_the_users_home_typed_with_a_tilde_is_refused_untouched(tmp_path):
    """``run.dir=~/`` (the shell leaves a ``~`` after ``=`` alone): the home folder, not a folder named ``~``.
    A bare ``~`` is YAML's "no value": refused as such."""
    home, cwd = _data_folder(tmp_path), tmp_path / "cwd"
    (home / ".bashrc").write_text("export PS1='$ '\n")
    cwd.mkdir()
    before = _fingerprint(home)
    for typed, expected in (("~/", f"'run.dir' = '{home}': is a folder of other files"),
                            ("~", "'run.dir' = None: expected str, got no value")):  # fmt: skip
        _refused(_cli("launch", CONFIG, f"run.dir={typed}", *QUICK, cwd=cwd, home=home), expected)
        assert _fingerprint(home) == before
        assert not list(cwd.iterdir()), "a folder named '~' was made in the working directory"


@pytest.mark.parametrize("folder", [ROOT, Path("/etc")], ids=["the repo root", "/etc"])
def test_the_repo_root_and_etc_are_refused_untouched(folder, tmp_path):
    # A safety net behind the check under test: an init_from that does not exist is found right after the run dir
    # check, before anything is written. Should the run-dir check ever let these folders through, the test fails on
    # the message instead of writing a run into /etc or into the repo that others are working in.
    net = f"train.init_from={tmp_path / 'never-read.pt'}"
    before = _run_names_in(folder)
    _refused(_cli("launch", CONFIG, f"run.dir={folder}", *QUICK, net), f"'run.dir' = '{folder}'", "not a run dir")
    assert _run_names_in(folder) == before


def test_what_counts_as_a_run_dir(tmp_path):
    """Absent, empty, or carrying a mark only a run leaves (its lock, its checkpoints, its SLURM jobs): usable.
    Anything else with entries is refused, hidden files included."""
    from workers.errors import ConfigError
    from workers.preflight import check_run_dir
    from workers.rundir import RunDir

    marks = {".lock": "file", "checkpoints": "dir", "slurm/jobs.json": "file"}
    usable = [tmp_path / "absent", tmp_path / "empty"]
    (tmp_path / "empty").mkdir()
    for i, (mark, kind) in enumerate(marks.items()):
        path = tmp_path / f"run{i}" / mark
        path.parent.mkdir(parents=True)
        path.mkdir() if kind == "dir" else path.write_text("")
        usable.append(tmp_path / f"run{i}")
    for folder in usable:
        check_run_dir(RunDir(folder))
    for name in (".DS_Store", "config.yaml", "logs"):  # a user's own config.yaml or logs/ alone is no run
        (tmp_path / f"not-{name}").mkdir()
        (tmp_path / f"not-{name}" / name).write_text("")
        with pytest.raises(ConfigError, match="not a run dir"):
            check_run_dir(RunDir(tmp_path / f"not-{name}"))
    assert not (tmp_path / "absent").exists()


# ---------------------------------------------------------------- 2. a key given dotted and nested


DOTTED_AND_NESTED = {
    "a leaf, dotted first": ("train.max_steps: 5\ntrain:\n  seed: 1\n  max_steps: 7\n", "'train.max_steps'", 1, 4),
    "a leaf, nested first": ("train:\n  max_steps: 7\ntrain.max_steps: 5\n", "'train.max_steps'", 2, 3),
    "a task arg under a dotted section": (
        "task.args: {n: 200, hidden: 8}\ntask:\n  factory: orch_test_tasks:quick\n  args:\n    hidden: 16\n",
        "'task.args.hidden'", 1, 5,
    ),
    "two dotted keys, one inside the other": (
        "task.args.hidden: 8\ntask.args: {hidden: 16}\n", "'task.args.hidden'", 1, 2,
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(DOTTED_AND_NESTED))
def test_a_key_given_dotted_and_nested_in_one_file_is_refused_with_both_lines(case, tmp_path):
    text, key, first, second = DOTTED_AND_NESTED[case]
    config, run = tmp_path / "c.yaml", tmp_path / "run"
    config.write_text(text)
    _refused(_cli("launch", str(config), f"run.dir={run}", *QUICK), f"config file '{config}'", key,
             f"lines {first} and {second}")  # fmt: skip
    assert not run.exists()


def test_dotted_and_nested_keys_that_do_not_overlap_merge(tmp_path):
    from workers.config import load_config

    config = tmp_path / "c.yaml"
    config.write_text("task.args: {hidden: 8}\ntask:\n  args: {n: 100}\ntrain.seed: 3\ntrain:\n  max_steps: 9\n")
    cfg = load_config(config)
    assert cfg.task.args == {"hidden": 8, "n": 100}
    assert (cfg.train.seed, cfg.train.max_steps) == (3, 9)


# ---------------------------------------------------------------- 3. evaluate() on another device


def test_evaluate_outputs_on_another_device_than_the_model_are_refused_before_training(tmp_path):
    """A CPU-only machine has one other device: 'meta' (tensors without data). On a GPU the same check refuses
    per-sample values left on the CPU (``.cpu()``, a tensor made without ``device=``)."""
    run = tmp_path / "run"
    proc = _cli("launch", CONFIG, "--nproc", "1", f"run.dir={run}", *QUICK, TASK, "task.args.eval_device=meta",
                "eval.every=4", "launch.max_restarts=2")  # fmt: skip
    _refused(proc, "evaluate() returned 'mse' on device meta", "the model is on cpu")
    assert not run.exists()


# ---------------------------------------------------------------- 4. an optimizer the loop cannot drive


OPTIMIZERS = {
    "lbfgs": "LBFGS, whose step() needs a closure",
    "two_groups": "holds a parameter in more than one parameter group",
    "twice_in_group": "holds '0.weight' twice (group 0)",
}


@pytest.mark.parametrize("kind", sorted(OPTIMIZERS))
def test_an_optimizer_that_needs_a_closure_or_holds_a_parameter_twice_is_refused(kind, tmp_path):
    run = tmp_path / "run"
    proc = _cli("launch", CONFIG, "--nproc", "1", f"run.dir={run}", *QUICK, TASK, f"task.args.optimizer_kind={kind}",
                "launch.max_restarts=2")  # fmt: skip
    _refused(proc, "the task's optimizer", OPTIMIZERS[kind])
    assert "UserWarning" not in proc.stderr
    assert not run.exists()


# ---------------------------------------------------------------- 5. a symlinked folder inside a checkpoint


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> Path:
    """An fsdp run on one rank: step 4 (shards only) and step 8 (shards and the final model.pt)."""

    def build(base: Path) -> None:
        launch(base / "run", 1, "train.parallel=fsdp", "train.max_steps=8")

    return shared_runs(tmp_path_factory, "input-classes-fsdp", build) / "run"


def test_a_symlinked_dcp_folder_is_refused_everywhere(sharded, tmp_path):
    """``dcp/`` replaced by a link to a byte-identical copy elsewhere: every checksum still matches, so only the link
    itself can give it away. A link could point anywhere (another run's shards): never read through one."""
    run = shutil.copytree(sharded, tmp_path / "run", symlinks=True)
    step8 = run / "checkpoints" / "step-00000008"
    elsewhere = shutil.move(step8 / "dcp", tmp_path / "elsewhere")
    (step8 / "dcp").symlink_to(elsewhere, target_is_directory=True)
    kept = _fingerprint(Path(elsewhere))

    inspect = _cli("ckpt", "inspect", str(step8))
    assert inspect.returncode == 0 and f"complete: NO — '{step8 / 'dcp'}' is a symbolic link" in inspect.stdout
    assert f"latest valid: {run / 'checkpoints' / 'step-00000004'}" in _cli("ckpt", "inspect", str(run)).stdout

    dest = tmp_path / "out.pt"
    _refused(_cli("ckpt", "export", str(step8), str(dest)), f"'{step8 / 'dcp'}' is a symbolic link")
    assert not dest.exists()

    other = tmp_path / "other"
    _refused(_cli("launch", CONFIG, f"run.dir={other}", *QUICK, f"train.init_from={step8}"),
             "'train.init_from'", f"'{step8 / 'dcp'}' is a symbolic link")  # fmt: skip
    assert not other.exists()

    # at resume: skipped with a warning naming it, like a checkpoint with a symlinked file; the older one is used
    resumed = launch(run, 1, "train.parallel=fsdp", "train.max_steps=12")
    assert "skipping checkpoint step-00000008:" in resumed.stderr and "is a symbolic link" in resumed.stderr
    assert f"resumed from {run / 'checkpoints' / 'step-00000004'}: step 4" in resumed.stderr
    assert (run / "checkpoints" / "latest").read_text().strip() == "step-00000012"
    assert _fingerprint(Path(elsewhere)) == kept  # the link's target was neither read into the run nor deleted


# ---------------------------------------------------------------- 6. a run.dir with control characters


def test_a_run_dir_with_a_line_break_or_a_control_character_is_refused(tmp_path):
    parent = tmp_path / "runs"
    parent.mkdir()
    typed = {
        "a line break typed in the shell ($'a\\nb')": ["launch", CONFIG, f"run.dir={parent}/a\nb", *QUICK],
        "a YAML escape on the command line": ["launch", CONFIG, f'run.dir="{parent}/a\\nb"', *QUICK],
        "a tab": ["launch", CONFIG, f"run.dir={parent}/a\tb", *QUICK],
        "a carriage return": ["launch", CONFIG, f'run.dir="{parent}/a\\rb"', *QUICK],
    }
    config = tmp_path / "c.yaml"
    config.write_text(f'run:\n  dir: "{parent}/a\\nb"\n')
    typed["a YAML escape in the config file"] = ["launch", str(config), *QUICK]
    for what, argv in typed.items():
        line = _refused(_cli(*argv), "config key 'run.dir'", "control character")
        assert "\\" in line, (what, line)  # the character is shown escaped: the message stays one line
        assert not list(parent.iterdir()), what
