"""Logging of a worker process (and of its helper processes): rank-prefixed lines to the rank's log file,
rank 0's also to the console. Torch-free; imports only the run dir's layout."""

from __future__ import annotations

import faulthandler
import logging
import sys

from workers.contract import STACKS_SIGNAL
from workers.rundir import RunDir

# ``log.error(..., extra=FILE_ONLY)``: for the rank's log file alone (a traceback the console report leaves out);
# ``extra=CONSOLE_ONLY``: for the console alone (the file has the fuller line).
FILE_ONLY = {"destination": "file"}
CONSOLE_ONLY = {"destination": "console"}


class _To(logging.Filter):
    """Passes the records for this destination, and every record that names none."""

    def __init__(self, destination: str) -> None:
        super().__init__()
        self.destination = destination

    def filter(self, record: logging.LogRecord) -> bool:
        return getattr(record, "destination", self.destination) == self.destination


class _RankLogFile(logging.FileHandler):
    """The rank's log file. A record that cannot be written (a full or read-only disk) is dropped without a word:
    logging's default prints a traceback of its own to the console, and the failure it would log reaches the
    console once anyway (the launcher's report, over the worker's pipe)."""

    def handleError(self, record: logging.LogRecord) -> None:
        return


def setup_logging(paths: RunDir, rank: int) -> None:
    """Rank-prefixed lines to ``RunDir.rank_log(rank)``; rank 0 also to the console (stderr). A record marked
    ``FILE_ONLY`` or ``CONSOLE_ONLY`` goes to that one only; a known failure's line to the console comes from any
    rank (ranks other than 0 are otherwise quiet there)."""
    fmt = logging.Formatter(f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
    root = logging.getLogger()
    root.handlers.clear()
    root.setLevel(logging.INFO)
    paths.logs.mkdir(parents=True, exist_ok=True)
    handler: logging.Handler = _RankLogFile(paths.rank_log(rank))
    handler.setFormatter(fmt)
    handler.addFilter(_To("file"))
    root.addHandler(handler)
    if rank == 0:
        console = logging.StreamHandler(sys.stderr)
        console.setFormatter(fmt)
        console.addFilter(_To("console"))
        root.addHandler(console)


_DUMP_FILES: list = []  # the open dump files (faulthandler writes to their descriptors; they stay open)


def register_stack_dumps(paths: RunDir, rank: int) -> None:
    """On the stacks signal (workers.contract.STACKS_SIGNAL), write every thread's Python stack to
    ``RunDir.faulthandler_file(rank)``: the launcher's fallback where py-spy cannot read this process. Best effort
    (a read-only run dir: no fallback)."""
    try:
        dump = open(paths.faulthandler_file(rank), "w")  # noqa: SIM115 - open for the process's life
    except OSError:
        return
    _DUMP_FILES.append(dump)
    faulthandler.register(STACKS_SIGNAL, file=dump, all_threads=True, chain=False)
