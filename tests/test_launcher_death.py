"""The launcher's death is the launch's death — tested the way users cause it: the quickstart's default config, a
run far longer than the test, ``kill -9`` of the launcher's pid alone (nothing else is signalled), started from a
terminal (a real pseudo-terminal as the controlling terminal) or from ``setsid nohup ... &``; a closed terminal;
SIGHUP. Every process of the launch (fork server, workers, loader workers, wandb's) is in the launcher's session,
so "nothing left" is checked over the whole session, not over a snapshot of the launcher's children."""

from __future__ import annotations

import fcntl
import os
import pty
import select
import signal
import subprocess
import sys
import termios
import time
from pathlib import Path

import psutil
import pytest
import torch
from conftest import EVERY, MAX_STEPS, QUICK, ROOT, env, latest_name, launch, load, tensors_equal

LONG = ["train.max_steps=1000000"]  # the default config otherwise: it never ends on its own within a test


def _session(sid: int) -> list[psutil.Process]:
    """Every live process of session ``sid`` (zombies count as gone)."""
    found = []
    for proc in psutil.process_iter():
        try:
            if os.getsid(proc.pid) == sid and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except (OSError, psutil.Error):
            continue
    return found


def _wait_session_gone(sid: int, timeout: float) -> list[psutil.Process]:
    deadline = time.monotonic() + timeout
    while (left := _session(sid)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


def _committed(run: Path) -> set[str]:
    folder = run / "checkpoints"
    return {p.name for p in folder.glob("step-*") if (p / "manifest.json").is_file()} if folder.is_dir() else set()


def _wait_for(condition, proc_alive, what: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc_alive(), f"the launch ended before {what}"
        assert time.monotonic() < deadline, f"no {what} after {timeout} s"
        time.sleep(0.02)


class TerminalLaunch:
    """``orchestrator launch`` started as a user's terminal starts it: a new session whose controlling terminal is a
    pseudo-terminal; the test holds the terminal's other side (reads what the launch prints, can close it)."""

    def __init__(self, *args: str) -> None:
        self.master, slave = pty.openpty()

        def controlling_terminal() -> None:
            os.setsid()
            fcntl.ioctl(0, termios.TIOCSCTTY, 0)

        cmd = [sys.executable, "-m", "orchestrator", "launch", *args]
        self.proc = subprocess.Popen(
            cmd, env=env(), cwd=ROOT, stdin=slave, stdout=slave, stderr=slave, preexec_fn=controlling_terminal
        )
        os.close(slave)
        self.output = b""

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        self.drain()
        return self.proc.poll() is None

    def drain(self) -> None:
        """Read what the launch printed so far (a terminal nobody reads would fill up and block it)."""
        while self.master is not None and select.select([self.master], [], [], 0)[0]:
            try:
                chunk = os.read(self.master, 65536)
            except OSError:  # the launch's side is closed
                return
            if not chunk:
                return
            self.output += chunk

    def close_terminal(self) -> None:
        os.close(self.master)
        self.master = None

    def text(self) -> str:
        return self.output.decode(errors="replace")


class NohupLaunch:
    """``setsid nohup orchestrator launch ... &`` from a script: no terminal, its own session, output to a file."""

    def __init__(self, log: Path, *args: str) -> None:
        cmd = ["setsid", "nohup", sys.executable, "-m", "orchestrator", "launch", *args]
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(cmd, env=env(), cwd=ROOT, stdin=subprocess.DEVNULL, stdout=out, stderr=out)
        self.log = log

    @property
    def pid(self) -> int:
        return self.proc.pid  # setsid execs in place when it is not a group leader: this is the launcher

    def alive(self) -> bool:
        return self.proc.poll() is None

    def text(self) -> str:
        return self.log.read_text(errors="replace")


@pytest.mark.parametrize("started", ["terminal", "setsid-nohup"])
def test_kill_9_of_the_launcher_ends_every_process_of_the_launch_and_a_relaunch_trains_alone(started, tmp_path):
    run = tmp_path / "run"
    args = ["configs/quickstart.yaml", "--nproc", "2", f"run.dir={run}", *LONG]
    if started == "terminal":
        launch_ = TerminalLaunch(*args)
    else:  # also with a loader worker per rank: the workers' own children must go too
        launch_ = NohupLaunch(tmp_path / "nohup.out", *args, "data.num_workers=1")
    sid = launch_.pid
    _wait_for(lambda: len(_committed(run)) >= 2, launch_.alive, "second checkpoint")
    processes = _session(sid)
    assert len(processes) >= 4, [p.name() for p in processes]  # launcher, fork server, 2 workers (+ wandb, loaders)
    at_kill = _committed(run)
    os.kill(launch_.pid, signal.SIGKILL)  # the launcher's pid alone, as `kill -9 PID` does
    launch_.proc.wait()
    left = _wait_session_gone(sid, timeout=5.0)
    assert not left, f"alive 5 s after the launcher's SIGKILL: {[(p.pid, p.name()) for p in left]}"
    # A commit already renaming at the instant of the kill may land; nothing can after the processes are gone.
    assert len(_committed(run) - at_kill) <= 1, (at_kill, _committed(run))

    last = max(int(name.split("-")[1]) for name in _committed(run))
    again = subprocess.run(
        [sys.executable, "-m", "orchestrator", "launch", *args[:-1], f"train.max_steps={last + 150}",
         "tracking.mode=disabled"],
        env=env(), cwd=ROOT, capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert again.returncode == 0, again.stderr
    assert "set aside" not in again.stderr and "skipped" not in again.stderr, again.stderr  # nobody else wrote there
    assert f"resuming from step-{last:08d}" in again.stderr or f"step-{last:08d}" in again.stderr, again.stderr


def test_a_closed_terminal_is_a_graceful_stop_that_resumes_bitwise(refs, tmp_path):
    """The terminal (or ssh session) closes: the kernel hangs it up and sends SIGHUP; every later write to it fails.
    The run saves at the next step and exits 0; the same command resumes it to the reference's weights."""
    run = tmp_path / "run"
    term = TerminalLaunch("configs/quickstart.yaml", "--nproc", "2", f"run.dir={run}", *QUICK,
                          "task.args.step_sleep_s=0.1")  # fmt: skip
    _wait_for(lambda: latest_name(run) == f"step-{EVERY:08d}", term.alive, f"step-{EVERY:08d}")
    term.close_terminal()
    assert term.proc.wait(timeout=60) == 0
    stopped_at = int(latest_name(run).split("-")[1])
    assert EVERY < stopped_at < MAX_STEPS, "the hang-up did not save at the next step boundary"
    log = (run / "logs" / "rank-0.log").read_text()
    assert "stop requested (SIGHUP during step" in log and "stopped on request (SIGHUP)" in log
    assert not _wait_session_gone(term.pid, timeout=5.0)
    launch(run, 2)
    assert tensors_equal(load(run), load(refs[2]))
    assert tensors_equal(load(run, "optim.pt"), load(refs[2], "optim.pt"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA for its usage error")
def test_a_launch_that_exits_2_leaves_no_fork_server_behind(tmp_path):
    """A usage error found after the fork server was started (here: launch.device=cuda on a machine without one,
    checked while the server imports torch): exit 2, and no process of the launch is left, not even the server
    mid-import."""
    run = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "orchestrator", "launch", "configs/quickstart.yaml", f"run.dir={run}",
         "launch.device=cuda"],
        env=env(), cwd=ROOT, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2, err
    assert "launch.device" in err
    # within moments (a process in its exit may still be listed, its command line already gone), not after the
    # server finished importing torch
    left = _wait_session_gone(proc.pid, timeout=5.0)
    assert not left, [(p.pid, p.name()) for p in left]


def test_the_progress_bar_stays_clean_when_other_processes_write_to_the_terminal(tmp_path):
    """On a terminal, rank 0 draws the bar; the launcher (another process) and wandb's process write too. wandb is
    silent (its banner lines would land inside the bar), and every launcher line clears the line it lands on."""
    run = tmp_path / "run"
    term = TerminalLaunch("configs/quickstart.yaml", "--nproc", "2", f"run.dir={run}", *LONG)  # wandb offline
    _wait_for(lambda: len(_committed(run)) >= 2, term.alive, "second checkpoint")
    os.kill(term.pid, signal.SIGTERM)  # the launcher says "stop requested" while the bar is drawn
    deadline = time.monotonic() + 60
    while term.alive():
        assert time.monotonic() < deadline, "the launch did not stop"
        time.sleep(0.05)
    assert term.proc.returncode == 0
    out = term.text()
    assert "ETA" in out, out[-2000:]  # the bar was drawn
    pieces = [p.lstrip("\x1b[K") for line in out.splitlines() for p in line.split("\r")]
    assert not [p for p in pieces if p.startswith("wandb:")], out[-2000:]  # wandb's own banner lines
    starts = [i for i in range(len(out)) if out.startswith("[launcher]", i)]
    assert starts, out[-2000:]
    for i in starts:  # "HH:MM:SS [launcher] ...": what precedes the time is a line start or a cleared line
        before = out[: i - len("00:00:00 ")]
        assert before.endswith(("\n", "\r\x1b[K")) or not before, repr(out[max(0, i - 80) : i + 40])


def test_ctrl_c_in_the_terminal_saves_and_the_run_continues_on_one_worker(tmp_path):
    """The README's resume example as a user does it: the default config in a terminal, a real Ctrl-C (the terminal
    signals the whole foreground process group: launcher, fork server, workers), then `orchestrator resume` on 1."""
    run = tmp_path / "run"
    term = TerminalLaunch("configs/quickstart.yaml", "--nproc", "2", f"run.dir={run}", *LONG)
    _wait_for(lambda: len(_committed(run)) >= 2, term.alive, "second checkpoint")
    at_stop = max(int(name.split("-")[1]) for name in _committed(run))
    os.write(term.master, b"\x03")  # Ctrl-C, through the terminal's line discipline
    deadline = time.monotonic() + 60
    while term.alive():
        assert time.monotonic() < deadline, "the launch did not stop"
        time.sleep(0.05)
    assert term.proc.returncode == 0, term.text()[-2000:]
    log = (run / "logs" / "rank-0.log").read_text()
    saved = int(log.split("all ranks saved step ")[1].split()[0])
    assert "stop requested (SIGINT during step" in log and "second stop request" not in term.text()
    assert at_stop < saved and f"step-{saved:08d}" in _committed(run)
    proc = subprocess.run(
        [sys.executable, "-m", "orchestrator", "resume", str(run), "--nproc", "1", f"train.max_steps={saved + 50}"],
        env=env(), cwd=ROOT, capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert f"step {saved}," in proc.stderr and "saved at world size 2, now 1" in proc.stderr, proc.stderr
