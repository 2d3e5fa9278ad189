"""The checkpoint manager: collective save (rank 0 writes, or every rank its shards), atomic commit,
retention, the resume point, and restore. The on-disk layout is in workers.checkpoint.manifest."""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from workers.checkpoint import dcp_io
from workers.checkpoint.compat import (
    check_model_fits,
    check_optimizer_fits,
    laid_out_like,
    load_full_model,
    schedule_kind,
)
from workers.checkpoint.dcp_io import DCP_DIR, MODEL_PREFIX, OPTIM_PREFIX
from workers.checkpoint.files import save_torch_files, set_aside, snapshot, write_error
from workers.checkpoint.manifest import FORMAT_VERSION, find_latest_valid, is_sharded_checkpoint, read_train_state
from workers.checkpoint.optim_state import (
    from_named,
    from_positions,
    is_named,
    join_tensors,
    split_tensors,
    tensor_keys,
    to_named,
)
from workers.checkpoint.weights import safe_load, unwrap
from workers.contract import TrainState, disk_trouble
from workers.dist import DistContext
from workers.errors import CheckpointError, IncompatibleCheckpointError
from workers.fsutil import NEW_DIGEST, atomic_write, file_digest, fsync_dir, write_durable
from workers.parallel import (
    all_gather_objects,
    checkpoint_group,
    full_model_state,
    is_sharded,
    staged,
)
from workers.rundir import MANIFEST_FILE, MODEL_FILE, OPTIM_FILE, STATE_FILE, RunDir, step_folders

log = logging.getLogger("workers.checkpoint")


# ---------------------------------------------------------------- unwrapping


# ---------------------------------------------------------------- writing


# ---------------------------------------------------------------- reading


# ---------------------------------------------------------------- the checkpointer


@dataclass
class CheckpointPayload:
    """What one checkpoint holds, as host-side objects ready to serialise."""

    step: int
    model: dict[str, torch.Tensor] | None  # None: a sharded checkpoint without the exported model.pt
    rest: dict[str, Any]  # optimizer / scheduler / scaler state dicts
    train_state: TrainState
    keep_also: frozenset[int] = frozenset()  # steps retention must not delete (the best checkpoints)
    best_step: int | None = None  # the folder ``checkpoints/best`` names after this commit


