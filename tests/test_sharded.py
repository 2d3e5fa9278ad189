"""Sharded training (``train.parallel=fsdp``, FSDP2 + torch.distributed.checkpoint) end to end, with real gloo
process groups, real subprocesses and real SIGKILLs:

- fsdp on 2 ranks, ddp on 2 ranks and one process reach the same weights, with SGD (the parity that shows a
  sum-vs-average reduction bug) and AdamW, with gradient accumulation; the shards are real (each rank's file holds
  its own slice of every parameter);
- a SIGKILLed fsdp run relaunched on the same world size equals the uninterrupted one bit for bit (model and
  optimizer state), also when rank 1 is killed in the middle of writing its shard;
- a sharded checkpoint resumes onto 1, 2 and 3 ranks and into ddp, a ddp checkpoint into fsdp;
- the final ``model.pt`` loads with the README's one line, ``ckpt export`` gathers an intermediate sharded
  checkpoint without a process group, ``ckpt inspect`` shows the layout, ``train.init_from`` takes a sharded folder;
- a pickle payload planted in DCP's ``.metadata`` (manifest rewritten to match) is refused everywhere, never run.
"""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import (
    EVERY,
    MAX_STEPS,
    QUICK,
    ROOT,
    cli,
    consumed_sequence,
    copy_run,
    env,
    final_dir,
    fingerprint,
    latest_name,
    launch,
    launch_and_kill,
    load,
    rel_diff,
    shared_runs,
    tensors_equal,
)
from test_exactness import expected_sequence

from workers.checkpoint import dcp_io
from workers.fsutil import NEW_DIGEST, file_digest
from workers.tasks.quickstart import make_model

FSDP = "train.parallel=fsdp"
SGD = ["optim.name=sgd", "optim.lr=0.05", "optim.momentum=0.9"]


def optim_tensors(run, step: int = MAX_STEPS) -> dict[str, torch.Tensor]:
    """The optimizer's tensors of a sharded checkpoint, gathered (name/state key -> full tensor)."""
    return dcp_io.read_full(final_dir(run, step) / "dcp", dcp_io.OPTIM_PREFIX)


@pytest.fixture(scope="module")
def fsdp_refs(tmp_path_factory, refs) -> dict[str, object]:
    """Uninterrupted fsdp ws=2 run of the common setup (AdamW), and a copy SIGKILLed after its step-4 checkpoint."""

    def build(base) -> None:
        launch(base / "ws2", 2, FSDP)
        launch_and_kill(base / "killed-ws2", 2, FSDP, "task.args.step_sleep_s=0.1", kill_after=f"step-{EVERY:08d}")

    base = shared_runs(tmp_path_factory, "fsdp", build)
    return {"full": base / "ws2", "killed": base / "killed-ws2"}


def test_fsdp_matches_ddp_and_one_process_with_sgd_and_adamw(refs, fsdp_refs, tmp_path):
    run = fsdp_refs["full"]
    # AdamW (the common setup): fsdp 2 vs ddp 2 vs 1 process
    assert rel_diff(load(run), load(refs[2])) <= 1e-5
    assert rel_diff(load(run), load(refs[1])) <= 1e-5
    assert consumed_sequence(run) == expected_sequence()
    # SGD with momentum: a reduction that summed instead of averaging would be off by the world size here
    sgd = {name: tmp_path / name for name in ("one", "ddp2", "fsdp2")}
    launch(sgd["one"], 1, *SGD)
    launch(sgd["ddp2"], 2, *SGD)
    launch(sgd["fsdp2"], 2, *SGD, FSDP)
    one = load(sgd["one"])
    assert rel_diff(load(sgd["fsdp2"]), one) <= 1e-5
    assert rel_diff(load(sgd["ddp2"]), one) <= 1e-5
    assert rel_diff(one, load(sgd["one"], step=MAX_STEPS - EVERY)) > 1e-3  # training moved the weights

    # the shards are real: every parameter with rows to split has a chunk in each rank's file
    folder = final_dir(run)
    metadata = dcp_io.read_metadata(folder / "dcp")
    files_of: dict[str, set[str]] = {}
    for index, info in metadata.storage_data.items():
        files_of.setdefault(index.fqn, set()).add(info.relative_path)
    assert files_of["model/0.weight"] == {"__0_0.distcp", "__1_0.distcp"}
    assert files_of["optim/0.weight/exp_avg"] == {"__0_0.distcp", "__1_0.distcp"}
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["parallel"] == "fsdp" and manifest["world_size"] == 2
    assert {"dcp/.metadata", "dcp/__0_0.distcp", "dcp/__1_0.distcp"} <= manifest["files"].keys()
    assert json.loads((folder / "train_state.json").read_text())["parallel"] == "fsdp"
    # train.export_model=final: the full model only in the last checkpoint
    assert (folder / "model.pt").is_file()
    assert not (final_dir(run, MAX_STEPS - EVERY) / "model.pt").exists()


