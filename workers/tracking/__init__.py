"""Tracking: the run's metrics file (``metrics_file``), wandb in a child process (``wandb_run``) and reading its
offline records (``wandb_records``), the sinks behind one call (``tracker``), per-step reporting (``reporting``),
the background exchange of log values and stop requests (``stepsync``), one start's reporting behind one call per
step (``session``), the straggler rule (``straggler``) and tokens/s and MFU (``throughput``).

Importing this package loads no torch: the launcher's read-only commands use it."""

from workers.tracking.metrics_file import read_metrics, read_run_id, run_id
from workers.tracking.tracker import Tracker

__all__ = ["Tracker", "read_metrics", "read_run_id", "run_id"]
