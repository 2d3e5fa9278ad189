"""Checkpoints: collective save, rank 0 writes, atomic commit, verified resume, safe loading.

Layout of one checkpoint, ``checkpoints/step-00000040/``:

- ``model.pt``       the unwrapped model's ``state_dict`` (no ``module.`` / ``_orig_mod.`` keys)
- ``optim.pt``       ``{"optimizer", "scheduler", "scaler"}`` state dicts; the optimizer's keyed by parameter name
                     (workers.optim_state; the first format's positions still load)
- ``train_state.json`` step, samples seen, world size at save, seed, ... (non-tensor state is JSON)
- ``manifest.json``  size and checksum (xxh3_128; sha256 in older ones) of every file above; written last: it is
                     the commit marker

A sharded (``train.parallel: fsdp``) checkpoint is the same folder, but the model's and the optimizer's tensors are a
DCP checkpoint under ``dcp/`` (workers.dcp_io: one shard file per rank, ``.metadata``), ``optim.pt`` holds the
rest of the optimizer entry (groups, non-tensor state) and the scheduler and scaler, and ``model.pt`` (the full
model, written by rank 0) is there per ``train.export_model``. Every rank writes its shard, fsyncs and reports
its files' checksums; rank 0 then writes the rest and the manifest covering every file, renames, moves ``latest``.
Either kind resumes into either mode on any world size: DCP reshards, a full state is sliced (workers.parallel).

A save writes everything into ``checkpoints/.tmp-step-…``, fsyncs, renames the folder into place, then
replaces ``checkpoints/latest`` atomically. A folder without a valid manifest does not exist for resume.
Everything is loaded with ``weights_only=True``; nothing here unpickles arbitrary objects.
"""

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

from workers import dcp_io
from workers.contract import TrainState, disk_trouble, is_int
from workers.dcp_io import DCP_DIR, METADATA, MODEL_PREFIX, OPTIM_PREFIX
from workers.dist import DistContext
from workers.errors import CheckpointError, IncompatibleCheckpointError, UnsafeCheckpointError
from workers.fsutil import NEW_DIGEST, HashingWriter, atomic_write, digest_of, file_digest, fsync_dir, write_durable
from workers.optim_state import from_named, from_positions, is_named, join_tensors, split_tensors, tensor_keys, to_named
from workers.parallel import (
    all_gather_objects,
    any_sharded,
    checkpoint_group,
    full_model_state,
    is_sharded,
    like,
    staged,
)
from workers.rundir import MANIFEST_FILE, MODEL_FILE, OPTIM_FILE, STATE_FILE, RunDir, step_folders

log = logging.getLogger("workers.checkpoint")

FORMAT_VERSION = 1
DCP_METADATA = f"{DCP_DIR}/{METADATA}"  # the manifest entry that makes a checkpoint a sharded one
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
__all__ = [
    "CheckpointError", "Checkpointer", "find_latest_valid", "load_weights", "locate_weights", "read_located",
    "read_train_state", "verify",
]  # fmt: skip


# ---------------------------------------------------------------- unwrapping


def unwrap(model: nn.Module) -> nn.Module:
    """Peel DDP/DataParallel (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers, in any nesting."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def strip_wrapper_prefixes(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Remove ``module.`` / ``_orig_mod.`` prefixes that *every* key carries (repeatedly, in any order).

    Only a prefix shared by all keys is removed, so a model with a submodule really named ``module`` survives.
    """
    sd = dict(state_dict)
    changed = True
    while changed and sd:
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            if all(k.startswith(prefix) for k in sd):
                sd = {k[len(prefix) :]: v for k, v in sd.items()}
                changed = True
    return sd


def _is_state_dict(obj: Any) -> bool:
    return (
        isinstance(obj, Mapping)
        and bool(obj)
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())
    )


def _safe_load(path: Path) -> Any:
    """``torch.load`` with ``weights_only=True``; any failure becomes a CheckpointError naming the file."""
    try:
        with open(path, "rb") as f:
            return torch.load(f, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"'{path}' does not exist") from None
    except IsADirectoryError:
        raise CheckpointError(f"'{path}' is a folder, not a weights file") from None
    except Exception as exc:
        problem = _load_problem(exc) if _looks_like_torch(path) else "not a PyTorch weights file"
        error = UnsafeCheckpointError if problem.startswith(_REFUSED) else CheckpointError
        raise error(f"'{path}' cannot be loaded safely (weights_only=True): {problem}") from None


