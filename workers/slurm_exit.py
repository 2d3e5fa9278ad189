"""``python -m workers.slurm_exit RUN_DIR STATUS`` — run by a submitted job's batch script after its job step, with
the step's exit status: a failure no rank reported requeues the job (:func:`workers.slurm_job.on_exit`), leaving out
a node that failed twice. The batch script ignores SIGTERM by then: the requeue's own SIGTERM must not end this.
Torch-free: it runs once per job, on the batch host, in a second."""

from __future__ import annotations

import logging
import sys

from workers.config import ConfigError, load_config
from workers.rundir import RunDir
from workers.slurm_job import on_exit


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s [slurm-exit] %(levelname)s: %(message)s")
    if len(argv) != 2:
        print("usage: python -m workers.slurm_exit RUN_DIR STATUS", file=sys.stderr)
        return 2
    paths = RunDir(argv[0])
    try:
        status = int(argv[1])
        cfg = load_config(str(paths.config))
    except (ValueError, OSError, ConfigError) as exc:
        print(f"workers.slurm_exit: {exc}", file=sys.stderr)
        return 2
    on_exit(cfg, paths, status)
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
