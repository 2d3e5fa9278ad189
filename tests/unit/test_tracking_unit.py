"""workers/tracking/: the metrics file (rows, a torn line, a dead attempt's rows set aside), the tracking id, the
tracker with tracking disabled, the step sync (world size 1, and the stop agreement and log table of 2 ranks), and
the reporter's memory reader."""

from __future__ import annotations

import json
import logging
import os
import threading
import time

import pytest

from workers.config import config_from_dict
from workers.rundir import RunDir
from workers.stop import NONE, STOP, StopFlag
from workers.tracking import Tracker, read_metrics, read_run_id, run_id
from workers.tracking.batching import RowBatches
from workers.tracking.metrics_file import JsonlSink, set_aside_dead_rows
from workers.tracking.stepsync import StepSync

from .helpers import run_on_ranks


def _rows(*steps: int) -> str:
    return "".join(json.dumps({"step": s, "loss": s / 10}) + "\n" for s in steps)


def test_the_sink_appends_one_row_per_step_and_reads_back(run_dir: RunDir):
    sink = JsonlSink(run_dir, start_step=0)
    assert not run_dir.metrics.exists()  # opened at the first row
    sink.log(1, {"loss": 0.5, "lr": 1e-3})
    sink.log(2, {"loss": 0.25})
    sink.finish()
    assert run_dir.metrics.read_text().splitlines()[0] == '{"step": 1, "loss": 0.5, "lr": 0.001}'
    assert read_metrics(run_dir) == [{"step": 1, "loss": 0.5, "lr": 0.001}, {"step": 2, "loss": 0.25}]
    assert read_metrics(RunDir(run_dir.root / "none")) == []


def test_reading_skips_a_torn_line_and_warns_only_for_damage_inside(run_dir: RunDir, caplog):
    run_dir.metrics.write_text(_rows(1, 2) + '{"step": 3, "lo')
    with caplog.at_level(logging.WARNING, logger="workers.tracking"):
        assert [r["step"] for r in read_metrics(run_dir)] == [1, 2]
    assert not caplog.records  # a torn last line is a kill's normal trace
    run_dir.metrics.write_text(_rows(1) + "garbage\n" + '{"step": true}\n' + '{"step": "4"}\n' + _rows(5))
    with caplog.at_level(logging.WARNING, logger="workers.tracking"):
        assert [r["step"] for r in read_metrics(run_dir)] == [1, 5]
    assert "skipped 3 malformed row(s)" in caplog.text


def test_a_restart_sets_aside_the_rows_of_the_attempt_that_died(run_dir: RunDir):
    run_dir.metrics.write_text(_rows(2, 4, 6, 8) + '{"step": 10, "lo')  # killed mid-append after step 8
    sink = JsonlSink(run_dir, start_step=4)  # resumed from the checkpoint of step 4
    assert [r["step"] for r in read_metrics(run_dir)] == [2, 4]
    assert run_dir.metrics_attempt(1).read_text() == _rows(6, 8)  # the torn line was cut first
    sink.log(6, {"loss": 0.0})
    sink.finish()
    assert [r["step"] for r in read_metrics(run_dir)] == [2, 4, 6]
    set_aside_dead_rows(run_dir, 5)  # a second dead attempt gets the next number
    assert run_dir.metrics_attempt(2).read_text() == '{"step": 6, "loss": 0.0}\n'
    assert run_dir.metrics_attempts() == [run_dir.metrics_attempt(1), run_dir.metrics_attempt(2)]
    set_aside_dead_rows(run_dir, 5)  # nothing later: nothing moves
    assert len(run_dir.metrics_attempts()) == 2


def test_malformed_rows_stay_where_they_are_when_rows_are_set_aside(run_dir: RunDir, caplog):
    run_dir.metrics.write_text(_rows(1) + "not json\n" + _rows(3))
    with caplog.at_level(logging.WARNING, logger="workers.tracking"):
        set_aside_dead_rows(run_dir, 1)
    assert run_dir.metrics.read_text() == _rows(1) + "not json\n"  # damage is reported, never "repaired" away
    assert run_dir.metrics_attempt(1).read_text() == _rows(3) and "skipped 1 malformed" in caplog.text


def test_the_tracking_id_is_made_once_and_kept(run_dir: RunDir, caplog):
    assert read_run_id(run_dir) is None
    rid = run_id(run_dir)
    assert len(rid) == 8 and run_id(run_dir) == rid == read_run_id(run_dir)
    assert json.loads(run_dir.tracking.read_text()) == {"wandb_run_id": rid}
    for bad in ('{"wandb_run_id": "a/b"}', '{"wandb_run_id": 7}', "[]", "{"):
        run_dir.tracking.write_text(bad)
        assert read_run_id(run_dir) is None
    with caplog.at_level(logging.WARNING, logger="workers.tracking"):
        fresh = run_id(run_dir)
    assert fresh != rid and read_run_id(run_dir) == fresh and "is malformed" in caplog.text