def _looks_like_torch(path: Path) -> bool:
    """torch.save writes a zip archive (``PK``), older versions a pickle (protocol 2+: ``\x80``); an empty file is
    torch's truncation case."""
    try:
        with open(path, "rb") as f:
            head = f.read(2)
    except OSError:
        return True
    return head in (b"", b"PK") or head[:1] == b"\x80"


_REFUSED = "refused:"  # how _load_problem starts a pickle payload's description


def _load_problem(exc: Exception) -> str:
    """One line on why torch.load refused a file. torch's message for a pickle payload advises loading it with
    ``weights_only=False`` — advice that must never reach a user about an untrusted file: name the global instead."""
    text = str(exc)
    if "Weights only load failed" in text:
        lines = [ln.strip() for ln in text.splitlines()[1:] if ln.strip()]
        globals_ = [ln for ln in lines if "GLOBAL" in ln]  # a pickled callable: the payload's name
        if globals_:
            return f"{_REFUSED} it holds pickled code, which is never run ({globals_[0].rstrip('.')})"
        return "not a PyTorch weights file (or one holding pickled objects beyond tensors)"
    if not text.strip() or isinstance(exc, EOFError):
        return "the file is empty or truncated"
    return text.strip().splitlines()[0]


def first_mismatch(model: nn.Module, weights: Mapping[str, torch.Tensor]) -> str | None:
    """The first key or shape in which ``weights`` does not fit ``model`` (None when it fits), for one-line errors."""
    expected = model.state_dict()
    for key, tensor in expected.items():
        if key not in weights:
            return f"the model's '{key}' is missing from the weights"
        if not isinstance(tensor, torch.Tensor):  # a module's _extra_state: load_state_dict judges it
            continue
        if tuple(weights[key].shape) != tuple(tensor.shape):
            return f"'{key}' has shape {list(weights[key].shape)} in the weights, {list(tensor.shape)} in the model"
    extra = [k for k in weights if k not in expected]
    return f"the weights have '{extra[0]}', which the model has not" if extra else None


def locate_weights(path: str | Path) -> Path:
    """What :func:`load_weights` reads for ``path``: a weights file as given; for a run dir, its newest valid
    checkpoint's ``model.pt``; for a checkpoint folder, its ``model.pt`` — or the (verified) folder itself when it
    is sharded without one. CheckpointError when a folder holds no valid checkpoint."""
    path = Path(path)
    if not path.is_dir():
        return path
    run = RunDir(path)
    ckpt = find_latest_valid(run.checkpoints) if run.checkpoints.is_dir() else path
    if ckpt is None:
        raise CheckpointError(f"'{path}' holds no valid checkpoint")
    files = verify(ckpt)["files"]
    return ckpt / MODEL_FILE if MODEL_FILE in files else ckpt


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """A clean, prefix-free model state_dict from any of the usual layouts.

    Accepts: one of our checkpoint folders or a run dir (its newest valid checkpoint), a plain state_dict file,
    or a dict holding one under ``model`` / ``state_dict`` / ``model_state_dict``; keys may carry
    ``module.`` (DataParallel/DDP) and ``_orig_mod.`` (torch.compile) prefixes.
    """
    return read_located(locate_weights(path))


def read_located(path: Path) -> dict[str, torch.Tensor]:
    """The weights at a place :func:`locate_weights` returned (already verified: not read twice)."""
    if path.is_dir():  # a sharded checkpoint without the exported model: its shards, gathered here
        return dcp_io.read_full(path / DCP_DIR, MODEL_PREFIX)
    obj = _safe_load(path)
    if not _is_state_dict(obj) and isinstance(obj, Mapping):
        for key in ("model", "state_dict", "model_state_dict"):
            if _is_state_dict(obj.get(key)):
                obj = obj[key]
                break
    if not _is_state_dict(obj):
        raise CheckpointError(f"'{path}' holds no model state_dict (a mapping of names to tensors)")
    return strip_wrapper_prefixes(obj)


# ---------------------------------------------------------------- writing


def save_torch_durable(path: Path, obj: Any) -> dict[str, Any]:
    """``torch.save`` streamed to ``path`` through a hashing writer, then fsync; returns the manifest entry."""
    with open(path, "wb") as f:
        writer = HashingWriter(f)
        torch.save(obj, writer)
        f.flush()
        os.fsync(f.fileno())
    return writer.entry()


_FILE_POOL: ThreadPoolExecutor | None = None


