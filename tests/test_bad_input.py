"""Bad input, as a user or an adversary types it: every case exits 2 with one line naming the key, file or value,
no traceback, never retried, and leaves the run dir byte for byte as it was (absent when it was absent).

Cases found by the launcher's own checks (before any worker starts) and cases only the workers can find (a task
factory's wrong return value, a checkpoint of another architecture or optimizer, a bad init_from file) are held to
the same promise: for the latter the launcher puts back what the launch had written.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import QUICK, ROOT, cli, env

# run.dir absent / a copy of a finished run (refs[2]) / the same, its newest train state as today's main wrote it
FRESH, EXISTING, OLDER_FORMAT = "fresh", "existing", "older format"

# name: (where, arguments ({m}: the materials folder), the text expected in the one line)
CASES: dict[str, tuple[str, list[str], str]] = {
    "lr nan": (FRESH, ["optim.lr=.nan"], "'optim.lr' = nan: must be a finite number"),
    "lr inf": (FRESH, ["optim.lr=.inf"], "'optim.lr' = inf: must be a finite number"),
    "lr negative": (FRESH, ["optim.lr=-1"], "'optim.lr' = -1.0: must be >= 0"),
    "grad clip nan": (FRESH, ["train.grad_clip=.nan"], "'train.grad_clip' = nan"),
    "hang timeout nan": (FRESH, ["launch.hang_timeout_s=.nan"], "'launch.hang_timeout_s' = nan"),
    "collective timeout inf": (FRESH, ["launch.collective_timeout_s=.inf"], "'launch.collective_timeout_s' = inf"),
    "collective timeout huge": (FRESH, ["launch.collective_timeout_s=1e12"], "must be in [1.0, 604800.0]"),
    "betas above one": (FRESH, ["optim.betas=[2,3]"], "'optim.betas[0]' = 2.0: must be in [0.0, 1.0)"),
    "betas one item": (FRESH, ["optim.betas=[0.9]"], "expected a list of 2 items"),
    "momentum negative": (FRESH, ["optim.name=sgd", "optim.momentum=-1"], "'optim.momentum' = -1.0"),
    "seed 1e23": (FRESH, ["train.seed=1e23"], "'train.seed' = 1e+23: out of range"),
    "seed negative": (FRESH, ["train.seed=-1"], "'train.seed' = -1: must be in [0,"),
    "max steps zero": (FRESH, ["train.max_steps=0"], "'train.max_steps' = 0: must be >= 1"),
    "max steps fraction": (FRESH, ["train.max_steps=2.5"], "expected int, got a fraction"),
    "global batch zero": (FRESH, ["data.global_batch_size=0"], "'data.global_batch_size' = 0"),
    "num workers negative": (FRESH, ["data.num_workers=-1"], "'data.num_workers' = -1"),
    "min lr ratio 2": (FRESH, ["optim.min_lr_ratio=2"], "'optim.min_lr_ratio' = 2.0: must be in [0.0, 1.0]"),
    "nproc zero": (FRESH, ["launch.nproc=0"], "'launch.nproc' = 0"),
    "max restarts negative": (FRESH, ["launch.max_restarts=-1"], "'launch.max_restarts' = -1"),
    "keep checkpoints zero": (FRESH, ["train.keep_checkpoints=0"], "'train.keep_checkpoints' = 0"),
    "slurm time zero": (FRESH, ["slurm.time_min=0"], "'slurm.time_min' = 0"),
    "warmup negative": (FRESH, ["optim.warmup_steps=-5"], "'optim.warmup_steps' = -5"),
    "profile steps zero": (FRESH, ["profile.start_step=2", "profile.steps=0"], "'profile.steps' = 0"),
    "profile past the end": (FRESH, ["profile.start_step=100000"], "'profile.start_step' = 100000: past"),
    "profile rank outside": (FRESH, ["profile.start_step=2", "profile.ranks=[7]"], "rank 7 is outside the world"),
    "bad choice": (FRESH, ["tracking.mode=sometimes"], "'tracking.mode' = 'sometimes': must be one of"),
    "unknown key": (FRESH, ["train.max_step=5"], "did you mean 'train.max_steps'"),
    "task arg unknown": (FRESH, ["task.factory=workers.tasks.quickstart:build", "task.args={hiden: 32}"],
                         "'task.args.hiden' = 32: workers.tasks.quickstart:build takes no parameter 'hiden'"),
    "task arg type": (FRESH, ["task.factory=workers.tasks.quickstart:build", "task.args={hidden: abc}"],
                      "'task.args.hidden' = 'abc': workers.tasks.quickstart:build expects int"),
    "factory returns junk": (FRESH, ["task.factory=orch_test_tasks:not_a_task"], "the object it returned"),
    "init_from missing": (FRESH, ["train.init_from={m}/nope.pt"], "'train.init_from'"),
    "init_from junk dir": (FRESH, ["train.init_from={m}/junk"], "is a folder, but neither a run dir"),
    "init_from empty file": (FRESH, ["train.init_from={m}/empty.pt"], "empty or truncated"),
    "init_from truncated": (FRESH, ["train.init_from={m}/truncated.pt"], "'train.init_from'"),
    "init_from text file": (FRESH, ["train.init_from={m}/notes.txt"], "not a PyTorch weights file"),
    "init_from pickled code": (FRESH, ["train.init_from={m}/evil.pt"], "pickled code, which is never run"),
    "init_from other shapes": (FRESH, ["train.init_from={m}/wide.pt"], "'0.weight' has shape [64, 16]"),
    "init_from other architecture": (FRESH, ["train.init_from={m}/other.pt"], "is missing from the weights"),
    "run.dir empty": (FRESH, ["run.dir="], "'run.dir' = '': must name a folder"),
    "run.dir root": (FRESH, ["run.dir=/"], "is the file system's root"),
    "run.dir is a file": (FRESH, ["run.dir={m}/notes.txt"], "is a file, not a folder"),
    "run.dir under a file": (FRESH, ["run.dir={m}/notes.txt/run"], "is a file, so no folder can be made under it"),
    "nproc not dividing": (FRESH, ["--nproc", "48"], "not divisible by world size 48"),
    "config is a directory": (FRESH, ["--config={m}"], "is a directory"),
    "config duplicate section": (FRESH, ["--config={m}/twice.yaml"], "'train' is given twice (lines 1 and 3)"),
    "config syntax error": (FRESH, ["--config={m}/broken.yaml"], "is not valid YAML at line 3, column 2"),
    "config nested unknown": (FRESH, ["--config={m}/typo.yaml"], "did you mean 'train.max_steps'"),
    "resume other width": (EXISTING, ["task.args.hidden=64"], "'0.weight' has shape [32, 16] in the weights"),
    "resume other optimizer": (EXISTING, ["optim.name=sgd"], "holds AdamW state, this run builds SGD"),
    "resume other optimizer, older format": (OLDER_FORMAT, ["optim.name=sgd"], "group 0 lacks dampening, momentum"),
    "resume other seed": (EXISTING, ["train.seed=5"], "'train.seed' = 5: the checkpoint"),
    "resume other global batch": (EXISTING, ["data.global_batch_size=48"], "'data.global_batch_size' = 48: the"),
    "resume below its step": (EXISTING, ["train.max_steps=4"], "already at step 12"),
    "resume other dataset": (EXISTING, ["task.args.n=240"], "its dataset's length"),
    "eval every negative": (FRESH, ["eval.every=-1"], "'eval.every' = -1: must be >= 0"),
    "eval mode": (FRESH, ["eval.mode=up"], "'eval.mode' = 'up': must be one of min, max"),
    "eval batch zero": (FRESH, ["eval.batch_size=0"], "'eval.batch_size' = 0"),
    "eval patience zero": (FRESH, ["eval.patience=0"], "'eval.patience' = 0"),
    "eval unknown key": (FRESH, ["eval.patiense=3"], "did you mean 'eval.patience'"),
    "eval needs: a known metric": (
        FRESH, ["task.args.per_sample_metrics=true", "eval.every=4", "eval.metric=acc"],
        "'eval.metric' = 'acc': the task's evaluate() does not produce it. HINT: it produces mae, mse",
    ),
    "eval needs: an eval set": (FRESH, ["task.args.eval_n=0", "eval.every=4"], "the task has no eval_dataset"),
    "no_decay word": (FRESH, ["optim.no_decay=sometimes"], "'optim.no_decay' = 'sometimes': must be one of auto, none"),
    "no_decay empty list": (FRESH, ["optim.no_decay=[]"], "'optim.no_decay' = []: must be auto, none or a list of"),
    "nonfinite mode": (FRESH, ["train.nonfinite=maybe"], "'train.nonfinite' = 'maybe': must be one of skip, halt, off"),
    "nonfinite true": (FRESH, ["train.nonfinite=true"], "'train.nonfinite' = True: must be one of skip, halt, off"),
    "max nonfinite zero": (FRESH, ["train.max_nonfinite=0"], "'train.max_nonfinite' = 0: must be in [1, 1000000]"),
    "optimizer needs: no_decay patterns that match": (
        FRESH, ['optim.no_decay=["nothing.*"]'], "'optim.no_decay' = ['nothing.*']: matches no parameter of the model",
    ),
    "optimizer needs: an optimizer": (
        FRESH, ["task.args.bad_optimizer=junk"], "optimizer(model) returned int, not a torch.optim.Optimizer",
    ),
    "optimizer needs: the model's own parameters": (
        FRESH, ["task.args.bad_optimizer=foreign"], "(group 0, #0, shape [32, 16]) that is not one of the model's",
    ),
    "parallel mode": (FRESH, ["train.parallel=fsdp2"], "'train.parallel' = 'fsdp2': must be one of ddp, fsdp"),
    "export_model mode": (FRESH, ["train.export_model=sometimes"], "'train.export_model' = 'sometimes': must be one"),
    "reshard_after_forward word": (FRESH, ["train.reshard_after_forward=maybe"], "'train.reshard_after_forward'"),
    "fsdp with fp16": (FRESH, ["train.parallel=fsdp", "train.precision=fp16"], "use train.precision=bf16"),
    "fsdp with sync_batchnorm": (
        FRESH, ["train.parallel=fsdp", "train.sync_batchnorm=true"], "is not supported with train.parallel=fsdp",
    ),
    "fsdp needs: shard units inside the model": (
        FRESH, ["train.parallel=fsdp", "task.args.bad_shard_units=true"], "each unit must be a submodule of the model",
    ),
    "sync_batchnorm needs: a GPU": (FRESH, ["train.sync_batchnorm=true"], "SyncBatchNorm runs on CUDA GPUs only"),
    "resume model gained a parameter": (EXISTING, ["task.args.extra_param=true"], "the model's 'extra' is missing"),
    "resume other groups": (
        EXISTING, ["optim.no_decay=none"], "'0.bias' is in group 1 in the checkpoint, group 0 now",
    ),
    "resume task optimizer": (
        EXISTING, ["task.args.own_optimizer=true"], "holds AdamW state, this run builds TaggedAdamW",
    ),
    "resume task scheduler": (
        EXISTING, ["task.args.own_scheduler=true"], "holds LambdaLR state, this run's schedule is StepLR",
    ),
}  # fmt: skip


@pytest.fixture(scope="module")
def materials(tmp_path_factory, refs) -> Path:
    """Files the cases point at: broken weights files, a junk folder, malformed YAML configs."""
    import torch

    from workers.tasks.quickstart import make_model

    m = tmp_path_factory.mktemp("materials")
    (m / "junk").mkdir()
    (m / "junk" / "readme").write_text("not a checkpoint\n")
    (m / "empty.pt").write_bytes(b"")
    model_pt = refs[2] / "checkpoints" / "step-00000012" / "model.pt"
    (m / "truncated.pt").write_bytes(model_pt.read_bytes()[:200])
    (m / "notes.txt").write_text("hello\n")
    torch.save(_Payload(m / "payload-ran"), m / "evil.pt")
    torch.save(make_model(16, 64, 4).state_dict(), m / "wide.pt")
    torch.save({"encoder.weight": torch.zeros(3, 3)}, m / "other.pt")
    (m / "twice.yaml").write_text("train:\n  max_steps: 3\ntrain:\n  seed: 2\n")
    (m / "broken.yaml").write_text("train:\n  max_steps: 3\n bad\n")
    (m / "typo.yaml").write_text("train:\n  max_stepz: 3\n")
    return m


class _Payload:
    """Pickles to a call of ``os.system``: loading it unsafely would create the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _drop_optimizer_name(folder: Path) -> None:
    """Make the checkpoint's train state look like one written before it recorded the optimizer's class."""
    state = json.loads((folder / "train_state.json").read_text())
    del state["optimizer"]
    data = json.dumps(state).encode()
    (folder / "train_state.json").write_bytes(data)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"]["train_state.json"] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (folder / "manifest.json").write_text(json.dumps(manifest))