def _tracker(run_dir: RunDir, is_main: bool = True, start_step: int = 0) -> Tracker:
    cfg = config_from_dict({}, [f"run.dir={run_dir.root}", "tracking.mode=disabled"])
    return Tracker(cfg, run_dir, is_main, start_step)


def test_a_disabled_tracker_writes_the_metrics_file_only(run_dir: RunDir):
    tracker = _tracker(run_dir)
    assert tracker.run_id is None and len(tracker.sinks) == 1
    tracker.hold_for_eval(2)  # only wandb waits for an eval: the metrics file gets rows at once
    tracker.log(1, {"loss": 1.0})
    tracker.log(2, {"loss": 0.5})
    tracker.log(2, {"eval/loss": 0.7}, is_eval=True)
    tracker.release_held()
    tracker.finish()
    assert read_metrics(run_dir) == [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.5}, {"step": 2, "eval/loss": 0.7}]
    assert sorted(p.name for p in run_dir.root.iterdir()) == ["metrics.jsonl"]  # no wandb/, no tracking.json


def test_a_resumed_tracker_logs_no_step_twice_but_the_eval_of_its_start_step(run_dir: RunDir):
    run_dir.metrics.write_text(_rows(1, 2))
    tracker = _tracker(run_dir, start_step=2)
    tracker.log(2, {"loss": 9.9})  # already in the file (logged before the stop): not again
    tracker.log(2, {"eval/loss": 0.7}, is_eval=True)  # the eval a stop abandoned at step 2 runs first on resume
    tracker.log(3, {"loss": 0.3})
    tracker.finish()
    assert [(r["step"], sorted(r)) for r in read_metrics(run_dir)] == [
        (1, ["loss", "step"]),
        (2, ["loss", "step"]),
        (2, ["eval/loss", "step"]),
        (3, ["loss", "step"]),
    ]


def test_the_step_sync_of_one_rank_answers_at_once(ctx):
    stop, tables = StopFlag(), []
    sync = StepSync(ctx, stop, log_every=2, on_table=lambda step, table: tables.append((step, table)))
    assert not sync.active
    assert sync.step(1, 0.01, [1.5, 2.0]) == NONE and tables == [(1, [[1.5, 2.0]])]
    assert sync.step(2, 0.01, None) == NONE and len(tables) == 1
    stop.code = STOP
    assert sync.step(3, 0.01, None) == STOP  # no peer to agree with: this rank's request is the answer
    sync.flush()
    assert sync.agreed_code == NONE


def _two_rank_sync(ctx):
    stop, tables, codes = StopFlag(), [], []
    sync = StepSync(ctx, stop, log_every=4, on_table=lambda step, table: tables.append((step, table)))
    for step in range(1, 13):
        if ctx.rank == 1 and step == 6:
            stop.code = STOP  # a signal on rank 1 only, while step 6 is in flight
        values = [step * 10.0 + ctx.rank, -1.0] if step in (1, 4, 8, 12) else None
        codes.append(sync.step(step, 0.1, values))  # 0.1 s steps: an exchange every step
    sync.flush()
    return {"active": sync.active, "codes": codes, "tables": tables}


def test_two_ranks_agree_on_the_stop_step_and_gather_every_ranks_log_values():
    ranks = run_on_ranks(_two_rank_sync)
    assert ranks[0]["codes"] == ranks[1]["codes"] and ranks[0]["active"]
    assert ranks[0]["codes"].index(STOP) == 6  # step 7: the exchange of step 6, read at the next one
    assert set(ranks[0]["codes"][:6]) == {NONE}
    for r in ranks:
        assert [step for step, _ in r["tables"]] == [1, 4, 8, 12]  # the last one at the flush
        for step, table in r["tables"]:
            # the stop code and step time columns are the sync's own; on_table gets the log values, by rank
            assert table == [[step * 10.0, -1.0], [step * 10.0 + 1, -1.0]]


def test_a_tracker_on_another_rank_holds_nothing(run_dir: RunDir):
    tracker = _tracker(run_dir, is_main=False)
    tracker.hold_for_eval(3)
    tracker.log(3, {"loss": 1.0})
    tracker.release_held()
    assert tracker.sinks == [] and tracker.held == {} and not run_dir.metrics.exists()


