"""Tracking: the run's metrics file (``metrics_file``), wandb in a child process (``wandb_run``) and reading its
offline records (``wandb_records``), the sinks behind one call (``tracker``), per-step reporting (``reporting``)
and the background exchange of log values and stop requests (``stepsync``).

Importing this package loads no torch: the launcher's read-only commands use it."""

from workers.tracking.metrics_file import read_metrics, read_run_id, run_id
from workers.tracking.tracker import Tracker

__all__ = ["Tracker", "read_metrics", "read_run_id", "run_id"]
