"""SLURM against the real dev cluster (slurm/dev-cluster.sh: two nodes on this machine), through the real CLI:
a 2-task and a 2-node job equal ``launch --nproc 2``; a USR2 notice → save at the next step → requeue → bitwise
equal finish with one wandb run; cancel + resubmit on another size; failures, time limits and stuck jobs reported.

Without a cluster these tests skip with the reason; with ORCH_REQUIRE_SLURM=1 (CI) they fail instead.
"""

from __future__ import annotations

import fcntl
import functools
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest
from conftest import (
    EVERY,
    MAX_STEPS,
    QUICK,
    ROOT,
    cli,
    consumed_sequence,
    env,
    latest_name,
    launch,
    load,
    rel_diff,
    tensors_equal,
    wandb_view,
)

from orchestrator.launcher import free_port

DEV_CONF = Path(os.environ.get("ORCH_SLURM_DIR", "/tmp/orch-slurm")) / "etc" / "slurm.conf"
# One cluster of two nodes: these tests run one after another, in one test process (pytest-xdist's loadgroup);
# `pytest -m slurm` selects them (conftest.py marks the other groups from SUITES).
pytestmark = [pytest.mark.slurm, pytest.mark.xdist_group("slurm")]

SLOW = ["task.args.step_sleep_s=0.3"]
TERMINAL = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL")


@functools.cache  # asked once per session: a cluster that is down would otherwise cost each module its timeout
def _cluster_problem() -> str | None:
    if shutil.which("sbatch") is None:
        return "SLURM is not installed (no sbatch); start the dev cluster with: slurm/dev-cluster.sh up"
    if "SLURM_CONF" not in os.environ and DEV_CONF.is_file():
        os.environ["SLURM_CONF"] = str(DEV_CONF)  # the workers' jobs inherit it through the CLI's environment
    try:
        ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:  # scontrol retries a missing config for a minute
        return "scontrol ping did not answer within 20 s; run: slurm/dev-cluster.sh up"
    if "UP" not in ping.stdout:
        said = [ln.strip() for ln in (ping.stdout + ping.stderr).splitlines() if ln.strip() and "*" not in ln]
        return f"no SLURM controller answers ({said[0] if said else 'no output'}); run: slurm/dev-cluster.sh up"
    idle = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], capture_output=True, text=True).stdout.split("\n")
    if sum(1 for line in idle if line.strip()) < 2:
        return f"the tests need a cluster with 2 nodes, sinfo says: {idle}"
    return None


