"""Elastic capacity, local: a device slot whose worker keeps failing is dropped and the run finishes on the others
— on the same global sample stream, so the result is the uninterrupted run's (within float reordering); without
``launch.min_nproc`` the report names the slot that kept failing. Real processes, real restarts."""

from __future__ import annotations

import json

from conftest import MAX_STEPS, cli, launch, load, rel_diff, wandb_view

from workers.rundir import RunDir

ELASTIC = ["launch.grace_period_s=1", "task.args.fail_slot=2"]


def test_a_slot_that_keeps_failing_is_dropped_and_the_run_finishes_exactly_on_the_rest(refs, tmp_path):
    run = tmp_path / "elastic"
    # Slot 2's worker fails at its 9th micro-step of every attempt: attempt 0 at step 5 (after checkpoint 4), attempt
    # 1 at step 9 (after checkpoint 8): two in a row, so attempt 2 runs on slots 0 and 1 from step 8.
    elastic = ["task.args.fail_call=9", "launch.min_nproc=2", "launch.max_restarts=3", "tracking.mode=offline"]
    proc = launch(run, 3, *ELASTIC, *elastic)
    assert "slot 2 dropped: its worker failed 2 attempts in a row" in proc.stderr
    assert "continuing on 2 worker(s), slots [0, 1]" in proc.stderr
    assert rel_diff(load(run), load(refs[2])) < 1e-5  # the same global stream, on 3 then 2 workers
    rows = [json.loads(line) for line in RunDir(run).metrics.read_text().splitlines()]
    worlds = [r["world_size"] for r in rows if "world_size" in r]
    assert worlds[0] == 3 and worlds[-1] == 2 and worlds == sorted(worlds, reverse=True)
    events = [json.loads(line) for line in RunDir(run).launch_events.read_text().splitlines()]
    assert [(e["event"], e["slot"], e["world_size"], e["attempt"]) for e in events] == [("slot-dropped", 2, 2, 2)]
    assert "device slot 2 is broken" in events[0]["reason"]
    # one wandb run across the attempts (it checks the id of every record; an attempt that failed before its
    # tracking process started wrote none)
    _, per_start, _ = wandb_view(run)
    steps = [s for start in per_start for s in start]
    assert steps == [1, *range(2, MAX_STEPS + 1, 2)], per_start  # no gap, no duplicate
    status = json.loads(cli("status", str(run), "--json", check=True).stdout)
    assert status["state"] == "done" and status["world_size"] == 2
    assert [w["world_size"] for w in status["world_sizes"]] == [3, 2] and status["world_sizes"][1]["step"] > 8
    assert [d["slot"] for d in status["dropped_slots"]] == [2]
    # Growing back: the device repaired (slot 2 no longer fails), the run launched again on 3 uses every slot.
    more = launch(run, 3, "launch.grace_period_s=1", f"train.max_steps={MAX_STEPS + 4}", "tracking.mode=offline")
    assert more.returncode == 0, more.stderr
    rows = [json.loads(line) for line in RunDir(run).metrics.read_text().splitlines()]
    assert [r["world_size"] for r in rows if r.get("step", 0) > MAX_STEPS and "world_size" in r][-1] == 3
    assert json.loads(cli("status", str(run), "--json", check=True).stdout)["world_size"] == 3


def test_without_min_nproc_the_report_names_the_slot_that_kept_failing(tmp_path):
    run = tmp_path / "inelastic"
    proc = launch(run, 3, *ELASTIC, "launch.max_restarts=2", check=False)
    assert proc.returncode == 1, proc.stderr
    assert "slot 2 was the cause of the last 3 attempts" in proc.stderr
    assert "device slot 2 is broken" in proc.stderr and "launch.min_nproc=2 would let the run go on" in proc.stderr
    assert not RunDir(run).launch_events.exists()  # nothing was dropped


def test_min_nproc_above_nproc_is_one_line_and_writes_nothing(tmp_path):
    run = tmp_path / "bad"
    proc = launch(run, 2, "launch.min_nproc=3", check=False)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "launch.min_nproc" in proc.stderr and "above launch.nproc (2" in proc.stderr
    assert not run.exists()
