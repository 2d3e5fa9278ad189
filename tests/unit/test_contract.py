"""The base layer: workers/contract.py (the train state and the error record round trips, the failure kinds),
workers/fsutil.py (atomic writes, the run dir lock, checksums on the way) and workers/rundir.py (the layout)."""

from __future__ import annotations

import errno
import io
import json
import os
import re
from pathlib import Path

import pytest
import xxhash

from workers.contract import ErrorRecord, FailureKind, TrainState, disk_trouble, first_failure
from workers.errors import (
    CheckpointError,
    ClusterRefusedError,
    ConfigError,
    IncompatibleCheckpointError,
    NonFiniteError,
    UnsafeCheckpointError,
)
from workers.fsutil import HashingWriter, RunDirLock, atomic_write, file_digest, write_durable
from workers.rundir import RunDir, step_dir_name, step_of

# ---------------------------------------------------------------- the train state


def test_the_train_state_round_trips_every_field_and_keeps_unknown_keys():
    state = TrainState(
        step=8,
        samples_seen=192,
        world_size=2,
        global_batch_size=24,
        seed=3,
        max_steps=12,
        task="m:f",
        tracking_run_id="ab12",
        dataset_len=200,
        task_args={"n": 200},
        torch="2.6",
        time=1.5,
        optimizer="AdamW",
        nonfinite_skipped=1,
        nonfinite_streak=0,
        parallel="ddp",
        extra={"future": [1, 2]},
    )
    text = state.to_json()
    assert json.loads(text)["future"] == [1, 2]  # written back unchanged
    assert TrainState.from_json(text) == state
    old = TrainState.from_json('{"step": 4, "samples_seen": 96, "world_size": 1, "global_batch_size": 24, "seed": 0}')
    assert old.optimizer is None and old.selection is None and old.extra == {}  # a first-format state reads


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{", "is not JSON"),
        ("[]", "is not a JSON object"),
        ('{"samples_seen": 0, "world_size": 1, "global_batch_size": 8, "seed": 0}', "lacks 'step'"),
        ('{"step": true, "samples_seen": 0, "world_size": 1, "global_batch_size": 8, "seed": 0}', "'step' = True"),
        ('{"step": 1.5, "samples_seen": 0, "world_size": 1, "global_batch_size": 8, "seed": 0}', "is not int"),
        ('{"step": 1, "samples_seen": -8, "world_size": 1, "global_batch_size": 8, "seed": 0}', "is negative"),
        ('{"step": 1, "samples_seen": 8, "world_size": 1, "global_batch_size": 8, "seed": 0, "task": 3}', "'task'"),
    ],
)
def test_a_malformed_train_state_is_a_checkpoint_error_naming_the_file(text, message):
    with pytest.raises(CheckpointError, match=re.escape("'ckpt/train_state.json'")) as info:
        TrainState.from_json(text, "ckpt/train_state.json")
    assert message in str(info.value)


def test_reading_a_train_state_that_is_not_there(tmp_path):
    with pytest.raises(CheckpointError, match="is unreadable"):
        TrainState.read(tmp_path / "train_state.json")


# ---------------------------------------------------------------- failures