def save_torch_files(folder: Path, objects: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """:func:`save_torch_durable` of each ``name -> object`` into ``folder``, the files written at the same time
    (one thread each: serialising, writing to the page cache and fsync of one file overlap the other's — a sync
    save of model + optimizer is bound by those copies, not by the disk). Returns the manifest entries; the first
    failure is raised once every write has ended (none is left running into a folder that is being removed)."""
    global _FILE_POOL
    if len(objects) < 2:
        return {name: save_torch_durable(folder / name, obj) for name, obj in objects.items()}
    if _FILE_POOL is None:
        _FILE_POOL = ThreadPoolExecutor(max_workers=2, thread_name_prefix="ckpt-file")
    *rest, (last, last_obj) = objects.items()
    futures = {name: _FILE_POOL.submit(save_torch_durable, folder / name, obj) for name, obj in rest}
    entries, error = {}, None
    try:
        entries[last] = save_torch_durable(folder / last, last_obj)  # this thread writes one of them itself
    except BaseException as exc:
        error = exc
    for name, future in futures.items():
        try:
            entries[name] = future.result()
        except BaseException as exc:
            error = error or exc
    if error is not None:
        raise error
    return {name: entries[name] for name in objects}


def snapshot(obj: Any, pin: bool = False) -> Any:
    """A deep copy of nested state with every tensor copied to host memory (pinned when ``pin``).

    After this returns, training may change the live tensors: the snapshot is what gets written.
    """
    if isinstance(obj, torch.Tensor):
        if pin and obj.is_cuda:
            host = torch.empty(obj.shape, dtype=obj.dtype, pin_memory=True)
            return host.copy_(obj.detach(), non_blocking=True)
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        copy = type(obj)((k, snapshot(v, pin)) for k, v in obj.items())
        if hasattr(obj, "_metadata"):  # a module state_dict's per-module versions (load_state_dict reads them)
            copy._metadata = obj._metadata
        return copy
    if isinstance(obj, (list, tuple)):
        return type(obj)(snapshot(v, pin) for v in obj)
    return obj


# ---------------------------------------------------------------- reading


def verify(folder: Path) -> dict[str, Any]:
    """Check a committed checkpoint against its manifest (sizes and checksums); return the manifest.

    Raises CheckpointError naming the folder and the first problem found.
    """
    manifest = _read_manifest(folder)
    for name, entry in manifest["files"].items():
        path = folder / name
        _refuse_links(folder, name)
        if not path.is_file():
            raise CheckpointError(f"'{folder}' is missing {name}")
        if path.stat().st_size != entry["size"]:
            raise CheckpointError(f"'{path}' has {path.stat().st_size} bytes, manifest says {entry['size']}")
        algorithm, expected = digest_of(entry)
        if file_digest(path, algorithm) != expected:
            raise CheckpointError(f"'{path}' does not match its checksum ({algorithm}) in the manifest (corrupt)")
    if DCP_METADATA in manifest["files"]:  # only now, its checksum matched: read (restricted) and check its files
        metadata = dcp_io.read_metadata(folder / DCP_DIR)
        unlisted = [
            f for f in dcp_io.shard_files(folder / DCP_DIR, metadata) if f"{DCP_DIR}/{f}" not in manifest["files"]
        ]
        if unlisted:
            raise CheckpointError(
                f"'{folder}': its DCP metadata names {DCP_DIR}/{unlisted[0]}, which the manifest lacks"
            )
    read_train_state(folder)  # hashes match, but the state must also read by schema (a forged or buggy file)
    return manifest


def _refuse_links(folder: Path, name: str) -> None:
    """CheckpointError when the manifest's file ``name`` or a folder on its way inside ``folder`` (``dcp/``) is a
    symbolic link. A link could point anywhere (another run's shards, a file that changes later): checksums that
    match through one prove nothing about the checkpoint's own files, so nothing is hashed or loaded through one."""
    inside = folder
    for part in Path(name).parts:
        inside = inside / part
        if inside.is_symlink():
            what = "file" if inside == folder / name else "folder"
            raise CheckpointError(
                f"'{inside}' is a symbolic link, not a {what} of the checkpoint. HINT: put the {what} itself in "
                "the checkpoint (copy it there instead of linking it)"
            )


def _read_manifest(folder: Path) -> dict[str, Any]:
    """The manifest, checked by schema: ``files`` maps a plain file name to ``{"size": int, <digest>: hex}`` (digest:
    xxh3_128, or sha256 in checkpoints written before), and
    lists the three files every checkpoint has. Anything else is a CheckpointError (the folder is corrupt)."""
    path = folder / MANIFEST_FILE
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"'{folder}' has no {MANIFEST_FILE} (incomplete save)") from None
    except (OSError, UnicodeDecodeError, ValueError):
        raise CheckpointError(f"'{path}' is unreadable") from None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict):
        raise CheckpointError(f"'{path}' is malformed: no 'files' mapping")
    for name, entry in files.items():
        ok_name = isinstance(name, str) and _plain_name(name.removeprefix(f"{DCP_DIR}/"))
        ok_entry = (
            isinstance(entry, dict) and is_int(entry.get("size"))
            and digest_of(entry) is not None
        )  # fmt: skip
        if not (ok_name and ok_entry):
            raise CheckpointError(f"'{path}' is malformed: entry {name!r} is not {{size, checksum}} of a file")
    for name in (OPTIM_FILE, STATE_FILE, MODEL_FILE if DCP_METADATA not in files else DCP_METADATA):
        if name not in files:
            raise CheckpointError(f"'{folder}' manifest does not list {name}")
    return manifest


