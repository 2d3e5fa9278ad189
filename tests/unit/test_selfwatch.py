"""workers/selfwatch.py: a rank no launcher watches finds its own hang — its stacks (every thread, named, innermost
frame first) written to its own stacks file, then ``on_hang`` — and never fires while it makes progress, outside
the train/eval phases, in its first train step or in the step that follows a checkpoint. The watch's clock is a
fake one that moves only when the watch reads it, so no test depends on how fast this machine runs."""

from __future__ import annotations

import faulthandler
import os
import sys
import threading
import time
from types import SimpleNamespace

import pytest

from workers import selfwatch
from workers.config import config_from_dict
from workers.contract import HANG_WAITING, ErrorRecord, FailureKind, first_failure
from workers.entry import WorkerStart, hang_exit, should_watch_itself
from workers.rundir import RunDir
from workers.selfwatch import HangError, SelfWatch, own_stacks
from workers.stackdump import Frame, RankStacks, Thread


def _blocked_in_the_dataset(release: threading.Event) -> None:
    release.wait()  # a data loader that never returns


def test_own_stacks_name_every_thread_with_its_innermost_frames():
    release = threading.Event()
    helper = threading.Thread(target=_blocked_in_the_dataset, args=(release,), name="loader")
    helper.start()
    try:
        stacks = own_stacks(rank=3)
    finally:
        release.set()
        helper.join()
    threads = {t.name: t for t in stacks.threads}
    assert {"MainThread", "loader"} <= set(threads), threads.keys()
    assert any(
        f.function == "_blocked_in_the_dataset" and f.file.endswith("test_selfwatch.py")
        for f in threads["loader"].frames
    )
    assert threads["MainThread"].frames[0].function == "own_stacks"  # innermost first: the dump itself
    assert stacks.rank == 3 and stacks.summary().startswith("rank 3 (pid ")


class _Clock:
    """Seconds that pass only when the watch looks: each read moves the clock ``per_read`` on."""

    def __init__(self, per_read: float = 0.5) -> None:
        self.now, self.per_read, self.reads, self.skipped = 0.0, per_read, 0, 0.0
        self.lock = threading.Lock()  # the test's jump and the watch's read never lose one another

    def __call__(self) -> float:
        with self.lock:
            self.reads += 1
            self.now += self.per_read + self.skipped
            self.skipped = 0.0
            return self.now

    def jump(self, seconds: float) -> None:
        """The next read is ``seconds`` later than it would be (the process was stopped in between)."""
        with self.lock:
            self.skipped += seconds

    def let_pass(self, reads: int) -> None:
        """Until the watch has looked ``reads`` more times (``reads * per_read`` seconds of its time)."""
        assert _wait(lambda seen=self.reads: self.reads >= seen + reads), "the watch stopped looking"


def _wait(predicate, timeout: float = 60) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.002)
    return predicate()


class _FastWatch(SelfWatch):
    GRACE_S = 0.0


def _watch(tmp_path, hung: list[str], rank: int = 1, attempt: int = 2, logs: bool = True) -> tuple[SelfWatch, _Clock]:
    """A watch of 3 s (six looks of the fake clock), looking every 2 ms of real time; not started."""
    paths = RunDir(tmp_path / "run")
    if logs:
        paths.logs.mkdir(parents=True)
    clock = _Clock()
    return _FastWatch(paths, rank, attempt, timeout_s=3.0, on_hang=hung.append, clock=clock, interval_s=0.002), clock


def test_a_rank_without_progress_in_training_writes_its_stacks_then_ends(tmp_path):
    hung: list[str] = []
    watch, clock = _watch(tmp_path, hung)
    watch.start()
    try:
        watch.update(5, "checkpoint")  # a long save is not a hang
        clock.let_pass(20)
        assert hung == [] and not watch.paths.rank_stacks_file(2, 1).exists()
        for step in range(6, 30):  # progress: no hang however long it runs
            watch.update(step, "train")
            clock.let_pass(2)
        assert hung == []
        assert _wait(lambda: hung), "the watch did not fire"
    finally:
        watch.stop()
    assert hung[0].startswith("hung — no progress for") and "at step 29 (train)" in hung[0]
    assert HANG_WAITING not in hung[0]  # its main thread waits in the test, not in a collective
    text = watch.paths.rank_stacks_file(2, 1).read_text()
    assert text.startswith("# rank 1: no progress for") and 'Thread "MainThread"' in text
    assert 'Thread "orch-selfwatch"' in text and text.count("=== rank 1 ") == 1
    assert not watch.paths.stacks_file(2).exists()  # the launcher's file: each rank writes its own