@pytest.mark.parametrize(
    ("exc", "kind"),
    [
        (ConfigError("bad key"), FailureKind.CONFIG),
        (ClusterRefusedError("no"), FailureKind.CONFIG),
        (IncompatibleCheckpointError("other model"), FailureKind.CONFIG),
        (UnsafeCheckpointError("pickled code"), FailureKind.CONFIG),  # a usage error too: exit 2, never retried
        (NonFiniteError("nan"), FailureKind.NUMERICS),
        (CheckpointError("corrupt"), FailureKind.CHECKPOINT),
        (OSError(errno.ENOSPC, "No space left on device"), FailureKind.DISK),
        (RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 4096 vs 2048"), FailureKind.DISK),
        (RuntimeError("boom"), FailureKind.EXCEPTION),
    ],
)
def test_the_failure_kind_decides_whether_a_restart_can_help(exc, kind):
    assert FailureKind.of(exc) is kind
    assert kind.retryable == (kind is FailureKind.EXCEPTION) and kind.known == (kind is not FailureKind.EXCEPTION)


def test_disk_trouble_is_found_through_the_causes():
    try:
        try:
            raise OSError(errno.EROFS, "Read-only file system")
        except OSError as inner:
            raise CheckpointError("cannot write checkpoint") from inner
    except CheckpointError as outer:
        assert disk_trouble(outer) == "the file system is read-only"
        assert FailureKind.of(outer) is FailureKind.DISK
    assert disk_trouble(OSError(errno.EDQUOT, "quota")) == "the disk quota is used up"
    assert disk_trouble(OSError(errno.EACCES, "denied")) is None
    looped = RuntimeError("a")
    looped.__context__ = RuntimeError("b")
    looped.__context__.__context__ = looped  # a cycle of causes ends
    assert disk_trouble(looped) is None


def _raised(exc: BaseException) -> BaseException:
    try:
        raise exc
    except BaseException as caught:
        return caught


def test_an_error_record_round_trips_and_malformed_ones_read_as_none(run_dir: RunDir):
    record = ErrorRecord.from_exception(1, _raised(ConfigError("config key 'x' = 1: bad")), job_id="77")
    assert record.kind is FailureKind.CONFIG and record.message == "ConfigError: config key 'x' = 1: bad"
    assert record.detail == "config key 'x' = 1: bad" and record.traceback.startswith("Traceback")
    record.write(run_dir.error_file(1))
    assert ErrorRecord.read(run_dir.error_file(1)) == record
    assert json.loads(run_dir.error_file(1).read_text())["kind"] == "config"
    for junk in (
        "",
        "[]",
        '{"rank": 0}',
        '{"rank": "0", "kind": "config", "message": "m"}',
        '{"rank": true, "kind": "config", "message": "m"}',
        '{"rank": 0, "kind": "nope", "message": "m"}',
    ):
        assert ErrorRecord.from_json(junk) is None
    assert ErrorRecord.read(run_dir.error_file(5)) is None


def test_the_first_failure_is_the_earliest_of_the_job(run_dir: RunDir):
    for rank, when, job in ((0, 30.0, "2"), (1, 20.0, "2"), (2, 10.0, "1")):
        ErrorRecord(rank, FailureKind.EXCEPTION, f"RuntimeError: {rank}", time=when, job_id=job).write(
            run_dir.error_file(rank)
        )
    assert first_failure(run_dir).rank == 2
    assert first_failure(run_dir, job_id="2").rank == 1
    assert first_failure(run_dir, job_id="3") is None
    assert first_failure(RunDir(run_dir.root / "none")) is None


def test_a_rank_that_only_lost_its_peer_is_stamped_a_second_later_for_torchrun(tmp_path):
    cause = ErrorRecord(0, FailureKind.EXCEPTION, "RuntimeError: boom", "tb", time=100.7)
    lost = ErrorRecord(1, FailureKind.EXCEPTION, "DistBackendError: Connection closed by peer", "tb", time=100.2)
    assert lost.lost_peer and not cause.lost_peer
    for record, name in ((cause, "a.json"), (lost, "b.json")):
        record.write_torchelastic(tmp_path / name)
    stamp = [json.loads((tmp_path / n).read_text())["message"]["extraInfo"]["timestamp"] for n in ("a.json", "b.json")]
    assert stamp == ["100", "101"]  # torchrun takes the smallest: the rank that failed first


# ---------------------------------------------------------------- file-system helpers


def test_atomic_write_replaces_the_whole_file_and_leaves_nothing_when_it_fails(tmp_path):
    path = tmp_path / "f.json"
    atomic_write(path, "old")
    atomic_write(path, b"new")
    assert path.read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["f.json"]
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "inside").write_text("x")
    with pytest.raises(OSError):
        atomic_write(tmp_path / "dir", "replacing a folder fails")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir", "f.json"]  # no .tmp- sibling left
    entry = write_durable(tmp_path / "d.bin", b"abc")
    assert entry == {"size": 3, "xxh3_128": xxhash.xxh3_128(b"abc").hexdigest()}
    assert file_digest(tmp_path / "d.bin") == entry["xxh3_128"]
    assert file_digest(tmp_path / "d.bin", "sha256").startswith("ba7816bf")


def test_the_hashing_writer_hashes_what_passes_through_it_big_chunks_too():
    sink = io.BytesIO()
    writer = HashingWriter(sink)
    chunks = [b"small", os.urandom(3 << 20), b"tail"]  # a 3 MiB chunk is hashed on another thread
    for chunk in chunks:
        writer.write(chunk)
    writer.flush()
    data = b"".join(chunks)
    assert sink.getvalue() == data and writer.entry() == {
        "size": len(data),
        "xxh3_128": xxhash.xxh3_128(data).hexdigest(),
    }


def test_the_run_dir_lock_is_exclusive_and_knows_when_it_is_lost(run_dir: RunDir):
    lock = RunDirLock(run_dir.lock).acquire()
    assert run_dir.lock.read_text() == f"{os.getpid()}\n" and lock.fd is not None
    assert RunDirLock.is_held(run_dir.lock) and lock.lost() is None
    with pytest.raises(BlockingIOError, match=rf"is in use by another launch \(pid {os.getpid()}\)"):
        RunDirLock(run_dir.lock).acquire()  # the holder is alive: no wait
    run_dir.lock.unlink()
    assert lock.lost() == "deleted"
    run_dir.lock.write_text("other\n")
    assert lock.lost() == "replaced"
    lock.release()
    assert lock.fd is None and lock.lost() is None and not RunDirLock.is_held(run_dir.lock)
    assert not RunDirLock.is_held(run_dir.root / "no-such-lock")


# ---------------------------------------------------------------- the run dir layout