def test_the_final_model_loads_with_one_line_and_export_gathers_an_intermediate_checkpoint(refs, fsdp_refs, tmp_path):
    run = fsdp_refs["full"]
    model = make_model(hidden=32)
    model.load_state_dict(  # the README's one line
        torch.load(final_dir(run) / "model.pt", map_location="cpu", weights_only=True)
    )
    assert tensors_equal(model.state_dict(), load(run))

    step = MAX_STEPS - EVERY
    out = cli("ckpt", "export", str(final_dir(run, step)), str(tmp_path / "m8.pt"), check=True)
    assert "6 tensors" in out.stdout and not out.stderr.strip(), out.stderr
    exported = torch.load(tmp_path / "m8.pt", weights_only=True)
    assert rel_diff(exported, load(refs[2], step=step)) <= 1e-5
    assert tensors_equal(exported, dcp_io.read_full(final_dir(run, step) / "dcp", dcp_io.MODEL_PREFIX))

    text = cli("ckpt", "inspect", str(run), check=True).stdout
    assert "parallel: fsdp (sharded)" in text
    assert "shards: 2 files" in text and "dcp/__0_0.distcp, dcp/__1_0.distcp" in text
    assert "model.pt: no (ckpt export gathers the shards into one file)" in text  # step 8
    info = json.loads(cli("ckpt", "inspect", str(final_dir(run, step)), "--json", check=True).stdout)
    on_disk = sum((final_dir(run, step) / f).stat().st_size for f in info["shard_files"])
    assert info["shard_bytes"] == on_disk and info["parameters"] == sum(t.numel() for t in exported.values())

    # orchestrator eval takes the sharded folder too, and scores it as the ddp run's model of that step
    evals = [json.loads(cli("eval", str(final_dir(r, step)), "--json", check=True).stdout) for r in (run, refs[2])]
    assert evals[0]["metrics"] and evals[0]["metrics"] == pytest.approx(evals[1]["metrics"], rel=1e-4)

    # train.init_from takes a sharded folder (its shards gathered): the first loss is that of the step-8 weights
    init = tmp_path / "init"
    proc = launch(init, 1, f"train.init_from={final_dir(run, step)}", "train.max_steps=1", "train.checkpoint_every=1")
    assert f"initialised weights from {final_dir(run, step)}" in proc.stderr, proc.stderr


def test_fsdp_killed_and_relaunched_is_bitwise_equal(fsdp_refs, tmp_path):
    run = copy_run(fsdp_refs["killed"], tmp_path / "run")
    proc = launch(run, 2, FSDP)
    assert f"resumed from {run / 'checkpoints' / f'step-{EVERY:08d}'}" in proc.stderr
    full = fsdp_refs["full"]
    assert tensors_equal(load(run), load(full))
    assert tensors_equal(optim_tensors(run), optim_tensors(full))
    assert tensors_equal(load(run, "optim.pt"), load(full, "optim.pt"))  # the non-tensor rest: steps, groups
    assert consumed_sequence(run) == expected_sequence()


def test_a_kill_of_rank_1_while_it_writes_its_shard_never_commits_and_the_run_ends_bitwise_equal(fsdp_refs, tmp_path):
    run, marker = tmp_path / "run", tmp_path / "died"
    step = 2 * EVERY
    proc = launch(
        run, 2, FSDP, "launch.max_restarts=1", f"task.args.die_in_save={marker}",
        f"task.args.die_in_save_step={step}", "task.args.die_in_save_rank=1",
    )  # fmt: skip
    assert marker.exists(), "rank 1 was never killed mid-shard: the test did not test anything"
    full_size = (final_dir(run, step) / "dcp" / "__1_0.distcp").stat().st_size
    assert int(marker.read_text()) < full_size, "the kill came after the whole shard was written"
    assert "rank 1: killed by SIGKILL" in proc.stderr
    assert f"resumed from {run / 'checkpoints' / f'step-{EVERY:08d}'}" in proc.stderr  # not from the torn one
    assert not list((run / "checkpoints").glob(".tmp-*"))
    assert tensors_equal(load(run), load(fsdp_refs["full"]))
    assert tensors_equal(optim_tensors(run), optim_tensors(fsdp_refs["full"]))


def test_sharded_checkpoints_resume_onto_any_world_size_and_either_mode(refs, killed2, fsdp_refs, tmp_path):
    cases = [  # (killed run, world size now, mode now)
        (fsdp_refs["killed"], 1, FSDP),
        (fsdp_refs["killed"], 3, FSDP),
        (fsdp_refs["killed"], 2, "train.parallel=ddp"),  # fsdp -> ddp
        (killed2, 3, FSDP),  # ddp -> fsdp
    ]
    for i, (src, ws, mode) in enumerate(cases):
        run = copy_run(src, tmp_path / f"case-{i}")
        proc = launch(run, ws, mode)
        assert f"resumed from {run / 'checkpoints' / f'step-{EVERY:08d}'}" in proc.stderr
        if ws != 2:
            assert f"saved at world size 2, now {ws}" in proc.stderr
        assert rel_diff(load(run), load(refs[2])) <= 1e-5, f"case {i}: ws={ws} {mode}"
        assert consumed_sequence(run) == expected_sequence()
    # 3 -> 2
    run = tmp_path / "ws3-to-ws2"
    launch_and_kill(run, 3, FSDP, "task.args.step_sleep_s=0.1", kill_after=f"step-{EVERY:08d}")
    proc = launch(run, 2, FSDP)
    assert "saved at world size 3, now 2" in proc.stderr
    assert rel_diff(load(run), load(refs[2])) <= 1e-5
    assert consumed_sequence(run) == expected_sequence()


