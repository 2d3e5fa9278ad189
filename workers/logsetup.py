"""Logging of a worker process (and of its helper processes): rank-prefixed lines to the rank's log file,
rank 0's also to the console. Torch-free; imports only the run dir's layout."""

from __future__ import annotations

import logging
import sys

from workers.rundir import RunDir


def setup_logging(paths: RunDir, rank: int) -> None:
    """Rank-prefixed lines to ``RunDir.rank_log(rank)``; rank 0 also to the console (stderr)."""
    fmt = logging.Formatter(f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
    root = logging.getLogger()
    root.handlers.clear()
    root.setLevel(logging.INFO)
    paths.logs.mkdir(parents=True, exist_ok=True)
    handler: logging.Handler = logging.FileHandler(paths.rank_log(rank))
    handler.setFormatter(fmt)
    root.addHandler(handler)
    if rank == 0:
        console = logging.StreamHandler(sys.stderr)
        console.setFormatter(fmt)
        root.addHandler(console)
