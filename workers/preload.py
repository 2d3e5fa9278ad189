"""What the local launcher's fork server imports once, so that every worker it forks starts with torch and the
trainer already loaded (``multiprocessing``'s forkserver preload). Imported there and nowhere else.

The fork server lives as long as the launcher and belongs to its process group: the stop signals that reach the
whole group (a terminal's Ctrl-C, ``timeout``, ``kill -TERM -PGID``) must not end it — the launcher relays them
to the workers itself, and a dead server would take its workers with it. Its workers inherit the ignored
dispositions only until :class:`~workers.stop.StopFlag` installs its handlers, their first statement.
"""

import atexit
import os

from workers.stop import ignore_stop_signals

ignore_stop_signals()


def _leave_at_once(server_pid: int = os.getpid()) -> None:
    """The server's own exit (its launcher is gone): skip tearing down torch's modules, ~1 s of a CPU — it holds
    the launcher's stdout and stderr, so whoever reads them (a pipe, ``| tee``, CI) would wait for it. Its workers
    never run this: a forked worker always ends through ``os._exit``."""
    if os.getpid() == server_pid:
        os._exit(0)


atexit.register(_leave_at_once)

import torch  # noqa: E402 - the slow import every worker needs, paid once per launch
import torch._dynamo  # noqa: E402 - torch.optim's optimizers import it lazily on construction (~0.8 s)
import torch.distributed.checkpoint  # noqa: E402 - train.parallel=fsdp's checkpoints
import torch.distributed.fsdp  # noqa: E402, F401

import workers.entry  # noqa: E402
import workers.train.trainer  # noqa: E402, F401
