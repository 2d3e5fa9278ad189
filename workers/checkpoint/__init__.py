"""Checkpoints: the manager that saves and restores a run's state (``manager``), the on-disk format (``manifest``:
verify, find the newest valid, the train state), weight loading and wrapper-prefix stripping (``weights``),
compatibility checks (``compat``), durable writes (``files``), the sharded path (``sharded``, ``dcp_io``) and
optimizer state by parameter name (``optim_state``).

The layout of one checkpoint and the commit protocol are described in ``workers.checkpoint.manifest``.
"""

from workers.checkpoint.manager import Checkpointer
from workers.checkpoint.manifest import find_latest_valid, read_train_state, verify
from workers.checkpoint.restore import ResumeChoice, choose_resume_point
from workers.checkpoint.states import HeldState, OptimizerState, SavePlan
from workers.checkpoint.weights import (
    first_mismatch,
    load_full_weights,
    load_weights,
    locate_weights,
    read_located,
    strip_wrapper_prefixes,
    unwrap,
)

__all__ = [
    "Checkpointer", "HeldState", "OptimizerState", "ResumeChoice", "SavePlan", "choose_resume_point",
    "find_latest_valid",
    "first_mismatch", "load_full_weights", "load_weights", "locate_weights", "read_located", "read_train_state",
    "strip_wrapper_prefixes", "unwrap", "verify",
]  # fmt: skip