def test_the_first_train_step_may_take_longer_than_the_timeout(tmp_path):
    """Compilation, warm-up, the first collective: the first step is exempt, as the heartbeat's first_step is."""
    hung: list[str] = []
    watch, clock = _watch(tmp_path, hung)
    watch.start()
    try:
        watch.update(0, "train")  # the first step: three times the timeout
        clock.let_pass(18)
        assert hung == [] and watch.first_step == 0
        watch.update(1, "train")  # the second step is watched
        assert _wait(lambda: hung), "the watch did not fire after the first step"
    finally:
        watch.stop()
    assert "at step 1 (train)" in hung[0]


def test_a_rank_in_the_step_after_a_checkpoint_is_not_hung_while_a_peer_saves(tmp_path):
    """Async checkpoints: rank 0 waits for its earlier save in phase checkpoint while this rank is already in the
    next step's all-reduce: that step has the checkpoint's allowance; the one after it is watched again."""
    hung: list[str] = []
    watch, clock = _watch(tmp_path, hung)
    watch.start()
    try:
        for step in (0, 1, 2):
            watch.update(step, "train")
            clock.let_pass(2)
        watch.update(2, "checkpoint")
        watch.update(2, "train")  # rank 0 still saves: this rank waits for it in the all-reduce
        clock.let_pass(18)
        assert hung == []
        watch.update(3, "train")
        assert _wait(lambda: hung), "the step after the one after the checkpoint is not watched"
    finally:
        watch.stop()
    assert "at step 3 (train)" in hung[0]


def test_a_process_stopped_and_continued_is_not_a_hang(tmp_path):
    """The whole process stopped (a suspended job, SIGSTOP ... SIGCONT): its watch wakes far too late, and that
    stillness is not the rank's — it starts counting again instead of reporting a hang."""
    hung: list[str] = []
    watch, clock = _watch(tmp_path, hung)
    watch.update(7, "train")
    watch.update(8, "train")
    watch.start()
    try:
        clock.let_pass(2)
        clock.jump(100.0)  # 100 s pass in one wake-up: the process was stopped
        clock.let_pass(3)  # 1.5 s since it woke: less than the timeout
        assert hung == []
    finally:
        watch.stop()


def _no_temporary_file(rank: int) -> RankStacks:
    raise OSError(28, "No space left on device")


def _no_dump(*args, **kwargs) -> None:
    raise RuntimeError("no dump today")


@pytest.mark.parametrize("trouble", ["no temporary file", "no dump either", "no logs folder"])
def test_a_hang_whose_stacks_cannot_be_written_still_ends_the_rank(tmp_path, monkeypatch, trouble):
    """A full /tmp (own_stacks raises OSError): faulthandler writes into the stacks file itself — or the file says
    why there are no stacks; no stacks file at all: ``on_hang`` all the same."""
    monkeypatch.setattr(selfwatch, "own_stacks", _no_temporary_file)
    if trouble == "no dump either":
        monkeypatch.setattr(faulthandler, "dump_traceback", _no_dump)
    hung: list[str] = []
    watch, _ = _watch(tmp_path, hung, logs=trouble != "no logs folder")
    watch.update(1, "train")
    watch.update(2, "train")
    watch.start()
    try:
        assert _wait(lambda: hung), "the watch ended without on_hang"
    finally:
        watch.stop()
    assert hung[0].startswith("hung — no progress for")
    path = watch.paths.rank_stacks_file(2, 1)
    if trouble == "no logs folder":
        assert not path.exists()
        return
    text = path.read_text()
    assert text.startswith("# rank 1: no progress for") and "its stacks could not be read" in text
    if trouble == "no temporary file":
        assert "test_selfwatch.py" in text  # faulthandler's dump of this process, the test's own frames included
    else:
        assert "stacks unavailable: no dump today" in text


def _waiting_in_an_all_reduce(rank: int) -> RankStacks:
    frames = (Frame("all_reduce", "/x/site-packages/torch/distributed/distributed_c10d.py", 2000),
              Frame("_train_step", "/src/workers/train/trainer.py", 247))  # fmt: skip
    return RankStacks(rank, os.getpid(), (Thread("MainThread", frames),), via="a test")


def test_a_rank_waiting_in_a_collective_is_recorded_as_waiting_for_a_peer(tmp_path, monkeypatch):
    """Its record says it waits for a peer, so the reports name the rank stuck on its own even when that one's
    record is written later; torchrun's stamp puts it a second later too."""
    monkeypatch.setattr(selfwatch, "own_stacks", _waiting_in_an_all_reduce)
    hung: list[str] = []
    watch, _ = _watch(tmp_path, hung, rank=0)
    watch.update(1, "train")
    watch.update(2, "train")
    watch.start()
    try:
        assert _wait(lambda: hung), "the watch did not fire"
    finally:
        watch.stop()
    assert HANG_WAITING in hung[0] and "inside all_reduce" in hung[0], hung[0]
    assert watch.peer_delay_s > watch.GRACE_S  # it leaves after a rank stuck on its own would have
    text = watch.paths.rank_stacks_file(2, 0).read_text()
    assert text.splitlines()[0].endswith(HANG_WAITING), text
    waiting = ErrorRecord.from_exception(0, HangError(hung[0]))
    stuck = ErrorRecord(1, FailureKind.EXCEPTION, "HangError: hung — no progress for 3 s", time=waiting.time + 5)
    assert waiting.waited_on_peer and waiting.secondary and not stuck.secondary
    for record in (waiting, stuck):
        record.write(watch.paths.error_file(record.rank))
    assert first_failure(watch.paths).rank == 1  # the rank not in a collective, though it wrote later
    assert first_failure(watch.paths, own=True).rank == 1