def _state(run: Path) -> dict[str, bytes] | None:
    if not run.exists():
        return None
    return {str(p.relative_to(run)): (p.read_bytes() if p.is_file() else b"<dir>") for p in sorted(run.rglob("*"))}


# Found by the workers (or by checks that run while prestarted workers wait): only the real CLI in a subprocess.
# The others fail in the launcher's first checks, before any process starts: run in this process (same code path,
# same output) to keep the suite short.
NEEDS_WORKERS = {
    name
    for name in CASES
    if name.startswith(
        ("resume", "init_from", "factory", "task arg", "eval needs", "optimizer needs", "sync_batchnorm", "fsdp needs")
    )
} - {"init_from missing"}


def _launch(argv: list[str], capsys) -> tuple[int, str]:
    """``orchestrator launch ...``: a subprocess when workers are involved, else the CLI's main() right here."""
    from orchestrator.cli import main

    capsys.readouterr()
    code = main(argv)
    return code, capsys.readouterr().err


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_one_line_exit_2_never_retried_and_leaves_the_run_dir_as_it_was(
    case, materials, refs, tmp_path, capsys
):
    where, args, expected = CASES[case]
    run = tmp_path / "run"
    if where in (EXISTING, OLDER_FORMAT):
        shutil.copytree(refs[2], run)
    if where == OLDER_FORMAT:
        _drop_optimizer_name(run / "checkpoints" / "step-00000012")
    before = _state(run)
    config = "configs/quickstart.yaml"
    args = [a.replace("{m}", str(materials)) for a in args]
    if args and args[0].startswith("--config="):
        config = args.pop(0).partition("=")[2]
    run_dir = [] if any(a.startswith("run.dir=") for a in args) else [f"run.dir={run}"]
    nproc = ["--nproc", "1"] if case in NEEDS_WORKERS else []  # one worker is enough to find what workers find
    argv = ["launch", config, *nproc, *run_dir, *QUICK, "launch.max_restarts=2", *args]
    if case in NEEDS_WORKERS:
        proc = cli(*argv)
        code, err = proc.returncode, proc.stderr
    else:
        code, err = _launch(argv, capsys)
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("orchestrator: error:"), err
    assert expected in lines[0], lines[0]
    assert "Traceback" not in err and "HINT: HINT" not in err and "weights_only=False" not in lines[0]
    assert _state(run) == before, "the run dir changed"
    assert not (materials / "payload-ran").exists()


