"""The checkpoint manager: handed what it saves when it is built (the model, the optimizer state, the trainer's
progress — workers.checkpoint.states), it saves a step, chooses the resume point and restores. How a save gathers
and writes is its strategy (workers.checkpoint.writes, .sharded); the on-disk layout is workers.checkpoint.manifest.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from workers.checkpoint.commit import Committer
from workers.checkpoint.restore import ResumeChoice, choose_resume_point, load_checkpoint
from workers.checkpoint.sharded import ShardedWrites
from workers.checkpoint.states import OptimizerState, Progress
from workers.checkpoint.weights import unwrap
from workers.checkpoint.writes import FullWrites
from workers.contract import TrainState
from workers.dist import DistContext
from workers.rundir import RunDir


class Checkpointer:
    """Saves and restores one process's training state under the run's checkpoints folder. Built on every rank.

    Saves are collective and commit atomically: everything is written into a temporary folder, the manifest last,
    fsynced, renamed into place, then ``latest`` moves. With ``async_save`` a save blocks training only while the
    state is copied to host memory (and, if the previous save is still being written, until it is: at most one
    save is in flight); a background thread writes and commits it. ``sharded`` (``train.parallel: fsdp``): every
    rank writes its shards (DCP), rank 0 the rest.
    """

    def __init__(
        self,
        paths: RunDir,
        ctx: DistContext,
        *,
        model: nn.Module,
        optim: OptimizerState,
        progress: Progress,
        keep: int = 2,
        async_save: bool = False,
        extra_files: dict[str, bytes] | None = None,
        sharded: bool = False,
    ) -> None:
        """``model``: the model (wrappers are peeled); ``optim``: its optimizer, scheduler and scaler;
        ``progress``: the trainer's state (:class:`~workers.checkpoint.states.Progress`); ``keep``: committed
        checkpoints kept besides the protected ones; ``extra_files``: written into every checkpoint (the resolved
        config: each checkpoint knows how it was made)."""
        self.paths, self.ctx, self.progress = paths, ctx, progress
        self.model, self.optim = unwrap(model), optim
        self.committer = Committer(paths, keep, extra_files or {}, ctx.world_size if sharded else None)
        strategy = ShardedWrites if sharded else FullWrites
        self.writes = strategy(ctx, self.committer, self.model, optim, async_save)

    @property
    def last_commit_s(self) -> float:
        """How long the last committed save took to write (rank 0; async: in the background)."""
        return self.writes.last_commit_s

    def save(self, step: int, blocking: bool = True) -> Path:
        """Save ``step``. Collective: every rank calls it at the same step; returns the checkpoint's folder.

        Blocking (every final and stop save): when it returns, the checkpoint is committed on every rank's view.
        Non-blocking (only with ``async_save``): the commit happens in the background; its failure is raised by the
        next save, :meth:`wait` or :meth:`close`. After a commit, checkpoints beyond ``keep`` are deleted except the
        plan's protected steps, and ``checkpoints/best`` names the plan's best step (workers.checkpoint.states); a
        ``best`` whose folder retention deletes is unset.
        """
        state = self.progress.state_dict()
        if state.step != step:
            raise ValueError(f"save({step}) but the trainer's state is at step {state.step}")
        target = self.paths.step_dir(step)
        self.writes.save(target, state, self.progress.save_plan(), blocking)
        return target

    def wait(self) -> None:
        """Wait for the in-flight background save, if any; re-raise its error in the training thread."""
        self.writes.wait()

    def close(self) -> None:
        """Finish any in-flight save and stop the background thread (call before the process exits)."""
        self.writes.close()

    def clean_stale_temporaries(self) -> None:
        """Remove what killed saves left behind (``.tmp-*``, ``.trash-*``). Rank 0, before training."""
        if self.ctx.is_main:
            self.committer.clean_stale_temporaries()

    def resume_point(self) -> ResumeChoice:
        """Where this start resumes from, the same on every rank (collective; see ``choose_resume_point``)."""
        return choose_resume_point(self.paths, self.ctx, self.committer)

    def restore(self, folder: Path, saved: TrainState | None = None) -> TrainState:
        """Load ``folder`` into the model and the optimizer state, then hand its train state to the progress.
        Collective for a sharded checkpoint in a distributed run."""
        state = load_checkpoint(folder, self.model, self.optim, self.ctx, saved)
        self.progress.load_state_dict(state)
        return state