def _cfg(hang_timeout_s: float):
    return config_from_dict({"run": {"dir": "/nowhere"}, "launch": {"hang_timeout_s": hang_timeout_s}})


@pytest.mark.parametrize(
    ("source", "world_size", "timeout", "heartbeat", "expected"),
    [("torchrun", 2, 300, None, True), ("slurm", 4, 300, None, True), ("torchrun", 1, 300, None, False),
     ("slurm", 1, 300, None, False), ("single", 1, 300, None, False), ("torchrun", 2, 0, None, False),
     ("launcher", 2, 300, "hb.json", False)],
)  # fmt: skip
def test_a_rank_watches_itself_only_in_a_torchrun_or_slurm_group(source, world_size, timeout, heartbeat, expected):
    ctx = SimpleNamespace(source=source, world_size=world_size, rank=0)
    start = WorkerStart(heartbeat_file=heartbeat)
    assert should_watch_itself(_cfg(timeout), ctx, start) is expected


def test_a_rank_under_a_debugger_does_not_watch_itself():
    ctx, start = SimpleNamespace(source="torchrun", world_size=2, rank=0), WorkerStart()
    before = sys.gettrace()
    sys.settrace(lambda *args: None)  # what a debugger does
    try:
        traced = should_watch_itself(_cfg(300), ctx, start)
    finally:
        sys.settrace(before)
    assert traced is False
    assert should_watch_itself(_cfg(300), ctx, start) is (before is None)


def _hang_exit_with_logging_held(error_file: str, elastic_file: str) -> None:
    """In a child: another thread holds the logging module's and a handler's locks and stderr's buffer's (a thread
    hung inside a log call); the hang exit must still write both records and end the process."""
    import logging

    handler = logging.StreamHandler(sys.stderr)
    logging.getLogger().addHandler(handler)
    held = threading.Event()

    def hold() -> None:
        with handler.lock, logging._lock:  # type: ignore[attr-defined]
            held.set()
            threading.Event().wait()  # forever

    threading.Thread(target=hold, daemon=True).start()
    held.wait()
    from pathlib import Path

    start = WorkerStart(error_file=Path(error_file), torchelastic_error_file=Path(elastic_file))
    hang_exit(start, 1, "hung — no progress for 3 s at step 9 (train)")


def test_the_hang_exit_writes_its_records_and_ends_while_another_thread_holds_the_logging_locks(tmp_path):
    import multiprocessing

    error_file, elastic_file = tmp_path / "error-rank-1.json", tmp_path / "elastic.json"
    proc = multiprocessing.get_context("spawn").Process(
        target=_hang_exit_with_logging_held, args=(str(error_file), str(elastic_file))
    )
    proc.start()
    proc.join(timeout=60)
    alive = proc.is_alive()
    if alive:
        proc.kill()
    assert not alive and proc.exitcode == 1, "the hang exit blocked on a lock"
    record = ErrorRecord.read(error_file)
    assert record is not None and record.message.startswith("HangError: hung — no progress for 3 s")
    assert "HangError: hung" in elastic_file.read_text()


def test_the_recorded_stacks_merge_the_ranks_files_in_rank_order(tmp_path):
    """Each rank writes its own file (ranks on other nodes of an NFS run dir cannot share one): the reader merges
    them in rank order — rank 10 after rank 2 — and reads the launcher's single file as before."""
    from orchestrator.stacks import recorded_stacks

    paths = RunDir(tmp_path / "run")
    assert recorded_stacks(paths) is None
    paths.logs.mkdir(parents=True)
    paths.stacks_file(0).write_text("# attempt 0: the launcher's report\n")
    for rank in (10, 0, 2):
        paths.rank_stacks_file(1, rank).write_text(f"# rank {rank}: no progress\n")
    assert paths.stacks_attempts() == [0, 1]
    merged = recorded_stacks(paths)  # the newest attempt: 1
    assert merged is not None and "launcher" not in merged
    assert [line for line in merged.splitlines() if line.startswith("# rank")] == [
        "# rank 0: no progress", "# rank 2: no progress", "# rank 10: no progress",
    ]  # fmt: skip
    assert recorded_stacks(paths, attempt=0) == "# attempt 0: the launcher's report\n"