def _plain_name(name: str) -> bool:
    """A file name that stays in its folder (no separators, not . or ..)."""
    return bool(name) and "/" not in name and "\\" not in name and name not in (".", "..")


def is_sharded_checkpoint(folder: Path) -> bool:
    """Whether a (verified) folder is a sharded one: its manifest lists DCP metadata."""
    return DCP_METADATA in _read_manifest(folder)["files"]


def find_latest_valid(ckpt_dir: Path, warn: bool = True) -> Path | None:
    """The newest checkpoint that passes :func:`verify`; broken newer ones are skipped with a warning.

    An unsafe one (a pickle payload whose checksums match: forged, never the trace of a crash) is not skipped but
    raised: falling back to an older checkpoint would hide an attack on the run dir."""
    for _, folder in step_folders(ckpt_dir):
        try:
            verify(folder)
            return folder
        except dcp_io.UnsafeCheckpointError:
            raise
        except CheckpointError as exc:
            if warn:
                log.warning("skipping checkpoint %s: %s", folder.name, exc)
    return None


def read_train_state(folder: Path) -> TrainState:
    """The folder's train state, checked by schema (CheckpointError when absent or malformed)."""
    return TrainState.read(folder / STATE_FILE)


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
                    "scheduler_class": _schedule_kind(scheduler), "scaler": scaler.state_dict()}  # fmt: skip
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
                            "scheduler_class": _schedule_kind(scheduler), "scaler": scaler.state_dict()}  # fmt: skip
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
            problem = str(_write_error(target, exc))
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
                problem = str(_write_error(target, exc))
            except Exception as exc:  # DCP wraps a rank's OSError (disk full) in its CheckpointException
                cause = dcp_io.find_os_error(exc)
                problem = str(_write_error(target, cause)) if cause else f"cannot write checkpoint {target.name}: {exc}"
        reports = all_gather_objects((entries, problem), self._group)
        problem = next((p for _, p in reports if p), None)
        if self.ctx.is_main:
            if problem is None:
                try:
                    fsync_dir(tmp / DCP_DIR)
                    files = {name: e for ents, _ in reports for name, e in ents.items()}
                    self._write_folder(target, tmp, payload, files)
                except OSError as exc:
                    problem = str(_write_error(target, exc))
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
            raise _write_error(target, exc) from exc
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
            _set_aside(target)
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
                    _set_aside(folder)
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
        rest = _safe_load(folder / OPTIM_FILE)  # an unsafe or corrupt file: CheckpointError, not a config error
        if not (isinstance(rest, Mapping) and isinstance(rest.get("optimizer"), Mapping) and "scheduler" in rest):
            raise CheckpointError(f"'{folder / OPTIM_FILE}' does not hold optimizer and scheduler state")
        _check_optimizer_fits(folder, optimizer, rest["optimizer"], saved.optimizer)
        if is_sharded_checkpoint(folder):
            named = self._load_shards(folder, bare, rest["optimizer"])
        else:
            _load_full_model(folder, bare, _safe_load(folder / MODEL_FILE))
            named = rest["optimizer"]
        convert = from_named if is_named(named) else from_positions
        state = convert(str(folder), bare, optimizer, named)
        optimizer.load_state_dict(_laid_out_like(state, optimizer))
        then, now = rest.get("scheduler_class"), _schedule_kind(scheduler)
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
        _check_model_fits(folder, bare, {k: torch.empty(s, dtype=d, device="meta") for k, (s, d) in shapes.items()})
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


def _check_model_fits(folder: Path, bare: nn.Module, weights: Mapping[str, torch.Tensor]) -> None:
    problem = first_mismatch(bare, weights)
    if problem:  # another architecture than the one saved: the user's to fix, not a crash
        raise IncompatibleCheckpointError(
            f"checkpoint '{folder}' does not fit the model that task.factory/task.args build: {problem}. "
            "HINT: restore the task settings of this run, or use a new run.dir"
        )