def test_the_straggler_is_the_rank_that_computes_longer_before_it_waits():
    from workers.tracking.straggler import find_straggler, ranks_of, straggler_of

    step = [60.0, 60.0, 60.0]  # DDP equalises step times: they tell nothing
    assert find_straggler([10.0, 11.0, 50.0], step) == (2, 50.0 / 10.5)
    assert find_straggler([10.0, 11.0, 12.0], step) is None  # below 1.25x the others' median
    assert find_straggler([0.30, 0.31, 0.45], [2.0, 2.0, 2.0]) is None  # 1.47x, but 0.15 ms of a 2 ms step: jitter
    assert find_straggler([40.0, 10.0], [50.0, 50.0]) == (0, 4.0)
    assert find_straggler([5.0], [6.0]) is None
    row = {"loss": 1.0, "rank0/compute_ms": 10.0, "rank0/step_time_ms": 60.0, "rank1/compute_ms": 30.0,
           "rank1/step_time_ms": 60.0, "rank1/rss_mb": 5.0, "eval/loss": 2.0}  # fmt: skip
    assert ranks_of(row) == [
        {"rank": 0, "compute_ms": 10.0, "step_time_ms": 60.0},
        {"rank": 1, "compute_ms": 30.0, "step_time_ms": 60.0, "rss_mb": 5.0},
    ]
    assert straggler_of(row) == {"rank": 1, "ratio": 3.0}
    assert straggler_of({"loss": 1.0, "rank0/step_time_ms": 1.0, "rank1/step_time_ms": 1.0}) is None  # older rows


class _SlowBatches(RowBatches):
    EVERY_S = 3600.0  # nothing is "stale" during the test: only add() after a write and drain() write


def test_rows_wait_for_a_batch_and_drain_writes_them_in_order():
    written: list[list[int]] = []
    batches = _SlowBatches(written.append)
    try:
        batches.add(1)  # the first row is written at once (a run's first row shows without delay)
        batches.add(2)
        batches.add(3)
        assert written == [[1]]  # written less than EVERY_S ago: 2 and 3 wait for the next batch
        batches.drain()
        batches.drain()  # nothing waiting: no empty batch
        assert written == [[1], [2, 3]]
    finally:
        batches.close()
    assert not batches.thread.is_alive()


def test_rows_of_a_stalled_loop_are_written_by_the_background_thread():
    """The loop stops coming back (a hang, a long eval): the rows it completed reach the file anyway."""
    written: list[list[int]] = []
    batches = RowBatches(written.append)
    try:
        batches.add(1)
        batches.add(2)  # right after a write: waits
        deadline = time.monotonic() + 60
        while written != [[1], [2]] and time.monotonic() < deadline:
            time.sleep(0.01)
        assert written == [[1], [2]]  # no further call from the "training thread"
    finally:
        batches.close()


def test_a_failing_write_reaches_the_caller_of_drain():
    def write(items):
        raise OSError(28, "No space left on device")

    batches = _SlowBatches(write)
    try:
        with pytest.raises(OSError, match="No space left"):
            batches.add(1)
    finally:
        batches.close()


class _QuickBatches(RowBatches):
    EVERY_S = 0.01


def test_a_failed_background_write_is_raised_by_the_next_add_and_warned_once(caplog):
    """The background thread's failure is not lost: the training thread raises it at its next add (once), and the
    log says so once."""
    written: list[list[int]] = []

    def write(items: list[int]) -> None:
        if threading.current_thread().name == "orch-rows":
            raise OSError(28, "No space left on device")
        written.append(items)

    caplog.set_level(logging.WARNING, logger="workers.tracking")
    batches = _QuickBatches(write)
    try:
        batches.add(1)  # written at once, on this thread
        with batches.lock:  # 2 waits for the background thread (no write since, so add alone would not write it)
            batches.items.append(2)
            batches.written_at = time.perf_counter()
        deadline = time.monotonic() + 60
        while batches.thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.005)
        assert not batches.thread.is_alive(), "the background thread did not meet the failure"
        with pytest.raises(OSError, match="No space left"):
            batches.add(3)  # (not added: the caller learns of the failure instead)
        batches.add(4)  # raised once: the training thread writes on
        batches.drain()
        assert written == [[1], [4]]
    finally:
        batches.close()
    warnings = [r for r in caplog.records if "rows could not be written in the background" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].levelno == logging.WARNING


def _statm_descriptors() -> int:
    fds = "/proc/self/fd"
    return sum(1 for fd in os.listdir(fds) if os.path.realpath(f"{fds}/{fd}").endswith("/statm"))


def test_the_reporters_memory_reader_closes_its_descriptor_with_the_reporting(run_dir: RunDir, ctx):
    from workers.tracking.reporting import Reporter

    if not os.path.exists("/proc/self/statm"):
        pytest.skip("no /proc here: the reader uses psutil and holds no descriptor")
    before = _statm_descriptors()
    cfg = config_from_dict({}, [f"run.dir={run_dir.root}", "tracking.mode=disabled"])
    reporters = [Reporter(cfg, ctx, _tracker(run_dir), 0, {}) for _ in range(3)]
    assert _statm_descriptors() == before + 3 and reporters[0].memory.rss_mb() > 0
    for reporter in reporters:
        reporter.close()
        reporter.tracker.finish()
    assert _statm_descriptors() == before
    assert reporters[0].memory.rss_mb() > 0  # (read by psutil once closed)