@pytest.fixture(scope="module", autouse=True)
def slurm_cluster():
    problem = _cluster_problem()
    if problem:
        if os.environ.get("ORCH_REQUIRE_SLURM") == "1":
            pytest.fail(f"ORCH_REQUIRE_SLURM=1 but {problem}")
        pytest.skip(problem)
    # One test session at a time on the one cluster: a second pytest (another checkout, a CI clone) waits here.
    # Two sessions at once down each other's nodes and fill each other's nodes (seen: a job failed by a node
    # another session set down; a pending reason Resources instead of BeginTime).
    lock = Path(tempfile.gettempdir()) / "orch-slurm-tests.lock"
    with lock.open("a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        yield


TEST_REASON = "orch-test"  # the reason of every node state a test sets (drain, down): cleanup resumes those


def jobs_started_under(folder: Path) -> set[str]:
    """The SLURM job ids of every run (and sweep) under ``folder``: its jobs.json, sweep.json and events."""
    found: set[str] = set()
    for path in folder.rglob("*.json*"):
        try:
            text = path.read_text()
            if path.name == "jobs.json":
                found |= {j["job_id"] for j in json.loads(text)}
            elif path.name == "sweep.json":
                found |= set(json.loads(text).get("slurm_jobs", []))
            elif path.name == "events.jsonl" and path.parent.name == "slurm":
                found |= {str(json.loads(ln)["job_id"]) for ln in text.splitlines() if '"job_id": "' in ln}
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return {job.split("_")[0] for job in found if job and job != "None"}


def clean_up_cluster(folder: Path) -> None:
    """Leave the cluster as a test found it, whether it passed or not: scancel the jobs it started (a killed
    ``submit --wait`` follower leaves its job running, requeues and all), wait until they are gone, and resume
    the nodes a test drained or downed (:data:`TEST_REASON`)."""
    jobs = sorted(jobs_started_under(folder))
    if jobs:
        subprocess.run(["scancel", *jobs], capture_output=True, text=True)
    for node, _reason in _nodes_set_by_tests():
        subprocess.run(["scontrol", "update", f"nodename={node}", "state=resume"], capture_output=True)
    live = lambda: any(slurm_state(job) not in (*TERMINAL, "GONE") for job in jobs)  # noqa: E731
    wait_until(lambda: not live() and not _nodes_set_by_tests(), 120, f"jobs {jobs} gone, nodes resumed")


def _nodes_set_by_tests() -> list[tuple[str, str]]:
    out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N|%E"], capture_output=True, text=True).stdout
    rows = [line.split("|", 1) for line in out.splitlines() if "|" in line]
    return [(node, reason) for node, reason in rows if reason.startswith(TEST_REASON)]


@pytest.fixture(autouse=True)
def clean_cluster(tmp_path):
    """Every test's jobs are cancelled and its drained or downed nodes resumed when it ends, failed or not."""
    yield
    if _cluster_problem() is None:
        clean_up_cluster(tmp_path)


def submit(run: Path, *args: str, wait: bool = True) -> subprocess.CompletedProcess:
    extra = ["--wait"] if wait else []
    return cli("submit", "configs/quickstart.yaml", f"run.dir={run}", *QUICK, "slurm.time_min=10", *args, *extra)


def job_id_of(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.split()[0]


def status(run: Path) -> dict:
    proc = cli("status", str(run), "--json", check=True)
    return json.loads(proc.stdout)


def wait_until(predicate, timeout: float = 120, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def slurm_state(job: str) -> str:
    out = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True).stdout
    return out.split("JobState=", 1)[1].split()[0] if "JobState=" in out else "GONE"


def events(run: Path) -> list[dict]:
    path = run / "slurm" / "events.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def assert_same_as(run: Path, ref: Path) -> None:
    assert tensors_equal(load(run), load(ref)), "model differs from the local launch"
    assert tensors_equal(load(run, "optim.pt"), load(ref, "optim.pt")), "optimizer differs"
    assert consumed_sequence(run) == consumed_sequence(ref), "another sample sequence was consumed"


@pytest.mark.parametrize("shape", [["--tasks-per-node", "2"], ["--nodes", "2"]], ids=["2-tasks", "2-nodes"])
def test_job_trains_like_a_local_launch(refs, tmp_path, shape):
    run = tmp_path / "run"
    proc = submit(run, *shape)
    assert proc.returncode == 0, proc.stderr
    job = proc.stdout.split()[0]
    assert f"job {job} completed at step {MAX_STEPS}" in proc.stderr
    assert "training steps 0..12" in proc.stdout, "--wait streams rank 0's log"
    assert_same_as(run, refs[2])
    info = status(run)
    assert info["slurm_jobs"] == [job] and info["slurm_state"].startswith(f"job {job}: COMPLETED")
    start = [e for e in events(run) if e["event"] == "start"]
    assert [e["world_size"] for e in start] == [2]
    assert start[0]["nodes"] == ("n[1-2]" if "--nodes" in shape else "n1")  # really on two nodes


def test_plain_sbatch_template_trains_the_same(refs, tmp_path):
    run = tmp_path / "run"
    e = env()
    e["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{e['PATH']}"  # the template runs `python`
    cmd = ["sbatch", "--wait", f"--output={tmp_path}/slurm-%j.out", f"--chdir={ROOT}", "slurm/train.sbatch"]
    proc = subprocess.run(
        [*cmd, "configs/quickstart.yaml", f"run.dir={run}", *QUICK], env=e, capture_output=True, text=True, timeout=180
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr + "".join(p.read_text() for p in tmp_path.glob("*.out"))
    assert [(x["event"], x.get("world_size")) for x in events(run)] == [("start", 2), ("completed", None)]
    assert_same_as(run, refs[2])


def test_usr2_saves_at_the_next_step_requeues_and_resumes_exactly(refs, tmp_path):
    # DataLoader worker processes too: SLURM signals every process of the step, and they must shrug it off.
    run = tmp_path / "run"
    args = ["--tasks-per-node", "2", *SLOW, "tracking.mode=offline", "data.num_workers=2", "--wait"]
    cmd = [sys.executable, "-m", "orchestrator", "submit", "configs/quickstart.yaml", f"run.dir={run}", *QUICK]
    pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE}
    proc = subprocess.Popen([*cmd, *args], env=env(), cwd=ROOT, text=True, **pipes)
    try:
        wait_until(lambda: latest_name(run) == f"step-{EVERY:08d}", what="the first checkpoint")
        job = json.loads((run / "slurm" / "jobs.json").read_text())[-1]["job_id"]
        subprocess.run(["scancel", "--signal=USR2", job], check=True)
        out, err = proc.communicate(timeout=180)  # --wait follows the job through its requeue to the end
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert f"job {job} completed at step {MAX_STEPS}" in err, err
    assert slurm_state(job) == "COMPLETED"

    kinds = [(e["event"], e["restart"], e.get("world_size", 2)) for e in events(run)]
    assert [k[:2] for k in kinds] == [("start", 0), ("requeue", 0), ("start", 1), ("completed", 1)], kinds
    assert {k[2] for k in kinds} == {2}, kinds
    requeue = events(run)[1]
    # The notice came while step signal_step was in flight (or during the save after it): the next step boundary
    # saved, so nothing completed is redone.
    assert requeue["kind"] == "preemption" and requeue["saved_step"] - requeue["signal_step"] in (1, 2), requeue
    saved = requeue["saved_step"]
    assert EVERY < saved < MAX_STEPS, requeue
    log = (run / "logs" / "rank-0.log").read_text()
    assert f"saved step {saved}, the last completed step: 0 steps lost; requeued" in log
    assert f"resumed from {run / 'checkpoints' / f'step-{saved:08d}'}: step {saved}" in log
    for line in ("0 steps lost; requeued", "resumed from"):  # --wait streamed rank 0's log of both incarnations
        assert line in out, out
    assert_same_as(run, refs[2])
    # One wandb run across the requeue, its steps strictly increasing with no gap or duplicate.
    rid, per_start, _config = wandb_view(run)
    assert len(per_start) == 2 and [s for start in per_start for s in start] == [1, *range(2, MAX_STEPS + 1, 2)]
    info = status(run)
    assert info["requeues"] == 1 and info["preemptions"] == 1 and info["wandb_run_id"] == rid
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["restarts"] == 1 and rows[-1]["preemptions"] == 1


def test_cancelled_job_resumes_on_another_number_of_tasks(refs, tmp_path):
    run = tmp_path / "run"
    job = job_id_of(submit(run, "--tasks-per-node", "2", *SLOW, wait=False))
    wait_until(lambda: latest_name(run) == f"step-{EVERY:08d}", what="the first checkpoint")
    proc = cli("cancel", str(run), check=True)
    assert f"cancelled job(s) {job}" in proc.stdout
    wait_until(lambda: slurm_state(job) == "CANCELLED", 60, "CANCELLED")
    assert "cancelled" in status(run)["note"]
    stopped_at = int(latest_name(run).split("-")[1])
    assert stopped_at < MAX_STEPS

    proc = submit(run, "--tasks-per-node", "1")  # same run dir, world size 1: resumes from the latest checkpoint
    assert proc.returncode == 0, proc.stderr
    assert f"step {stopped_at}, {stopped_at * 24} samples seen, saved at world size 2, now 1" in proc.stdout
    assert rel_diff(load(run), load(refs[2])) <= 1e-5
    assert consumed_sequence(run) == consumed_sequence(refs[2])
    assert len(status(run)["slurm_jobs"]) == 2


def test_failing_job_names_the_rank_and_its_traceback(tmp_path):
    run = tmp_path / "run"
    proc = submit(run, "--tasks-per-node", "2", "task.args.fail_rank=1", "task.args.fail_call=5")
    assert proc.returncode == 1, proc.stderr
    for where in (proc.stderr, status(run)["failure"]):
        assert "rank 1 failed first: RuntimeError: injected failure on call 5" in where, where
        assert "Traceback (most recent call last)" in where and "orch_test_tasks.py" in where
        assert "FAILED" in where and "logs/rank-<r>.log" in where


def test_time_limit_notices_requeue_until_the_cap(tmp_path):
    # A 1-minute job warned 50 s ahead: the notice comes ~10-40 s in, close to the end: a timeout, not a
    # preemption. slurm.max_timeouts=1: the first one requeues (with a fresh time limit), the second saves and
    # ends the job without a requeue.
    run = tmp_path / "run"
    proc = submit(
        run, *SLOW, "train.max_steps=1000", "slurm.time_min=1", "slurm.signal_delay_s=50", "slurm.max_timeouts=1"
    )
    assert proc.returncode == 1, proc.stderr
    got = [(e["event"], e["restart"], e.get("kind")) for e in events(run)]
    assert got == [("start", 0, None), ("requeue", 0, "timeout"), ("start", 1, None), ("timeout-cap", 1, "timeout")]
    cap = events(run)[-1]
    assert latest_name(run) == f"step-{cap['saved_step']:08d}"  # the last notice's save is committed
    assert "time limit too often" in proc.stderr and "FAILED" in proc.stderr
    info = status(run)
    assert info["timeouts"] == 1 and info["preemptions"] == 0 and "time limit too often" in info["failure"]


def test_pending_job_is_reported_and_a_second_submit_is_refused(tmp_path):
    run = tmp_path / "run"
    job = job_id_of(submit(run, "slurm.additional={begin: now+1hour}", wait=False))
    try:
        assert status(run)["slurm_state"] == f"job {job}: PENDING (BeginTime)"
        again = submit(run)
        assert again.returncode == 2 and f"already has job {job} (PENDING (BeginTime))" in again.stderr
        assert again.stderr.count("\n") == 1 and "Traceback" not in again.stderr
    finally:
        cli("cancel", str(run), check=True)
    wait_until(lambda: slurm_state(job) == "CANCELLED", 30, "CANCELLED")
    # More nodes than the partition has: pending for ever. --wait says so and returns instead of waiting.
    proc = submit(run, "--nodes", "3")
    assert proc.returncode == 1, proc.stderr
    assert re.search(r"PENDING \(Partition\w+\): it asks for .* and will not start", proc.stderr), proc.stderr
    assert "is still queued. HINT: orchestrator cancel" in proc.stderr
    cli("cancel", str(run), check=True)


def test_bad_submissions_exit_2_and_leave_nothing(tmp_path):
    run = tmp_path / "run"
    for args, expected in (
        (["--partition", "nope"], "SLURM refused the job: sbatch: error: Batch job submission failed: Invalid"),
        (["--nodes", "5"], "not divisible by world size 5"),
        (["slurm.signal=TERM"], "config key 'slurm.signal' = 'TERM': must be one of USR1, USR2"),
        (["slurm.nodez=2"], "did you mean 'slurm.nodes'?"),
        (["--nodes", "3-1"], "config key 'slurm.nodes' = '3-1': runs backwards (MIN above MAX). HINT: write 1-3"),
        (["--nodes", "0-2"], "'slurm.nodes' = '0-2': asks for 0 nodes"),
        (["--nodes", "1-5"], "with 5 node(s) x 1 task(s) the world size would not divide data.global_batch_size 24"),
        (
            ["--nodes", "1-2", "train.parallel=hsdp", "train.shard_size=2"],
            "with 1 node(s) x 1 task(s) the world size would not be a multiple of train.shard_size 2",
        ),
        (["--nodes", "1-2", "launch.min_nproc=0"], "'launch.min_nproc' = 0: must be in [1, 1024]"),
    ):
        proc = submit(run, *args, wait=False)
        assert proc.returncode == 2 and expected in proc.stderr, proc.stderr
        assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr
        assert not run.exists(), f"{args} left {list(run.rglob('*'))}"


def test_early_stopping_ends_the_job_without_a_requeue(tmp_path):
    """eval.patience on SLURM: the job saves at the early stop, exits 0 and is not requeued (it is done)."""
    run = tmp_path / "run"
    early = ["task.args.eval_n=64", "eval.every=2", "eval.mode=max", "eval.patience=2"]  # best at 2: stop at 6
    proc = submit(run, "--tasks-per-node", "2", *early)
    assert proc.returncode == 0, proc.stderr
    job = proc.stdout.split()[0]
    assert "early stopping at step 6" in proc.stdout, proc.stdout
    assert [(e["event"], e.get("step")) for e in events(run)] == [("start", None), ("completed", 6)]
    assert latest_name(run) == "step-00000006" and slurm_state(job) == "COMPLETED"


def test_a_test_that_fails_leaves_no_job_running_and_no_node_drained(tmp_path):
    """What :func:`clean_cluster` does after every test: a test that failed after killing its ``submit --wait``
    follower (which leaves the job running) and draining a node leaves neither behind."""
    run = tmp_path / "run"
    proc = _follow(run, "--nodes", "2", *SLOW, "train.max_steps=200")
    wait_until(lambda: any(e["event"] == "start" for e in events(run)), 120, "the job to start")
    proc.kill()  # what every test's finally does
    proc.wait()
    job = json.loads((run / "slurm" / "jobs.json").read_text())[-1]["job_id"]
    subprocess.run(["scontrol", "update", "nodename=n2", "state=drain", f"reason={TEST_REASON}"], check=True)
    assert slurm_state(job) == "RUNNING"  # the follower's end is not the job's
    clean_up_cluster(tmp_path)
    assert slurm_state(job) == "CANCELLED" and not _nodes_set_by_tests()
    assert "drain" not in subprocess.run(["sinfo", "-h", "-N", "-o", "%t"], capture_output=True, text=True).stdout


@pytest.mark.parametrize("trouble", ["controller down", "no configuration"])
def test_a_controller_that_does_not_answer_is_named_as_such(trouble, tmp_path):
    """A slurm.conf whose controller port nobody listens on, and a SLURM_CONF naming no file: exit 2, one line
    that names the controller and SLURM_CONF — not a partition or account problem — and nothing written."""
    conf = tmp_path / "slurm.conf"
    if trouble == "controller down":
        text = Path(os.environ["SLURM_CONF"]).read_text()
        port = free_port()  # free now: nothing answers there
        lines = [ln for ln in text.splitlines() if not ln.strip().lower().startswith("slurmctldport")]
        conf.write_text("\n".join([*lines, f"SlurmctldPort={port}"]) + "\n")
    run = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "orchestrator", "submit", "configs/quickstart.yaml", f"run.dir={run}", *QUICK],
        env={**env(), "SLURM_CONF": str(conf)}, cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "SLURM controller" in proc.stderr and f"SLURM_CONF={conf}" in proc.stderr, proc.stderr
    assert "partition" not in proc.stderr and "account" not in proc.stderr
    assert not run.exists()


# ---------------------------------------------------------------- elastic capacity: node ranges, failures requeue

ELASTIC = ["--nodes", "1-2", "--tasks-per-node", "1", *SLOW]


def _rank_pid(job: str, rank: int) -> int:
    """The pid of the training process of ``rank`` of the running job (srun's task, running submitit's entry)."""
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            environ = proc.environ()
        except psutil.Error:
            continue
        if (
            environ.get("SLURM_JOB_ID") == job
            and environ.get("SLURM_PROCID") == str(rank)
            and ("submitit" in " ".join(proc.info["cmdline"] or []))
        ):
            return proc.pid
    raise AssertionError(f"no process of rank {rank} of job {job}")


def _idle_nodes() -> list[str]:
    return subprocess.run(["sinfo", "-h", "-N", "-o", "%t"], capture_output=True, text=True).stdout.split()


def _requeued_onto_both_nodes(run: Path, job: str, restart: int) -> None:
    """Once the killed job is back in the queue, hold it until both nodes are free again, then let it go: SLURM
    starts a node-range job on the nodes free at that moment, and a node still cleaning up after the killed step
    would make it start on one (correct, but not the case under test)."""
    started = lambda: any(e["event"] == "start" and e["restart"] == restart for e in events(run))  # noqa: E731
    wait_until(lambda: slurm_state(job) == "PENDING" or started(), 120, "the requeue")
    held = subprocess.run(["scontrol", "hold", job], capture_output=True, text=True).returncode == 0
    if held:  # (already running again: it started on what it got; the assertions say which)
        wait_until(lambda: _idle_nodes() == ["idle", "idle"], 120, "both nodes free")
        subprocess.run(["scontrol", "release", job], check=True)


def _follow(run: Path, *args: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "orchestrator", "submit", "configs/quickstart.yaml", f"run.dir={run}", *QUICK]
    return subprocess.Popen([*cmd, "slurm.time_min=10", *args, "--wait"], env=env(), cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip


@pytest.fixture
def follow():
    """``follow(run, *args)``: a ``submit --wait`` follower of the run; one still running when the test ends is
    killed (its job is then cancelled, and the nodes the test set down resumed, by :func:`clean_cluster`)."""
    procs: list[subprocess.Popen] = []
    yield lambda run, *args: procs.append(_follow(run, *args)) or procs[-1]
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _kill_rank_after_first_checkpoint(run: Path, proc: subprocess.Popen, rank: int) -> str:
    wait_until(lambda: latest_name(run) == f"step-{EVERY:08d}", what="the first checkpoint")
    job = json.loads((run / "slurm" / "jobs.json").read_text())[-1]["job_id"]
    assert proc.poll() is None
    os.kill(_rank_pid(job, rank), 9)
    return job


def test_a_node_range_job_runs_on_every_node_it_gets_and_a_killed_rank_requeues_it_bitwise(refs, tmp_path, follow):
    run = tmp_path / "run"
    proc = follow(run, *ELASTIC, "--max-restarts", "2")
    job = _kill_rank_after_first_checkpoint(run, proc, 1)
    wait_until(lambda: any(e["event"] == "failed" for e in events(run)), 120, "the failure recorded")
    _requeued_onto_both_nodes(run, job, restart=1)
    _, err = proc.communicate(timeout=240)  # --wait follows the job through its requeue to the end
    assert proc.returncode == 0, err
    got = [(e["event"], e["restart"], e.get("world_size"), e.get("requeued")) for e in events(run)]
    assert got == [
        ("start", 0, 2, None), ("failed", 0, None, True), ("start", 1, 2, None), ("completed", 1, None, None)
    ]  # fmt: skip
    assert events(run)[0]["nodes"] == events(run)[2]["nodes"] == "n[1-2]"  # both nodes, before and after
    assert "a rank was killed, or a node was lost" in events(run)[1]["error"]
    assert slurm_state(job) == "COMPLETED"
    assert_same_as(run, refs[2])  # the requeued job resumed from checkpoint 4 on 2 nodes: bitwise
    assert any("failed" in line and "requeued (restart 1/2)" in line for line in status(run)["history"])


def test_a_lost_node_leaves_the_job_on_the_node_it_has_and_it_grows_back_when_the_node_returns(refs, tmp_path, follow):
    run = tmp_path / "run"
    proc = follow(run, *ELASTIC, "--max-restarts", "2")
    wait_until(lambda: latest_name(run) == f"step-{EVERY:08d}", what="the first checkpoint")
    subprocess.run(["scontrol", "update", "nodename=n2", "state=drain", f"reason={TEST_REASON}"], check=True)
    job = json.loads((run / "slurm" / "jobs.json").read_text())[-1]["job_id"]
    os.kill(_rank_pid(job, 1), 9)  # rank 1 runs on n2 (SLURM fills the nodes in order): n2 is "lost"
    # The requeued job runs on n1 alone; once it has saved again, n2 comes back and the job's one rank dies:
    # the next incarnation gets both nodes again.
    wait_until(lambda: latest_name(run) == f"step-{2 * EVERY:08d}", what="a checkpoint on one node")
    subprocess.run(["scontrol", "update", "nodename=n2", "state=resume"], check=True)
    os.kill(_rank_pid(job, 0), 9)
    wait_until(lambda: sum(e["event"] == "failed" for e in events(run)) == 2, 120, "the second failure")
    _requeued_onto_both_nodes(run, job, restart=2)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err
    starts = [(e["restart"], e["world_size"], e["nodes"]) for e in events(run) if e["event"] == "start"]
    assert starts == [(0, 2, "n[1-2]"), (1, 1, "n1"), (2, 2, "n[1-2]")]
    assert rel_diff(load(run), load(refs[2])) <= 1e-5  # the same global stream, on 2, then 1, then 2 ranks
    assert consumed_sequence(run) == consumed_sequence(refs[2])
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    worlds = [(r["step"], r["world_size"]) for r in rows]
    assert {w for s, w in worlds if s <= EVERY} == {2} and {w for s, w in worlds if EVERY < s <= 2 * EVERY} == {1}
    assert {w for s, w in worlds if s > 2 * EVERY} == {2}
    info = status(run)
    assert [w["world_size"] for w in info["world_sizes"]] == [2, 1, 2] and info["world_size"] == 2
    wait_until(lambda: "idle" in subprocess.run(["sinfo", "-h", "-n", "n2", "-o", "%t"], capture_output=True,
                                                 text=True).stdout, 60, "n2 idle again")  # fmt: skip


def _set_node_down_under_the_job(run: Path, node: str) -> str:
    """After the job's first checkpoint, on both nodes: SLURM's DOWN state for ``node`` (what a lost node becomes;
    the dev cluster leaves an admin-downed node down, ReturnToService=1). SLURM ends the job with NODE_FAIL and
    requeues it itself (it is requeueable): no batch script of ours requeues it."""
    wait_until(lambda: latest_name(run) == f"step-{EVERY:08d}", what="the first checkpoint")
    job = json.loads((run / "slurm" / "jobs.json").read_text())[-1]["job_id"]
    assert [e["nodes"] for e in events(run) if e["event"] == "start"] == ["n[1-2]"]
    subprocess.run(["scontrol", "update", f"nodename={node}", "state=down", f"reason={TEST_REASON}"], check=True)
    return job


def test_a_node_set_down_under_the_job_is_a_counted_failure_and_the_job_ends_on_one_node(refs, tmp_path, follow):
    run = tmp_path / "run"
    proc = follow(run, *ELASTIC, "--max-restarts", "1")
    job = _set_node_down_under_the_job(run, "n2")
    _, err = proc.communicate(timeout=240)
    assert "n2\tdown" in subprocess.run(["sinfo", "-h", "-N", "-o", "%N\t%t"], capture_output=True,
                                         text=True).stdout  # fmt: skip
    assert proc.returncode == 0, err
    got = [(e["event"], e["restart"], e.get("world_size"), e.get("requeued")) for e in events(run)]
    # (the ranks of the ended incarnation may have stopped at a step boundary first: SLURM sent them SIGTERM)
    assert [g for g in got if g[0] != "stopped"] == [
        ("start", 0, 2, None), ("failed", 0, None, True), ("start", 1, 1, None), ("completed", 1, None, None)
    ], got  # fmt: skip
    failed = next(e for e in events(run) if e["event"] == "failed")
    assert failed["by"] == "slurm" and failed["node"] == "n2" and failed["why"] == "restart 1/1", failed
    assert f"node n2 (down: {TEST_REASON}) was lost" in failed["error"]
    assert [e["nodes"] for e in events(run) if e["event"] == "start"] == ["n[1-2]", "n1"]
    assert slurm_state(job) == "COMPLETED"
    assert rel_diff(load(run), load(refs[2])) <= 1e-5  # the same global stream on 2, then 1 rank
    assert consumed_sequence(run) == consumed_sequence(refs[2])
    worlds = [json.loads(line)["world_size"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert worlds[0] == 2 and worlds[-1] == 1 and worlds == sorted(worlds, reverse=True), worlds
    info = status(run)
    assert [w["world_size"] for w in info["world_sizes"]] == [2, 1] and info["world_size"] == 1
    lost = f"failed on n2 — node n2 (down: {TEST_REASON}) was lost; requeued (restart 1/1)"
    assert any(lost in line for line in info["history"]), info["history"]


def test_a_lost_node_counts_against_max_restarts_and_ends_the_job_failed_when_they_are_spent(tmp_path, follow):
    run = tmp_path / "run"
    proc = follow(run, *ELASTIC, "--max-restarts", "0")
    job = _set_node_down_under_the_job(run, "n2")
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 1, err
    failed = [(e["restart"], e["requeued"], e["by"], e["why"]) for e in events(run) if e["event"] == "failed"]
    assert failed == [(0, False, "slurm", "launch.max_restarts=0 spent")], events(run)
    assert [e["restart"] for e in events(run) if e["event"] == "start"] == [0]  # the requeued job did not train
    assert "not requeued: launch.max_restarts=0 spent" in err
    wait_until(lambda: slurm_state(job) in TERMINAL, 60, "the job's end")
    assert slurm_state(job) == "FAILED"
    assert status(run)["state"] == "failed"


def test_a_job_that_keeps_failing_ends_failed_when_its_restarts_are_spent(tmp_path):
    run = tmp_path / "run"
    # rank 1 raises at its 5th micro-step (step 3, before any checkpoint) in every incarnation. Two nodes, not a
    # range: a requeued range job may start before the other node is free again, on one node, where no rank 1 is.
    fixed = ["--nodes", "2", "--tasks-per-node", "1", *SLOW]
    proc = submit(run, *fixed, "--max-restarts", "1", "task.args.fail_rank=1", "task.args.fail_call=5")
    assert proc.returncode == 1, proc.stderr
    job = proc.stdout.split()[0]
    failed = [(e["restart"], e["requeued"], e["why"]) for e in events(run) if e["event"] == "failed"]
    assert failed == [(0, True, "restart 1/1"), (1, False, "launch.max_restarts=1 spent")]
    assert "not requeued: launch.max_restarts=1 spent" in proc.stderr
    history = status(run)["history"]
    assert len(history) == 4 and "injected failure on call 5; requeued" in history[1], "\n".join(history)
    assert "not requeued (launch.max_restarts=1 spent)" in history[3]
    info = status(run)
    assert "rank 1 failed first: RuntimeError: injected failure on call 5" in info["failure"]
    assert info["state"] == "failed" and info["slurm_state"].startswith(f"job {job}: FAILED"), info
    assert slurm_state(job) == "FAILED"  # (scontrol: the dev cluster keeps no accounting for sacct)


def test_a_node_that_failed_twice_is_excluded_from_the_next_allocation(refs, tmp_path, follow):
    run = tmp_path / "run"
    proc = follow(run, *ELASTIC, "--max-restarts", "3", "task.args.fail_node=n2", "task.args.fail_call=3")
    wait_until(lambda: any(e["event"] == "failed" for e in events(run)), 120, "the first failure")
    job = json.loads((run / "slurm" / "jobs.json").read_text())[-1]["job_id"]
    _requeued_onto_both_nodes(run, job, restart=1)  # on n2 again: it fails there a second time
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err
    got = [(e["event"], e["restart"], e.get("node") or e.get("nodes")) for e in events(run)]
    assert got == [
        ("start", 0, "n[1-2]"), ("failed", 0, "n2"), ("start", 1, "n[1-2]"), ("failed", 1, "n2"),
        ("excluded", 1, ["n2"]), ("start", 2, "n1"), ("completed", 2, None),
    ], got  # fmt: skip
    show = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True).stdout
    assert "ExcNodeList=n2" in show and slurm_state(job) == "COMPLETED"
    assert any("n2 failed twice: excluded from the next allocations" in line for line in status(run)["history"])
    assert rel_diff(load(run), load(refs[2])) <= 1e-5  # (both failures came before the first checkpoint)


def test_an_unusable_checkpoint_found_by_the_job_never_requeues(tmp_path):
    run, junk = tmp_path / "run", tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint at all")  # submit checks that it exists; only the job can read it
    proc = submit(run, *ELASTIC, "--max-restarts", "3", f"train.init_from={junk}")
    assert proc.returncode == 1, proc.stderr
    failed = [e for e in events(run) if e["event"] == "failed"]
    assert len(failed) == 1 and not failed[0]["requeued"] and failed[0]["why"].startswith("not retryable ("), failed
    assert [e["event"] for e in events(run)].count("start") == 1


def test_a_failure_names_the_node_it_happened_on(tmp_path):
    run = tmp_path / "run"
    fixed = ["--nodes", "2", "--tasks-per-node", "1", *SLOW]
    proc = submit(run, *fixed, "task.args.fail_node=n2", "task.args.fail_call=3")  # every rank on n2 raises
    assert proc.returncode == 1, proc.stderr
    failed = [e for e in events(run) if e["event"] == "failed"]
    assert [(e["rank"], e["node"], e["requeued"]) for e in failed] == [(1, "n2", False)]
    assert any("failed on n2 — RuntimeError: node n2 is broken" in line for line in status(run)["history"])


# ---------------------------------------------------------------- sweeps as an array job


def test_a_sweep_runs_as_one_array_and_a_preempted_trial_requeues_and_equals_its_local_run(tmp_path):
    sdir = tmp_path / "sweep"
    base = [*QUICK, "eval.every=4", "task.args.eval_n=48", "tracking.mode=disabled"]
    args = ["--slurm", "--grid", "optim.lr=[0.001,0.01]", "slurm.tasks_per_node=2", "slurm.time_min=10", *SLOW]
    proc = cli("sweep", "configs/quickstart.yaml", "--dir", str(sdir), *base, *args, check=True)
    array = proc.stdout.split()[0]
    trials = json.loads((sdir / "sweep.json").read_text())["trials"]
    first = sdir / trials[0]["id"]
    wait_until(lambda: latest_name(first) == f"step-{EVERY:08d}", what="the first trial's first checkpoint")
    subprocess.run(["scancel", "--signal=USR2", f"{array}_0"], check=True)

    def finished() -> bool:
        info = json.loads(cli("sweep", "status", str(sdir), "--json", check=True).stdout)
        return [t["state"] for t in info["trials"]] == ["done", "done"]

    wait_until(finished, 300, "both trials done")
    assert [e["event"] for e in events(first)] == ["start", "requeue", "start", "completed"]
    for trial in trials:
        local = tmp_path / f"local-{trial['number']}"
        launch(local, 2, *base[len(QUICK) :], f"optim.lr={trial['overrides']['optim.lr']}", *SLOW)
        assert rel_diff(load(sdir / trial["id"]), load(local)) <= 1e-6
    assert (sdir / "slurm").is_dir() and json.loads((sdir / "sweep.json").read_text())["slurm_jobs"] == [array]
    assert "cancelled array job(s)" in cli("sweep", "cancel", str(sdir), check=True).stdout


def test_hsdp_on_2_nodes_of_2_tasks_shards_within_each_node_and_trains_like_ddp(refs, tmp_path):
    run = tmp_path / "run"
    proc = submit(run, "--nodes", "2", "--tasks-per-node", "2", "train.parallel=hsdp")
    job = job_id_of(proc)
    assert f"job {job} completed at step {MAX_STEPS}" in proc.stderr, proc.stderr
    # the default shard group is the node (SLURM_NTASKS_PER_NODE): 2 groups of 2, one per node
    assert "hsdp: 3 unit(s) + root sharded over groups of 2 ranks, replicated 2x" in proc.stdout, proc.stdout
    start = [e for e in events(run) if e["event"] == "start"]
    assert [(e["world_size"], e["nodes"]) for e in start] == [(4, "n[1-2]")]
    assert rel_diff(load(run), load(refs[2])) <= 1e-5
    assert consumed_sequence(run) == consumed_sequence(refs[2])
