"""Rank 0's half of every save, whichever strategy gathered the state: write the files into a temporary folder,
the manifest last, fsync, rename into place, move ``latest``, then ``best`` and retention. Also the clean-up of
what killed saves leave behind. (Every rank writes its own shards into the temporary folder first, in a sharded
save; at a resume, workers.checkpoint.restore sets broken folders aside and moves ``latest`` back.)"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from workers.checkpoint.files import save_torch_files, set_aside
from workers.checkpoint.manifest import FORMAT_VERSION
from workers.checkpoint.states import SavePlan
from workers.contract import TrainState
from workers.fsutil import atomic_write, fsync_dir, write_durable
from workers.rundir import MANIFEST_FILE, MODEL_FILE, OPTIM_FILE, STATE_FILE, RunDir

log = logging.getLogger("workers.checkpoint")


@dataclass(frozen=True)
class Payload:
    """What one checkpoint holds, as host-side objects ready to serialise (rank 0's)."""

    step: int
    model: dict[str, torch.Tensor] | None  # None: a sharded checkpoint without the exported model.pt
    rest: dict[str, Any]  # optim.pt: optimizer / scheduler / scaler state dicts
    train_state: TrainState
    plan: SavePlan


class Committer:
    """Rank 0's commits into ``paths.checkpoints``. ``extra_files`` are written into every checkpoint (the resolved
    config); ``sharded_world_size`` (a sharded run) is recorded in the manifest beside ``parallel: fsdp``."""

    KEEP_SET_ASIDE = 3  # broken folders kept for `ckpt inspect`; older ones are deleted (they would pile up)

    def __init__(
        self, paths: RunDir, keep: int, extra_files: dict[str, bytes], sharded_world_size: int | None = None
    ) -> None:
        self.paths, self.keep, self.extra_files = paths, keep, extra_files
        self.sharded_world_size = sharded_world_size

    def fresh_tmp(self, target: Path, tmp_id: str) -> Path:
        """An empty temporary folder for ``target`` (a leftover of the same name is removed)."""
        self.paths.checkpoints.mkdir(parents=True, exist_ok=True)
        tmp = self.tmp_for(target, tmp_id)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        return tmp

    def tmp_for(self, target: Path, tmp_id: str) -> Path:
        return self.paths.checkpoints / f".tmp-{target.name}-{tmp_id}"

    def commit(self, target: Path, tmp: Path, payload: Payload, files: dict[str, Any]) -> None:
        """Write rank 0's files into ``tmp`` (``files``: entries of what other ranks wrote there already), the
        manifest last, fsync, rename into place, update ``latest``. A failed write removes ``tmp`` (older
        checkpoints are untouched). :meth:`after_commit` follows once the commit is known on every rank."""
        try:
            objects = {MODEL_FILE: payload.model, OPTIM_FILE: payload.rest}
            files.update(save_torch_files(tmp, {name: obj for name, obj in objects.items() if obj is not None}))
            files[STATE_FILE] = write_durable(tmp / STATE_FILE, payload.train_state.to_json().encode())
            files.update({name: write_durable(tmp / name, data) for name, data in self.extra_files.items()})
            # The manifest goes last: its presence (and matching hashes) is what makes the folder count.
            manifest: dict[str, Any] = {"format": FORMAT_VERSION, "step": payload.step, "files": files}
            if self.sharded_world_size is not None:
                manifest.update(parallel="fsdp", world_size=self.sharded_world_size)
            write_durable(tmp / MANIFEST_FILE, json.dumps(manifest, indent=1).encode())
            fsync_dir(tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)  # a failed save leaves nothing half-written behind
            raise
        if target.exists():  # an uncommitted leftover at this step: keep it aside, lose nothing
            set_aside(target)
        os.rename(tmp, target)
        fsync_dir(self.paths.checkpoints)
        atomic_write(self.paths.latest, target.name + "\n")

    def after_commit(self, payload: Payload) -> None:
        """After a commit: ``best``, then retention (``best`` never names a deleted folder)."""
        plan = payload.plan
        best = self.paths.step_dir(plan.best_step) if plan.best_step is not None else None
        if best is not None and best.is_dir() and self.paths.best_name() != best.name:
            atomic_write(self.paths.best, best.name + "\n")
        self._apply_retention(payload.step, plan.keep_also)

    def _apply_retention(self, newest: int, keep_also: frozenset[int] = frozenset()) -> None:
        """Keep the newest ``keep`` committed checkpoints up to ``newest`` and those in ``keep_also``; never touch
        uncommitted folders."""
        committed = [(s, f) for s, f in self.paths.committed_folders() if s <= newest]
        for _, folder in [(s, f) for s, f in committed[self.keep :] if s not in keep_also]:
            if self.paths.best_name() == folder.name:  # no plan protects it now (selection started afresh, or off)
                log.warning("%s named %s, which retention now deletes: it is unset", self.paths.best, folder.name)
                self.paths.best.unlink(missing_ok=True)
            # Rename first: a kill in the middle of the delete leaves a .trash- folder, never a half step- one.
            trash = folder.with_name(f".trash-{folder.name}-{os.getpid()}")
            os.rename(folder, trash)
            shutil.rmtree(trash, ignore_errors=True)

    def prune_set_aside(self) -> None:
        """Keep the newest few set-aside folders, delete the others (saying so)."""
        for folder in self.paths.set_aside_folders()[: -self.KEEP_SET_ASIDE]:
            log.warning(
                "deleting old set-aside checkpoint %s (keeping the newest %d)", folder.name, self.KEEP_SET_ASIDE
            )
            shutil.rmtree(folder, ignore_errors=True)

    def clean_stale_temporaries(self) -> None:
        """Remove what killed saves left behind (``.tmp-*``, ``.trash-*``)."""
        if self.paths.checkpoints.is_dir():
            for path in [*self.paths.checkpoints.glob(".tmp-*"), *self.paths.checkpoints.glob(".trash-*")]:
                shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
