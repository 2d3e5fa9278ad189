"""The sharded save (``train.parallel: fsdp``): every rank writes its own shards of the model and the optimizer as
one DCP checkpoint under ``dcp/`` (workers.checkpoint.dcp_io), fsyncs and checksums its files and reports them to
rank 0, which writes the rest (``optim.pt`` without tensors, the train state, the exported ``model.pt``) and the
manifest covering every file. Every collective runs on a gloo group of the checkpoint's own, never on training's,
so a background save never races training's collectives."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from workers.checkpoint import dcp_io
from workers.checkpoint.commit import Payload
from workers.checkpoint.dcp_io import DCP_DIR, MODEL_PREFIX, OPTIM_PREFIX
from workers.checkpoint.files import snapshot, write_error
from workers.checkpoint.optim_state import split_tensors
from workers.checkpoint.states import SavePlan
from workers.checkpoint.writes import Writes
from workers.contract import TrainState
from workers.errors import CheckpointError
from workers.fsutil import NEW_DIGEST, file_digest, fsync_dir
from workers.parallel import all_gather_objects, checkpoint_group, full_model_state, is_sharded, staged


class ShardedWrites(Writes):
    """All ranks, in the training thread: gather what is to be written (the exported full model is an all-gather),
    then write now or — ``async_save`` — stage the shards to host memory (still in the training thread: the live
    tensors change with the next step) and hand them to this rank's background thread."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._group: Any = None  # the checkpoint process group and the temporary folder's id, made at the first
        self._tmp_id: str | None = None  # save (collectively)

    def save(self, target: Path, train_state: TrainState, plan: SavePlan, blocking: bool) -> None:
        self.wait()  # at most one save in flight, on every rank alike
        if self._tmp_id is None:  # one id for the temporary folders of this launch, the same on every rank
            self._group = checkpoint_group(self.ctx)
            self._tmp_id = str(self.ctx.broadcast_object(f"{os.getpid()}"))
        meta, optim_tensors = split_tensors(self.optim.named_optimizer())
        flat = {MODEL_PREFIX + k: v for k, v in self.model.state_dict().items()}
        flat.update({OPTIM_PREFIX + k: v for k, v in optim_tensors.items()})
        full = full_model_state(self.model, self.ctx) if plan.export_model else None  # collective
        rest = self.optim.state_dict(optimizer=meta) if self.ctx.is_main else {}  # (scheduler, scaler: rank 0's)
        if self.use_async(blocking):  # copies now: the live tensors change with the next step
            flat, rest = staged(flat), snapshot(rest)
            if full is not None and not is_sharded(self.model):
                full = snapshot(full)  # unsharded, the "full" state is the live tensors
        payload = Payload(train_state.step, full if self.ctx.is_main else None, rest, train_state, plan)
        if self.use_async(blocking):
            self.submit(self._commit, target, flat, payload)
        else:
            self._commit(target, flat, payload)

    def _commit(self, target: Path, flat: dict[str, torch.Tensor], payload: Payload) -> None:
        """All ranks (training thread, or each rank's background thread): DCP writes every rank's shards into the
        temporary folder; each rank fsyncs and checksums its own files and all report to rank 0, which writes the
        rest and commits. Ends with every rank knowing whether the commit happened (a failure on one raises on all).
        """
        t0 = time.perf_counter()
        tmp = self.committer.tmp_for(target, str(self._tmp_id))
        entries, problem = self._write_shards(target, tmp, flat)
        reports = all_gather_objects((entries, problem), self._group)
        problem = next((p for _, p in reports if p), None)
        if self.ctx.is_main:
            if problem is None:
                files = {name: e for ents, _ in reports for name, e in ents.items()}
                problem = self._commit_rest(target, tmp, payload, files)
            if problem is not None:
                shutil.rmtree(tmp, ignore_errors=True)
        problem = all_gather_objects(problem, self._group)[0]  # rank 0's verdict, on every rank
        if problem is not None:
            raise CheckpointError(problem)
        if self.ctx.is_main:
            self.committer.after_commit(payload)
        self.last_commit_s = time.perf_counter() - t0

    def _write_shards(
        self, target: Path, tmp: Path, flat: dict[str, torch.Tensor]
    ) -> tuple[dict[str, Any], str | None]:
        """This rank's shard files in ``tmp`` (manifest entries), or the problem that stopped the write. Every rank
        enters DCP's collectives or none does: a rank that could not even make the folder must not leave the others
        waiting inside dcp.save."""
        problem: str | None = None
        try:
            (tmp / DCP_DIR).mkdir(parents=True, exist_ok=True)  # every rank: no one removes what another wrote
        except OSError as exc:
            problem = str(write_error(target, exc))
        problem = next((p for p in all_gather_objects(problem, self._group) if p), None)
        if problem is not None:
            return {}, problem
        try:
            dcp_io.save(flat, tmp / DCP_DIR, self._group)  # collective; a failure on one raises on all
            mine = dcp_io.own_files(tmp / DCP_DIR, self.ctx.rank)
            dcp_io.fsync_files(mine)
            return {f"{DCP_DIR}/{p.name}": {"size": p.stat().st_size, NEW_DIGEST: file_digest(p)} for p in mine}, None
        except OSError as exc:
            return {}, str(write_error(target, exc))
        except Exception as exc:  # DCP wraps a rank's OSError (disk full) in its CheckpointException
            cause = dcp_io.find_os_error(exc)
            return {}, str(write_error(target, cause)) if cause else f"cannot write checkpoint {target.name}: {exc}"

    def _commit_rest(self, target: Path, tmp: Path, payload: Payload, files: dict[str, Any]) -> str | None:
        """Rank 0: the rest of the files and the commit; the problem, if any (the other ranks wait for a verdict:
        anything raised here must become one)."""
        try:
            fsync_dir(tmp / DCP_DIR)
            self.committer.commit(target, tmp, payload, files)
        except OSError as exc:
            return str(write_error(target, exc))
        except Exception as exc:
            return f"cannot write checkpoint {target.name}: {type(exc).__name__}: {exc}"
        return None