def test_step_folder_names():
    assert step_dir_name(40) == "step-00000040" and step_of("step-00000040") == 40
    for name in ("step-40", "step-000000040", "step-00000040.invalid-20260101-000000-1", ".tmp-step-00000040-x"):
        assert step_of(name) is None


def test_the_scans_of_a_run_dir(run_dir: RunDir):
    assert not run_dir.holds_a_run() and run_dir.step_folders() == [] and run_dir.latest_name() is None
    for step in (4, 12, 8):
        run_dir.step_dir(step).mkdir(parents=True)
    (run_dir.step_dir(8) / "manifest.json").write_text("{}")
    (run_dir.checkpoints / "step-00000016").write_text("a file, not a folder")
    later = RunDir.set_aside_name(run_dir.step_dir(20), "20260102-000000", 7)
    earlier = RunDir.set_aside_name(run_dir.step_dir(24), "20260101-000000", 7)
    later.mkdir()
    earlier.mkdir()
    assert run_dir.holds_a_run()
    assert [s for s, _ in run_dir.step_folders()] == [12, 8, 4]
    assert run_dir.committed_folders() == [(8, run_dir.step_dir(8))]
    assert run_dir.set_aside_folders() == [earlier, later]  # oldest first, by their stamp
    for text, name in (("step-00000008\n", "step-00000008"), ("../../etc\n", None), ("", None)):
        run_dir.latest.write_text(text)
        assert run_dir.latest_name() == name
    run_dir.best.write_bytes(b"\xff\xfe")
    assert run_dir.best_name() is None


def test_the_per_rank_files(run_dir: RunDir):
    assert run_dir.error_files() == [] and run_dir.heartbeat_files() == []
    run_dir.logs.mkdir()
    for rank in (1, 0):
        run_dir.error_file(rank).write_text("{}")
        run_dir.heartbeat_file(rank).write_text("{}")
    assert [p.name for p in run_dir.error_files()] == ["error-rank-0.json", "error-rank-1.json"]
    assert [p.name for p in run_dir.heartbeat_files()] == ["heartbeat-rank-0.json", "heartbeat-rank-1.json"]
    assert run_dir.samples_file(3) == run_dir.root / "samples" / "rank-3.jsonl"
    assert run_dir.submitit_job("42") == run_dir.root / "slurm" / "submitit" / "42"
    assert RunDir(str(run_dir.root)).root == Path(run_dir.root)  # a str is accepted too


def test_slurm_exit_without_its_arguments_says_its_usage_and_exits_2(capsys):
    from workers.slurm_exit import main

    for argv in ([], ["/nonexistent-run"], ["a", "b", "c"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err == "usage: python -m workers.slurm_exit RUN_DIR STATUS\n", err
    assert main(["/nonexistent-run", "notanumber"]) == 2
    assert "workers.slurm_exit:" in capsys.readouterr().err


def test_a_job_slurm_requeued_itself_is_told_from_one_still_running():
    from workers.slurm_job import requeued_by_slurm

    # (fields as the dev cluster's scontrol show job -o printed them before and after a node was set DOWN)
    running = "JobId=7 JobName=wrap JobState=RUNNING Reason=None Dependency=(null) Requeue=1 Restarts=0 BatchFlag=1"
    after = "JobId=7 JobName=wrap JobState=PENDING Reason=BeginTime Dependency=(null) Requeue=1 Restarts=1 BatchFlag=1"
    assert not requeued_by_slurm(running, 0)
    assert requeued_by_slurm(after, 0)
    assert requeued_by_slurm(running.replace("Restarts=0", "Restarts=2"), 1)
    assert not requeued_by_slurm(running.replace("Restarts=0", "Restarts=1"), 1)
    assert not requeued_by_slurm("", 0)  # scontrol could not be asked: nothing known


def test_scontrol_is_told_the_array_task_not_the_bare_array_id_that_means_every_task():
    from workers.slurm_job import slurm_target

    # (SLURM gives one task of an array the array's own id: that bare id would requeue every trial)
    task = {"SLURM_JOB_ID": "40", "SLURM_ARRAY_JOB_ID": "40", "SLURM_ARRAY_TASK_ID": "3"}
    assert slurm_target(task) == "40_3"
    assert slurm_target({"SLURM_JOB_ID": "41"}) == "41"


def test_a_node_is_excluded_only_while_the_partition_keeps_min_nodes_for_the_job():
    from workers.slurm_job import excludable, excluded_of

    show = "JobId=7 JobState=RUNNING ExcNodeList=n3 Restarts=1"
    assert excluded_of(show) == ["n3"] and excluded_of("JobId=7 ExcNodeList=(null)") == []
    nodes = ["n1", "n2", "n3", "n4"]
    assert excludable(["n2"], show, nodes, 2) == ["n2"]  # n1 and n4 are left
    assert excludable(["n2"], show, nodes, 3) == []  # only 2 left: the job could never start again
    assert excludable(["n3"], show, nodes, 1) == []  # already excluded
    assert excludable(["n2"], show, None, 1) == []  # the partition's nodes unknown: nothing excluded
