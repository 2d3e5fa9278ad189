"""The audit trail of consumed samples (``data.record_indices``): each rank appends the sample indices it
consumed to its samples file (``RunDir``), one JSON line per micro-step.
"""

from __future__ import annotations

import json
import time

import torch

from workers.dist import DistContext
from workers.rundir import RunDir


class IndexRecorder:
    """Audit trail: each rank appends the sample indices it consumed to its samples file (``RunDir``)."""

    def __init__(self, paths: RunDir, ctx: DistContext, start_step: int) -> None:
        self.ctx = ctx
        paths.samples.mkdir(parents=True, exist_ok=True)
        self.file = open(paths.samples_file(ctx.rank), "a", buffering=1)  # noqa: SIM115
        # One id per launch, identical on all ranks, so a reader can tell attempts apart.
        self.attempt = ctx.broadcast_object(f"{time.time_ns()}-{start_step}")

    def record(self, step: int, micro: int, indices: torch.Tensor) -> None:
        self.file.write(
            json.dumps(
                {
                    "attempt": self.attempt,
                    "step": step,
                    "micro": micro,
                    "rank": self.ctx.rank,
                    "world_size": self.ctx.world_size,
                    "indices": indices.tolist(),
                }
            )
            + "\n"
        )

    def close(self) -> None:
        """Close the samples file (each line is already written: the file is line-buffered)."""
        self.file.close()