def _plant_payload(folder, marker) -> None:
    """Replace DCP's ``.metadata`` with a pickle that would run a command, and fix the manifest as a forger would."""

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = folder / "dcp" / ".metadata"
    path.write_bytes(pickle.dumps(Payload()))
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"]["dcp/.metadata"] = {"size": path.stat().st_size, NEW_DIGEST: file_digest(path)}
    (folder / "manifest.json").write_text(json.dumps(manifest))


def test_a_pickle_payload_in_dcp_metadata_is_refused_everywhere_and_never_runs(fsdp_refs, tmp_path):
    run, marker = copy_run(fsdp_refs["full"], tmp_path / "run"), tmp_path / "pwned"
    for step in (MAX_STEPS - EVERY, MAX_STEPS):
        _plant_payload(final_dir(run, step), marker)
    folder = final_dir(run, MAX_STEPS - EVERY)

    before = fingerprint(run, mtimes=False)
    proc = launch(run, 2, FSDP, "train.max_steps=16", "launch.max_restarts=2", check=False)  # resume
    assert proc.returncode == 2, proc.stderr  # a usage error: one line, the run dir as it was
    assert [ln for ln in proc.stderr.splitlines() if ".metadata' is refused" in ln] == [
        next(ln for ln in proc.stderr.splitlines() if ln.startswith("orchestrator: error:"))
    ], proc.stderr
    assert "restarting" not in proc.stderr and "skipping checkpoint" not in proc.stderr  # not retried, not hidden
    assert fingerprint(run, mtimes=False) == before
    out = cli("ckpt", "inspect", str(folder))
    assert out.returncode == 0 and "UNSAFE" in out.stdout and ".metadata" in out.stdout
    exported = cli("ckpt", "export", str(folder), str(tmp_path / "out.pt"))
    assert exported.returncode == 2 and ".metadata' is refused" in exported.stderr
    assert not (tmp_path / "out.pt").exists()
    init = launch(tmp_path / "init", 1, f"train.init_from={folder}", check=False)
    assert init.returncode == 2 and ".metadata' is refused" in init.stderr, init.stderr
    assert not marker.exists(), "the payload ran"


def test_graceful_stop_of_an_fsdp_run_saves_and_resumes_bitwise(fsdp_refs, tmp_path):
    """SIGTERM (a user's stop, SLURM's preemption signal) of a sharded run: every rank writes its shards of the
    stop checkpoint, exit 0, and the relaunched run ends bitwise equal to the uninterrupted one."""
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "orchestrator", "launch", "configs/quickstart.yaml", "--nproc", "2",
           f"run.dir={run}", *QUICK, FSDP, "task.args.step_sleep_s=0.1"]  # fmt: skip
    proc = subprocess.Popen(cmd, env=env(), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        while latest_name(run) != f"step-{EVERY:08d}":
            assert proc.poll() is None, proc.stderr.read()
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    stopped = int(latest_name(run).split("-")[1])
    assert EVERY < stopped < MAX_STEPS, "the stop did not save at the next step boundary"
    assert f"all ranks saved step {stopped} and are leaving" in err
    assert (final_dir(run, stopped) / "dcp" / "__1_0.distcp").is_file()
    launch(run, 2, FSDP)
    assert tensors_equal(load(run), load(fsdp_refs["full"]))
    assert tensors_equal(optim_tensors(run), optim_tensors(fsdp_refs["full"]))


@pytest.mark.parametrize(
    "forged",
    [
        b"ctorch\nSize\n}(X\x04\x00\x00\x00evilK\x01ub.",  # BUILD on an admitted class: would rewrite torch.Size
        b"cpathlib\nPosixPath\n.",  # a class our metadata never needs
        b"cposix\nsystem\n(X\x04\x00\x00\x00trueltR.",  # the classic: call os.system
        b"ctorch.distributed.checkpoint.metadata\nMetadata\n)\x81.",  # admitted, but without its fields: malformed
    ],
)
def test_the_metadata_unpickler_refuses_what_dcp_never_writes(forged, tmp_path):
    (tmp_path / ".metadata").write_bytes(forged)
    with pytest.raises(dcp_io.CheckpointError) as exc:
        dcp_io.read_metadata(tmp_path)
    assert str(tmp_path / ".metadata") in str(exc.value)
    assert not hasattr(torch.Size, "evil")
