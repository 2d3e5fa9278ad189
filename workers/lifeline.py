"""A local worker's ties to its launcher, so that it can never outlive it — however the launcher ended (SIGKILL,
the OOM killer, a closed terminal) and however it was started (a terminal, ``nohup``, ``setsid``, a script).

Three ties, each enough on its own, made by the launcher and kept by each worker (torch-free: a worker keeps them
first thing):

- The lifeline: the read end of a pipe whose only write end the launcher holds (close-on-exec, handed to no one).
  A thread of the worker blocks on it; end of file means the launcher is gone, and the worker SIGKILLs its own
  process tree (its loader workers) and itself at once. No polling, no pid that could be reused.
- The run dir's lock: the worker holds the launcher's locked open file, so the ``flock`` stays held until the
  last process of the launch is gone: a new launch can never take the run dir while a worker of a dead one could
  still commit a checkpoint into it.
- The fork server: a forked worker inherits the write end of the server's "alive" pipe (multiprocessing passes it
  on so a child could use the server too). While any worker held it, the server never saw its launcher's death,
  and the workers (``PR_SET_PDEATHSIG`` on the server) never saw the server's: the worker closes it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from dataclasses import dataclass
from typing import Any

import psutil


class SharedFd:
    """An open file descriptor handed to a child process of a multiprocessing context (picklable: the spawning
    machinery duplicates the descriptor into the child). In the child, ``fd`` is its own copy, kept open for the
    process's life unless closed."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def __reduce__(self) -> tuple[Any, ...]:
        from multiprocessing import reduction  # noqa: PLC0415 - only while a process is being started

        return _rebuild_shared_fd, (reduction.DupFd(self.fd),)


def _rebuild_shared_fd(dup: Any) -> SharedFd:
    return SharedFd(dup.detach())


@dataclass(frozen=True)
class Ties:
    """What the launcher hands each worker: the lifeline's read end and, for a training launch, its locked run-dir
    lock file (None for ``orchestrator eval``, which holds no run dir)."""

    lifeline: SharedFd
    lock: SharedFd | None = None

    def keep(self) -> None:
        """In the worker, first thing: forget the fork server's alive pipe, hold the run dir's lock, and end this
        process (and its children) as soon as the launcher is gone."""
        forget_fork_server()
        _KEPT.append(self)  # the lock's fd is held, never read: its open file carries the launcher's flock
        threading.Thread(target=_watch, args=(self.lifeline.fd,), name="launcher-lifeline", daemon=True).start()


_KEPT: list[Ties] = []  # this process's ties, referenced for its whole life


def forget_fork_server() -> None:
    """Close this process's copy of the fork server's alive-pipe write end (see the module docstring). The process
    can no longer ask that server for children; nothing here does (loader workers are spawned)."""
    from multiprocessing import forkserver  # noqa: PLC0415

    server = getattr(forkserver, "_forkserver", None)
    fd = getattr(server, "_forkserver_alive_fd", None)
    if fd is None:
        return
    with contextlib.suppress(OSError):
        os.close(fd)
    server._forkserver_alive_fd = None
    # A later use of the fork server from here starts a server of this process's own instead of a dead address.
    server._forkserver_address = None


def _watch(fd: int) -> None:
    """Block until the launcher's end of the lifeline closes, then end this process tree at once."""
    while True:
        try:
            if not os.read(fd, 1):  # end of file: the launcher is gone (it never writes)
                break
        except InterruptedError:
            continue
        except OSError:
            break
    end_process_tree()


def end_process_tree() -> None:
    """SIGKILL this process's descendants, then this process. Nothing is saved: the launch is gone, and whatever
    this process would write could land in a run dir that a new launch owns."""
    with contextlib.suppress(psutil.Error):
        for child in psutil.Process().children(recursive=True):
            with contextlib.suppress(psutil.Error):
                child.kill()
    os.kill(os.getpid(), signal.SIGKILL)
