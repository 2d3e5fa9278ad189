"""The typed errors of the project. Base layer: torch-free, imports nothing of the project.

Two families, told apart by what a restart can do about them:

- :class:`UsageError` and its subclasses: the user must change something (the config, the command line, the run
  dir, the cluster request). Reported as one line, exit code 2, never retried.
- :class:`CheckpointError`: a checkpoint or weights file that cannot be used. Never retried either (a restart would
  read the same file); a broken *committed* checkpoint found at resume is set aside instead of raising.
"""

from __future__ import annotations


class UsageError(ValueError):
    """Something the user must fix: one line, exit code 2, never retried."""


class ConfigError(UsageError):
    """A bad config value or command line: the message names the key, the value and a HINT."""


class RunDirLockedError(UsageError):
    """Another launch holds the run dir's lock."""


class ClusterRefusedError(UsageError):
    """The cluster refused the request (sbatch said no, SLURM is missing, the run dir already has a live job)."""


class IncompatibleCheckpointError(UsageError):
    """A checkpoint that is sound but does not fit this run (another architecture, other parameters or groups)."""


class CheckpointError(RuntimeError):
    """A checkpoint or weights file that cannot be used; the message names the path."""


class UnsafeCheckpointError(CheckpointError, UsageError):
    """A checkpoint or weights file that holds pickled code or objects beyond what its format allows (a payload
    whose checksums match: forged, never the trace of a crash): refused, never run. A usage error too — exit 2, one
    line, the run dir left as it was: someone must look at who wrote it; no restart or older checkpoint hides it."""


class NonFiniteError(RuntimeError):
    """Training produced NaN/inf (gradients, or a buffer that was finite, past ``train.max_nonfinite`` skips; weights
    or such a buffer at a save; a learning rate). Every rank raises it at the same step (the decision rests on
    all-reduced values, or on the schedule every rank steps alike); never retried: an exact resume would reproduce
    it. The message names the step, the last good checkpoint and what is not finite; for a step's gradients or
    buffers, also its samples' global stream positions; for a learning rate, what set it (not the data)."""
