"""Resume: rank 0 chooses the checkpoint (the newest valid one, broken newer ones set aside) and every rank gets
the same :class:`ResumeChoice`; then each rank loads it into its model and optimizer, whatever the kind of the
checkpoint (full or sharded) and of the run (ddp or fsdp) and the world sizes of both."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from workers.checkpoint import dcp_io
from workers.checkpoint.commit import Committer
from workers.checkpoint.compat import check_model_fits, load_full_model
from workers.checkpoint.dcp_io import DCP_DIR, MODEL_PREFIX, OPTIM_PREFIX
from workers.checkpoint.files import set_aside
from workers.checkpoint.manifest import find_latest_valid, is_sharded_checkpoint, read_train_state
from workers.checkpoint.optim_state import join_tensors, tensor_keys
from workers.checkpoint.states import OptimizerState
from workers.checkpoint.weights import safe_load
from workers.contract import TrainState
from workers.dist import DistContext
from workers.errors import CheckpointError, UnsafeCheckpointError
from workers.fsutil import atomic_write
from workers.rundir import MODEL_FILE, OPTIM_FILE, RunDir, step_folders


@dataclass(frozen=True)
class ResumeChoice:
    """Where a start resumes from, as rank 0 decided it and every rank received it. ``folder``: the newest valid
    checkpoint, or None for a fresh start; ``refusal``: why the run must not start at all (then ``unsafe`` tells a
    forged checkpoint, a usage error, from checkpoints that are all broken)."""

    folder: Path | None = None
    refusal: str | None = None
    unsafe: bool = False

    def resolved(self) -> Path | None:
        """The folder to resume from (None: start fresh); raises the refusal on every rank alike."""
        if self.refusal is not None:
            raise (UnsafeCheckpointError if self.unsafe else CheckpointError)(self.refusal)
        return self.folder


def choose_resume_point(paths: RunDir, ctx: DistContext, committer: Committer) -> ResumeChoice:
    """Rank 0 picks the newest valid checkpoint and every rank gets the same answer. Collective.

    Broken checkpoints newer than it are set aside (renamed ``*.invalid-*``, not deleted) so they are neither
    retried at every start nor counted by retention. An unsafe one (a pickle payload) refuses the start: every rank
    must learn it, none may be left waiting in the broadcast."""
    choice = ResumeChoice()
    if ctx.is_main:
        try:
            choice = _choose(paths, committer)
        except OSError as exc:  # (setting a folder aside, moving latest): every rank must learn it, too
            choice = ResumeChoice(refusal=f"cannot choose the resume point in '{paths.checkpoints}': {exc}")
    return ctx.broadcast_object(choice)


def _choose(paths: RunDir, committer: Committer) -> ResumeChoice:
    folders = step_folders(paths.checkpoints)
    try:
        found = find_latest_valid(paths.checkpoints)
    except CheckpointError as exc:
        return ResumeChoice(refusal=str(exc), unsafe=True)
    if found is None:
        if not folders:
            return ResumeChoice()
        return ResumeChoice(
            refusal=f"'{paths.checkpoints}' holds checkpoints but none is valid; refusing to start from scratch over "
            "them. HINT: `orchestrator ckpt inspect` shows why; move them away or use a new run.dir"
        )
    newer = [f for _, f in folders if f.name > found.name]
    for folder in newer:
        set_aside(folder)
    committer.prune_set_aside()
    if newer or paths.latest_name() != found.name:
        atomic_write(paths.latest, found.name + "\n")  # never name a set-aside folder
    return ResumeChoice(folder=found)


def load_checkpoint(
    folder: Path, model: nn.Module, optim: OptimizerState, ctx: DistContext, saved: TrainState | None = None
) -> TrainState:
    """Restore ``model`` (bare) and ``optim`` from ``folder``; return its train state. Collective when the
    checkpoint is sharded and the run distributed (every rank reads what its layout needs)."""
    saved = saved or read_train_state(folder)
    rest = safe_load(folder / OPTIM_FILE)  # an unsafe or corrupt file: CheckpointError, not a config error
    optim.check_fits(folder, rest, saved.optimizer)
    if is_sharded_checkpoint(folder):
        named = _load_shards(folder, model, rest["optimizer"], ctx.distributed)
    else:
        load_full_model(folder, model, safe_load(folder / MODEL_FILE))
        named = rest["optimizer"]
    optim.load_state_dict({**rest, "optimizer": named}, folder)
    return saved


def _load_shards(folder: Path, bare: nn.Module, entry: Mapping[str, Any], distributed: bool) -> dict[str, Any]:
    """Load a sharded checkpoint's model into ``bare`` (in place, resharded to its layout) and return the named
    optimizer entry with its tensors."""
    where = str(folder / DCP_DIR)
    metadata = dcp_io.read_metadata(folder / DCP_DIR)  # restricted; verify() checked its checksum first
    shapes = dcp_io.tensor_shapes(metadata, MODEL_PREFIX)
    check_model_fits(folder, bare, {k: torch.empty(s, dtype=d, device="meta") for k, (s, d) in shapes.items()})
    model_sd = bare.state_dict()
    targets = {MODEL_PREFIX + k: v for k, v in model_sd.items() if isinstance(v, torch.Tensor)}
    optim_shapes = dcp_io.tensor_shapes(metadata, OPTIM_PREFIX)
    params = dict(bare.named_parameters())
    for name, keys in tensor_keys(where, entry).items():
        for key in keys:
            if f"{name}/{key}" not in optim_shapes:
                raise CheckpointError(f"'{where}' lacks the optimizer's {key!r} of {name!r}")
            size, dtype = optim_shapes[f"{name}/{key}"]
            p = params.get(name)
            same = p is not None and tuple(p.shape) == tuple(size)  # laid out like its parameter (sharded too)
            targets[f"{OPTIM_PREFIX}{name}/{key}"] = (
                torch.empty_like(p, dtype=dtype) if same else torch.empty(size, dtype=dtype)
            )
    dcp_io.load(targets, folder / DCP_DIR, distributed=distributed)
    bare.load_state_dict(model_sd, strict=True)  # filled in place; this runs the wrappers' load hooks too
    tensors = {k[len(OPTIM_PREFIX) :]: v for k, v in targets.items() if k.startswith(OPTIM_PREFIX)}
    return join_tensors(where, entry, tensors)
