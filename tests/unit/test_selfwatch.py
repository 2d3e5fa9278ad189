"""workers/selfwatch.py: a rank no launcher watches finds its own hang — its stacks (every thread, named, innermost
frame first) appended to the attempt's stacks file, then ``on_hang`` — and never fires while it makes progress or
outside the train/eval phases."""

from __future__ import annotations

import threading
import time

from workers.rundir import RunDir
from workers.selfwatch import SelfWatch, own_stacks


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


class _FastWatch(SelfWatch):
    GRACE_S = 0.0


def _wait(predicate, timeout: float = 60) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.01)
    return predicate()


def test_a_rank_without_progress_in_training_writes_its_stacks_then_ends(tmp_path):
    paths = RunDir(tmp_path / "run")
    paths.logs.mkdir(parents=True)
    hung: list[str] = []
    watch = _FastWatch(paths, rank=1, attempt=2, timeout_s=0.2, on_hang=hung.append).start()
    try:
        watch.update(5, "checkpoint")  # a long save is not a hang
        time.sleep(0.6)
        assert hung == [] and not paths.stacks_file(2).exists()
        for step in range(6, 30):  # progress: no hang however long it runs
            watch.update(step, "train")
            time.sleep(0.02)
        assert hung == []
        assert _wait(lambda: hung), "the watch did not fire"
    finally:
        watch.stop()
    assert hung[0].startswith("hung — no progress for") and "at step 29 (train)" in hung[0]
    text = paths.stacks_file(2).read_text()
    assert text.startswith("# rank 1: no progress for") and 'Thread "MainThread"' in text
    assert 'Thread "orch-selfwatch"' in text and text.count("=== rank 1 ") == 1


def test_a_process_stopped_and_continued_is_not_a_hang(tmp_path):
    """The whole process stopped (a suspended job, SIGSTOP ... SIGCONT): its watch wakes far too late, and that
    stillness is not the rank's — it starts counting again instead of reporting a hang."""
    paths = RunDir(tmp_path / "run")
    paths.logs.mkdir(parents=True)
    hung: list[str] = []
    watch = _FastWatch(paths, rank=0, attempt=0, timeout_s=40.0, on_hang=hung.append)  # checks every 1 s
    skipped, reads = [0.0], []
    watch.clock = lambda: reads.append(1) or time.monotonic() + skipped[0]
    watch.update(7, "train")
    watch.start()
    try:
        assert _wait(lambda: len(reads) >= 2)  # watching
        skipped[0] = 100.0  # 100 s pass in one wake-up: the process was stopped
        seen = len(reads)
        assert _wait(lambda: len(reads) >= seen + 2)  # two more checks since
        assert hung == []
    finally:
        watch.stop()