def _load_full_model(folder: Path, bare: nn.Module, weights: Any) -> None:
    """Load a full state dict into ``bare``, sliced to its shards when it is sharded (no communication)."""
    if not _is_state_dict(weights):
        raise CheckpointError(f"'{folder / MODEL_FILE}' holds no model state_dict (names to tensors)")
    _check_model_fits(folder, bare, weights)
    load_full_weights(bare, weights)


def load_full_weights(bare: nn.Module, weights: Mapping[str, torch.Tensor]) -> None:
    """``bare.load_state_dict(weights)`` for a full state, whether ``bare`` is sharded or not. Fit checked first."""
    if is_sharded(bare):
        now = bare.state_dict()
        weights = {k: like(v, now[k]) if isinstance(now.get(k), torch.Tensor) else v for k, v in weights.items()}
    bare.load_state_dict(weights, strict=True)


def _laid_out_like(state: dict[str, Any], optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Optimizer state (positions) with each full tensor of a parameter's shape sharded like that parameter."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if not any_sharded(params):
        return state
    for index, values in state["state"].items():
        p = params[index]
        state["state"][index] = {k: like(v, p) if isinstance(v, torch.Tensor) else v for k, v in values.items()}
    return state


# Group settings a newer torch adds (and fills in on load) or an optimizer defaults: their absence is no mismatch.
_DEFAULTED_GROUP_KEYS = {
    "foreach", "maximize", "capturable", "differentiable", "fused", "decoupled_weight_decay", "nesterov", "amsgrad",
    "initial_lr", "param_names",
}  # fmt: skip


def _check_optimizer_fits(
    folder: Path, optimizer: torch.optim.Optimizer, saved: Mapping[str, Any], saved_class: str | None
) -> None:
    """The saved optimizer state must be of the same kind as the current optimizer (same class): else
    IncompatibleCheckpointError instead of a KeyError later. Checkpoints that predate the recorded class are judged by
    the settings their groups lack. The layout (which parameter in which group) is judged by workers.optim_state."""
    hint = (
        "HINT: restore optim.name, or start a new run.dir with train.init_from set to this checkpoint to take its "
        "weights alone"
    )
    now_class = type(optimizer).__name__
    if saved_class is not None and saved_class != now_class:
        raise IncompatibleCheckpointError(
            f"checkpoint '{folder}' holds {saved_class} state, this run builds {now_class} "
            f"(was optim.name changed?). {hint}"
        )
    groups = saved.get("param_groups")
    if not isinstance(groups, list) or not groups:
        raise CheckpointError(f"'{folder / OPTIM_FILE}' holds no optimizer parameter groups")
    settings = set(optimizer.defaults)  # every group has the optimizer's settings; a task may add keys to some
    for i, then in enumerate(groups):
        if not isinstance(then, Mapping) or not isinstance(then.get("params"), list):
            raise CheckpointError(f"'{folder / OPTIM_FILE}': parameter group {i} is malformed")
        lacking = sorted(settings - set(then) - _DEFAULTED_GROUP_KEYS - {"params"})
        if lacking:
            raise IncompatibleCheckpointError(
                f"checkpoint '{folder}' holds optimizer state that does not fit this optimizer (group {i} lacks "
                f"{', '.join(lacking)}; was optim.name changed?). {hint}"
            )


def _write_error(target: Path, exc: BaseException) -> CheckpointError:
    """The one-line error of a failed checkpoint write: a full or read-only disk is named as such."""
    said = (exc.strerror if isinstance(exc, OSError) else None) or str(exc).strip().splitlines()[-1]
    trouble = disk_trouble(exc)
    hint = {None: "check free space and write permission on run.dir", "the file system is read-only":
            "make run.dir's file system writable"}.get(trouble, "free space on run.dir's file system")  # fmt: skip
    return CheckpointError(
        f"cannot write checkpoint '{target}': {f'{trouble} ({said})' if trouble else said} — older checkpoints are "
        f"intact. HINT: {hint}, then run the same command again"
    )


def _schedule_kind(scheduler: Any) -> str:
    """The scheduler's class, and whether it is the task's (a task's own LambdaLR is not the built-in one)."""
    return type(scheduler).__name__ + ("" if getattr(scheduler, "builtin_schedule", False) else " (the task's)")


def _set_aside(folder: Path) -> None:
    aside = RunDir.set_aside_name(folder, time.strftime("%Y%m%d-%H%M%S"), os.getpid())
    log.warning("setting aside broken checkpoint %s as %s", folder.name, aside.name)
    os.rename(folder, aside)