def test_the_yaml_notation_ml_users_type_works_in_files_and_overrides(tmp_path):
    from workers.config import load_config

    cfg = tmp_path / "c.yaml"
    cfg.write_text("optim:\n  lr: 3e-4\n  weight_decay: 1e-2\ntrain.max_steps: 1e3\n")
    loaded = load_config(cfg, ["optim.warmup_steps=1e2", "train.seed=1e15"])
    assert loaded.optim.lr == 3e-4 and loaded.optim.weight_decay == 0.01
    assert loaded.train.max_steps == 1000 and loaded.optim.warmup_steps == 100 and loaded.train.seed == 10**15
    assert load_config(cfg, ["optim.lr=1e6"]).optim.lr == 1e6


def test_ckpt_tools_refuse_bad_destinations_and_survive_a_closed_pipe(refs, tmp_path):
    dest = tmp_path / "a-folder"
    dest.mkdir()
    proc = cli("ckpt", "export", str(refs[2]), str(dest), "--force")
    assert proc.returncode == 2 and "is a folder" in proc.stderr and "Traceback" not in proc.stderr
    assert list(dest.iterdir()) == [] and not list(tmp_path.glob(".tmp-*"))
    # `orchestrator ckpt inspect --json | head`: the reader goes away before we write
    reader = subprocess.Popen(
        [sys.executable, "-m", "orchestrator", "ckpt", "inspect", str(refs[2]), "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env(), cwd=ROOT,
    )  # fmt: skip
    reader.stdout.close()
    err = reader.stderr.read().decode()
    assert reader.wait(timeout=60) == 0 and "Traceback" not in err and "BrokenPipe" not in err, err


def test_a_read_only_run_dir_is_refused_before_anything_starts(tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(ro)], capture_output=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount here (needs root): {mounted.stderr.decode().strip()}")
    try:
        code, err = _launch(["launch", "configs/quickstart.yaml", f"run.dir={ro / 'run'}", *QUICK], capsys)
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        assert "is not writable (permissions or a read-only file system)" in err
    finally:
        subprocess.run(["umount", "-l", str(ro)], check=False)