class Checkpointer:
    """Saves and restores training state under the run's checkpoints folder. One per process; see the module
    docstring.

    With ``async_save``, :meth:`save` blocks training only while rank 0 copies the state to host memory (and,
    if the previous save is still being written, until it is: at most one save is in flight); a background
    thread serialises, writes and commits it. No collective ever runs in that thread (only rank 0 writes) — except
    for a sharded (``parallel="fsdp"``) save, whose every rank writes its shard there and whose collectives run on
    a separate gloo group of their own (never on training's).
    """

    def __init__(
        self,
        paths: RunDir,
        ctx: DistContext,
        keep: int = 2,
        async_save: bool = False,
        extra_files: dict[str, bytes] | None = None,
        parallel: str = "ddp",
    ) -> None:
        self.paths, self.ctx, self.keep, self.async_save = paths, ctx, keep, async_save
        self.sharded = parallel == "fsdp"  # every rank writes its shards (DCP), rank 0 the rest
        self._group: Any = None  # fsdp: the checkpoint process group and the temporary folder's id, made at the
        self._tmp_id: str | None = None  # first save (collectively)
        self.extra_files = extra_files or {}  # e.g. the resolved config, saved in every checkpoint
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ckpt") if async_save else None
        self._in_flight: Future | None = None
        self.last_commit_s = 0.0  # how long the last committed save took to write (rank 0; async: background)

    def save(
        self,
        step: int,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
        scaler: Any,
        train_state: TrainState,
        blocking: bool = True,
        keep_also: frozenset[int] = frozenset(),
        best_step: int | None = None,
        export_model: bool = True,
    ) -> Path:
        """Collective: must be called on all ranks with the same arguments' step.

        Blocking (the default; also every final and stop save): rank 0 writes and commits, then all ranks pass a
        barrier, so when it returns the checkpoint is committed. Non-blocking (``async_save``): rank 0 snapshots
        the state to host memory and returns; the commit happens in the background (no barrier needed: the
        other ranks write nothing). Older checkpoints beyond ``keep`` are deleted only after a commit, except the
        steps in ``keep_also``; ``best_step`` (when its folder exists) is then named by ``checkpoints/best``.

        Sharded (``parallel="fsdp"``): every rank takes part in the write (its shards) and, non-blocking, stages
        its shards to host memory and writes them in its own background thread; ``export_model`` adds the full
        ``model.pt`` (gathered now, on all ranks).
        """
        target = self.paths.step_dir(step)
        if self.sharded:
            return self._save_sharded(target, model, optimizer, scheduler, scaler, train_state, blocking,
                                      CheckpointPayload(step, None, {}, train_state, keep_also, best_step),
                                      export_model)  # fmt: skip
        if self.ctx.is_main:
            self.wait()  # at most one save in flight; also surfaces a failed background write
            pin = self.ctx.device.type == "cuda"
            use_async = self._pool is not None and not blocking
            model_state = unwrap(model).state_dict()
            rest = {"optimizer": to_named(unwrap(model), optimizer), "scheduler": scheduler.state_dict(),
                    "scheduler_class": schedule_kind(scheduler), "scaler": scaler.state_dict()}  # fmt: skip
            if use_async:  # copy now: the live tensors change with the next step
                model_state, rest = snapshot(model_state, pin), snapshot(rest, pin)
            payload = CheckpointPayload(step, model_state, rest, train_state, keep_also, best_step)
            if use_async:
                if pin:
                    torch.cuda.current_stream().synchronize()  # the pinned copies must be complete
                self._in_flight = self._pool.submit(self._commit, target, payload)
            else:
                self._commit(target, payload)
        if blocking or self._pool is None:
            self.ctx.barrier()
        return target

    def wait(self) -> None:
        """Wait for the in-flight background save, if any; re-raise its error in the training thread."""
        if self._in_flight is not None:
            future, self._in_flight = self._in_flight, None
            future.result()

    def close(self) -> None:
        """Finish any in-flight save and stop the background thread (call before the process exits)."""
        try:
            self.wait()
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True)

    # ------------------------------------------------------------ sharded saves

    def _save_sharded(
        self,
        target: Path,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
        scaler: Any,
        train_state: TrainState,
        blocking: bool,
        payload: CheckpointPayload,
        export_model: bool,
    ) -> Path:
        """See :meth:`save`. All ranks, in the training thread: gather what is to be written (the full model is an
        all-gather), then write now or hand it to this rank's background thread."""
        self.wait()  # at most one save in flight, on every rank alike
        if self._tmp_id is None:  # one id for the temporary folders of this launch, the same on every rank
            self._group = checkpoint_group(self.ctx)
            self._tmp_id = str(self.ctx.broadcast_object(f"{os.getpid()}"))
        bare = unwrap(model)
        meta, optim_tensors = split_tensors(to_named(bare, optimizer))
        flat = {MODEL_PREFIX + k: v for k, v in bare.state_dict().items()}
        flat.update({OPTIM_PREFIX + k: v for k, v in optim_tensors.items()})
        use_async = self._pool is not None and not blocking
        full = full_model_state(bare, self.ctx) if export_model else None
        if self.ctx.is_main:
            payload.rest = {"optimizer": meta, "scheduler": scheduler.state_dict(),
                            "scheduler_class": schedule_kind(scheduler), "scaler": scaler.state_dict()}  # fmt: skip
            payload.model = full
        if use_async:  # copies now: the live tensors change with the next step
            flat, payload.rest = staged(flat), snapshot(payload.rest)
            if full is not None and not is_sharded(bare):
                payload.model = snapshot(full)  # unsharded, the "full" state is the live tensors
            self._in_flight = self._pool.submit(self._commit_sharded, target, flat, payload)
        else:
            self._commit_sharded(target, flat, payload)
        return target

    def _commit_sharded(self, target: Path, flat: dict[str, torch.Tensor], payload: CheckpointPayload) -> None:
        """All ranks (training thread, or each rank's background thread): DCP writes every rank's shards into the
        temporary folder; each rank fsyncs and checksums its own files and all report to rank 0, which writes the rest
        and commits. Ends with every rank knowing whether the commit happened (a failure on one raises on all).
        Collectives run on the checkpoint group only, never on training's."""
        t0 = time.perf_counter()
        tmp = self.paths.checkpoints / f".tmp-{target.name}-{self._tmp_id}"
        problem: str | None = None
        entries: dict[str, Any] = {}
        try:
            (tmp / DCP_DIR).mkdir(parents=True, exist_ok=True)  # every rank: no one removes what another wrote
        except OSError as exc:
            problem = str(write_error(target, exc))
        # every rank enters DCP's collectives or none does: a rank that could not even make the folder must not
        # leave the others waiting inside dcp.save
        problem = next((p for p in all_gather_objects(problem, self._group) if p), None)
        if problem is None:
            try:
                dcp_io.save(flat, tmp / DCP_DIR, self._group)  # collective; a failure on one raises on all
                mine = dcp_io.own_files(tmp / DCP_DIR, self.ctx.rank)
                dcp_io.fsync_files(mine)
                entries = {f"{DCP_DIR}/{p.name}": {"size": p.stat().st_size, NEW_DIGEST: file_digest(p)} for p in mine}
            except OSError as exc:
                problem = str(write_error(target, exc))
            except Exception as exc:  # DCP wraps a rank's OSError (disk full) in its CheckpointException
                cause = dcp_io.find_os_error(exc)
                problem = str(write_error(target, cause)) if cause else f"cannot write checkpoint {target.name}: {exc}"
        reports = all_gather_objects((entries, problem), self._group)
        problem = next((p for _, p in reports if p), None)
        if self.ctx.is_main:
            if problem is None:
                try:
                    fsync_dir(tmp / DCP_DIR)
                    files = {name: e for ents, _ in reports for name, e in ents.items()}
                    self._write_folder(target, tmp, payload, files)
                except OSError as exc:
                    problem = str(write_error(target, exc))
                except Exception as exc:  # anything: the other ranks wait for this verdict, it must be sent
                    problem = f"cannot write checkpoint {target.name}: {type(exc).__name__}: {exc}"
            if problem is not None:
                shutil.rmtree(tmp, ignore_errors=True)
        problem = all_gather_objects(problem, self._group)[0]  # rank 0's verdict, on every rank
        if problem is not None:
            raise CheckpointError(problem)
        if self.ctx.is_main:
            self._after_commit(payload)
        self.last_commit_s = time.perf_counter() - t0

    def _commit(self, target: Path, payload: CheckpointPayload) -> None:
        """Rank 0: write everything into a temporary folder, fsync, rename into place, update ``latest``."""
        t0 = time.perf_counter()
        try:
            tmp = self._fresh_tmp(target, str(os.getpid()))
            self._write_folder(target, tmp, payload, {})
        except (OSError, RuntimeError) as exc:  # RuntimeError: torch's zip writer on a full disk ("unexpected pos")
            if not isinstance(exc, OSError) and disk_trouble(exc) is None:
                raise
            raise write_error(target, exc) from exc
        self._after_commit(payload)
        self.last_commit_s = time.perf_counter() - t0

    def _after_commit(self, payload: CheckpointPayload) -> None:
        """Rank 0, after a commit: ``best``, then retention."""
        best = self.paths.step_dir(payload.best_step) if payload.best_step is not None else None
        if best is not None and best.is_dir() and self.paths.best_name() != best.name:
            atomic_write(self.paths.best, best.name + "\n")  # before retention: it never names a deleted folder
        self._apply_retention(payload.step, payload.keep_also)

    def _fresh_tmp(self, target: Path, tmp_id: str) -> Path:
        """Rank 0: an empty temporary folder for ``target`` (a leftover of the same name is removed)."""
        self.paths.checkpoints.mkdir(parents=True, exist_ok=True)
        tmp = self.paths.checkpoints / f".tmp-{target.name}-{tmp_id}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        return tmp

    def _write_folder(self, target: Path, tmp: Path, payload: CheckpointPayload, files: dict[str, Any]) -> None:
        """Rank 0: write its files into ``tmp`` (``files``: entries of what other ranks wrote there already), the
        manifest last, fsync, rename into place, update ``latest``. A failure removes ``tmp``."""
        try:
            objects = {MODEL_FILE: payload.model, OPTIM_FILE: payload.rest}
            files.update(save_torch_files(tmp, {name: obj for name, obj in objects.items() if obj is not None}))
            files[STATE_FILE] = write_durable(tmp / STATE_FILE, payload.train_state.to_json().encode())
            files.update({name: write_durable(tmp / name, data) for name, data in self.extra_files.items()})
            # The manifest goes last: its presence (and matching hashes) is what makes the folder count.
            manifest = {"format": FORMAT_VERSION, "step": payload.step, "files": files}
            if self.sharded:
                manifest.update(parallel="fsdp", world_size=self.ctx.world_size)
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

    def _apply_retention(self, newest: int, keep_also: frozenset[int] = frozenset()) -> None:
        """Keep the newest ``keep`` committed checkpoints up to ``newest`` and those in ``keep_also``; never touch
        uncommitted folders."""
        committed = [(s, f) for s, f in self.paths.committed_folders() if s <= newest]
        for _, folder in [(s, f) for s, f in committed[self.keep :] if s not in keep_also]:
            # Rename first: a kill in the middle of the delete leaves a .trash- folder, never a half step- one.
            trash = folder.with_name(f".trash-{folder.name}-{os.getpid()}")
            os.rename(folder, trash)
            shutil.rmtree(trash, ignore_errors=True)

    KEEP_SET_ASIDE = 3  # broken folders kept for `ckpt inspect`; older ones are deleted (they would pile up)

    def _prune_set_aside(self) -> None:
        """Rank 0: keep the newest few set-aside folders, delete the others (saying so)."""
        for folder in self.paths.set_aside_folders()[: -self.KEEP_SET_ASIDE]:
            log.warning(
                "deleting old set-aside checkpoint %s (keeping the newest %d)", folder.name, self.KEEP_SET_ASIDE
            )
            shutil.rmtree(folder, ignore_errors=True)

    def clean_stale_temporaries(self) -> None:
        """Remove what killed saves left behind (``.tmp-*``, ``.trash-*``). Rank 0, before training."""
        if self.ctx.is_main and self.paths.checkpoints.is_dir():
            for path in [*self.paths.checkpoints.glob(".tmp-*"), *self.paths.checkpoints.glob(".trash-*")]:
                shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)

    def find_resume_point(self) -> Path | None:
        """Rank 0 picks the newest valid checkpoint and every rank gets the same answer. Collective.

        Broken checkpoints newer than it are set aside (renamed ``*.invalid-*``, not deleted) so they are
        neither retried at every start nor counted by retention.
        """
        choice, unsafe = None, None
        if self.ctx.is_main:
            folders = step_folders(self.paths.checkpoints)
            try:
                found = find_latest_valid(self.paths.checkpoints)
            except CheckpointError as exc:  # unsafe: every rank must learn it, none may wait in the broadcast
                found, unsafe, folders = None, exc, []
                choice = "!unsafe:" + str(exc)
            if found is None and folders:
                choice = "!none-valid"
            elif found is not None:
                newer = [f for _, f in folders if f.name > found.name]
                for folder in newer:
                    set_aside(folder)
                self._prune_set_aside()
                if newer or self.paths.latest_name() != found.name:
                    atomic_write(self.paths.latest, found.name + "\n")  # never name a set-aside folder
                choice = str(found)
        choice = self.ctx.broadcast_object(choice)
        if isinstance(choice, str) and choice.startswith("!unsafe:"):
            if unsafe is not None:
                raise unsafe
            raise dcp_io.UnsafeCheckpointError(choice.removeprefix("!unsafe:"))
        if choice == "!none-valid":
            raise CheckpointError(
                f"'{self.paths.checkpoints}' holds checkpoints but none is valid; refusing to start "
                "from scratch over them. HINT: `orchestrator ckpt inspect` shows why; move them away or use a new "
                "run.dir"
            )
        return Path(choice) if choice else None

    def load(
        self,
        folder: Path,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
        scaler: Any,
        saved: TrainState | None = None,
    ) -> TrainState:
        """Restore model, optimizer, scheduler and scaler from ``folder``; return its train state."""
        saved = saved or read_train_state(folder)
        bare = unwrap(model)
        rest = safe_load(folder / OPTIM_FILE)  # an unsafe or corrupt file: CheckpointError, not a config error
        if not (isinstance(rest, Mapping) and isinstance(rest.get("optimizer"), Mapping) and "scheduler" in rest):
            raise CheckpointError(f"'{folder / OPTIM_FILE}' does not hold optimizer and scheduler state")
        check_optimizer_fits(folder, optimizer, rest["optimizer"], saved.optimizer)
        if is_sharded_checkpoint(folder):
            named = self._load_shards(folder, bare, rest["optimizer"])
        else:
            load_full_model(folder, bare, safe_load(folder / MODEL_FILE))
            named = rest["optimizer"]
        convert = from_named if is_named(named) else from_positions
        state = convert(str(folder), bare, optimizer, named)
        optimizer.load_state_dict(laid_out_like(state, optimizer))
        then, now = rest.get("scheduler_class"), schedule_kind(scheduler)
        if isinstance(then, str) and then != now:
            raise IncompatibleCheckpointError(
                f"checkpoint '{folder}' holds {then} state, this run's schedule is {now} (was task.scheduler added "
                "or removed?). HINT: restore the task's scheduler, or start a new run.dir with train.init_from set to "
                "this checkpoint to take its weights alone"
            )
        scheduler.load_state_dict(rest["scheduler"])
        if rest.get("scaler"):
            scaler.load_state_dict(rest["scaler"])
        return saved

    def _load_shards(self, folder: Path, bare: nn.Module, entry: Mapping[str, Any]) -> dict[str, Any]:
        """Load a sharded checkpoint's model into ``bare`` (in place, resharded to its layout) and return the named
        optimizer entry with its tensors. Collective when distributed: all ranks read what their layout needs."""
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
        dcp_io.load(targets, folder / DCP_DIR, distributed=self.ctx.distributed)
        bare.load_state_dict(model_sd, strict=True)  # filled in place; this runs the wrappers' load hooks too
        tensors = {k[len(OPTIM_PREFIX) :]: v for k, v in targets.items() if k.startswith(OPTIM_PREFIX)}
        return join_tensors(where, entry, tensors)
