"""Checkpoints: collective save, rank 0 writes, atomic commit, verified resume, safe loading.

Layout of one checkpoint, ``checkpoints/step-00000040/``:

- ``model.pt``       the unwrapped model's ``state_dict`` (no ``module.`` / ``_orig_mod.`` keys)
- ``optim.pt``       ``{"optimizer", "scheduler", "scaler"}`` state dicts
- ``train_state.json`` step, samples seen, world size at save, seed, ... (non-tensor state is JSON)
- ``manifest.json``  size and sha256 of every file above; written last: it is the commit marker

A save writes everything into ``checkpoints/.tmp-step-…``, fsyncs, renames the folder into place, then
replaces ``checkpoints/latest`` atomically. A folder without a valid manifest does not exist for resume.
Everything is loaded with ``weights_only=True``; nothing here unpickles arbitrary objects.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from workers.config import ConfigError
from workers.dist import DistContext
from workers.fsutil import HashingWriter, atomic_write, fsync_dir, write_durable

log = logging.getLogger("workers.checkpoint")

FORMAT_VERSION = 1
MODEL_FILE, OPTIM_FILE, STATE_FILE, MANIFEST_FILE = "model.pt", "optim.pt", "train_state.json", "manifest.json"
LATEST_FILE = "latest"
_STEP_DIR = re.compile(r"^step-(\d{8})$")
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


class CheckpointError(RuntimeError):
    """A checkpoint or weights file that cannot be used; the message names the path."""


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


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
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise CheckpointError(f"'{path}' cannot be loaded safely (weights_only=True): {first}") from None


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """A clean, prefix-free model state_dict from any of the usual layouts.

    Accepts: one of our checkpoint folders or a run dir (its newest valid checkpoint), a plain state_dict file,
    or a dict holding one under ``model`` / ``state_dict`` / ``model_state_dict``; keys may carry
    ``module.`` (DataParallel/DDP) and ``_orig_mod.`` (torch.compile) prefixes.
    """
    path = Path(path)
    if path.is_dir():
        ckpt = find_latest_valid(path / "checkpoints") if (path / "checkpoints").is_dir() else path
        if ckpt is None:
            raise CheckpointError(f"'{path}' holds no valid checkpoint")
        verify(ckpt)
        path = ckpt / MODEL_FILE
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
    """Check a committed checkpoint against its manifest (sizes and sha256); return the manifest.

    Raises CheckpointError naming the folder and the first problem found.
    """
    manifest_path = folder / MANIFEST_FILE
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
    except FileNotFoundError:
        raise CheckpointError(f"'{folder}' has no {MANIFEST_FILE} (incomplete save)") from None
    except (ValueError, KeyError, TypeError):
        raise CheckpointError(f"'{folder}/{MANIFEST_FILE}' is unreadable") from None
    for name in (MODEL_FILE, OPTIM_FILE, STATE_FILE):
        if name not in files:
            raise CheckpointError(f"'{folder}' manifest does not list {name}")
    for name, entry in files.items():
        path = folder / name
        if not path.is_file():
            raise CheckpointError(f"'{folder}' is missing {name}")
        if path.stat().st_size != entry["size"]:
            raise CheckpointError(f"'{path}' has {path.stat().st_size} bytes, manifest says {entry['size']}")
        if _sha256_file(path) != entry["sha256"]:
            raise CheckpointError(f"'{path}' does not match its sha256 in the manifest (corrupt)")
    return manifest


def _sha256_file(path: Path, chunk: int = 1 << 24) -> str:
    """sha256 of a file read in 16 MiB chunks (a 10 GB optimizer state must not need 10 GB of RAM)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def step_folders(ckpt_dir: Path) -> list[tuple[int, Path]]:
    """All ``step-XXXXXXXX`` folders (committed or not), newest first."""
    if not ckpt_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in ckpt_dir.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return sorted(found, reverse=True)


def find_latest_valid(ckpt_dir: Path, warn: bool = True) -> Path | None:
    """The newest checkpoint that passes :func:`verify`; broken newer ones are skipped with a warning."""
    for _, folder in step_folders(ckpt_dir):
        try:
            verify(folder)
            return folder
        except CheckpointError as exc:
            if warn:
                log.warning("skipping checkpoint %s: %s", folder.name, exc)
    return None


def read_train_state(folder: Path) -> dict[str, Any]:
    try:
        return json.loads((folder / STATE_FILE).read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"'{folder / STATE_FILE}' is unreadable: {exc}") from None


# ---------------------------------------------------------------- the checkpointer


@dataclass
class CheckpointPayload:
    """What one checkpoint holds, as host-side objects ready to serialise."""

    step: int
    model: dict[str, torch.Tensor]
    rest: dict[str, Any]  # optimizer / scheduler / scaler state dicts
    train_state: dict[str, Any]


class Checkpointer:
    """Saves and restores training state under ``ckpt_dir``. One per process; see the module docstring.

    With ``async_save``, :meth:`save` blocks training only while rank 0 copies the state to host memory (and,
    if the previous save is still being written, until it is: at most one save is in flight); a background
    thread serialises, writes and commits it. No collective ever runs in that thread (only rank 0 writes).
    """

    def __init__(
        self,
        ckpt_dir: Path,
        ctx: DistContext,
        keep: int = 2,
        async_save: bool = False,
        extra_files: dict[str, bytes] | None = None,
    ) -> None:
        self.ckpt_dir, self.ctx, self.keep, self.async_save = ckpt_dir, ctx, keep, async_save
        self.extra_files = extra_files or {}  # e.g. the resolved config.yaml, saved in every checkpoint
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
        train_state: dict[str, Any],
        blocking: bool = True,
    ) -> Path:
        """Collective: must be called on all ranks with the same arguments' step.

        Blocking (the default; also every final and stop save): rank 0 writes and commits, then all ranks pass a
        barrier, so when it returns the checkpoint is committed. Non-blocking (``async_save``): rank 0 snapshots
        the state to host memory and returns; the commit happens in the background (no barrier needed: the
        other ranks write nothing). Older checkpoints beyond ``keep`` are deleted only after a commit.
        """
        target = self.ckpt_dir / step_dir_name(step)
        if self.ctx.is_main:
            self.wait()  # at most one save in flight; also surfaces a failed background write
            pin = self.ctx.device.type == "cuda"
            use_async = self._pool is not None and not blocking
            model_state = unwrap(model).state_dict()
            rest = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict()}  # fmt: skip
            if use_async:  # copy now: the live tensors change with the next step
                model_state, rest = snapshot(model_state, pin), snapshot(rest, pin)
            payload = CheckpointPayload(step, model_state, rest, dict(train_state))
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

    def _commit(self, target: Path, payload: CheckpointPayload) -> None:
        """Rank 0: write everything into a temporary folder, fsync, rename into place, update ``latest``."""
        t0 = time.perf_counter()
        try:
            self._write_folder(target, payload)
        except OSError as exc:
            raise CheckpointError(
                f"cannot write checkpoint '{target}': {exc.strerror or exc} — older checkpoints are intact. "
                "HINT: check free space and write permission on run.dir"
            ) from exc
        self._apply_retention(payload.step)
        self.last_commit_s = time.perf_counter() - t0

    def _write_folder(self, target: Path, payload: CheckpointPayload) -> None:
        self.ckpt_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.ckpt_dir / f".tmp-{target.name}-{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        try:
            files = {
                MODEL_FILE: save_torch_durable(tmp / MODEL_FILE, payload.model),
                OPTIM_FILE: save_torch_durable(tmp / OPTIM_FILE, payload.rest),
                STATE_FILE: write_durable(tmp / STATE_FILE, json.dumps(payload.train_state, indent=1).encode()),
            }
            files.update({name: write_durable(tmp / name, data) for name, data in self.extra_files.items()})
            # The manifest goes last: its presence (and matching hashes) is what makes the folder count.
            manifest = {"format": FORMAT_VERSION, "step": payload.step, "files": files}
            write_durable(tmp / MANIFEST_FILE, json.dumps(manifest, indent=1).encode())
            fsync_dir(tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)  # a failed save leaves nothing half-written behind
            raise
        if target.exists():  # an uncommitted leftover at this step: keep it aside, lose nothing
            _set_aside(target)
        os.rename(tmp, target)
        fsync_dir(self.ckpt_dir)
        atomic_write(self.ckpt_dir / LATEST_FILE, target.name + "\n")

    def _apply_retention(self, newest: int) -> None:
        """Keep the newest ``keep`` committed checkpoints up to ``newest``; never touch uncommitted folders."""
        committed = [(s, f) for s, f in step_folders(self.ckpt_dir) if s <= newest and (f / MANIFEST_FILE).exists()]
        for _, folder in committed[self.keep :]:
            # Rename first: a kill in the middle of the delete leaves a .trash- folder, never a half step- one.
            trash = folder.with_name(f".trash-{folder.name}-{os.getpid()}")
            os.rename(folder, trash)
            shutil.rmtree(trash, ignore_errors=True)

    def clean_stale_temporaries(self) -> None:
        """Remove what killed saves left behind (``.tmp-*``, ``.trash-*``). Rank 0, before training."""
        if self.ctx.is_main and self.ckpt_dir.is_dir():
            for path in [*self.ckpt_dir.glob(".tmp-*"), *self.ckpt_dir.glob(".trash-*")]:
                shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)

    def find_resume_point(self) -> Path | None:
        """Rank 0 picks the newest valid checkpoint and every rank gets the same answer. Collective.

        Broken checkpoints newer than it are set aside (renamed ``*.invalid-*``, not deleted) so they are
        neither retried at every start nor counted by retention.
        """
        choice = None
        if self.ctx.is_main:
            folders = step_folders(self.ckpt_dir)
            found = find_latest_valid(self.ckpt_dir)
            if found is None and folders:
                choice = "!none-valid"
            elif found is not None:
                newer = [f for _, f in folders if f.name > found.name]
                for folder in newer:
                    _set_aside(folder)
                latest = self.ckpt_dir / LATEST_FILE
                if newer or not latest.exists() or latest.read_text().strip() != found.name:
                    atomic_write(self.ckpt_dir / LATEST_FILE, found.name + "\n")  # never name a set-aside folder
                choice = str(found)
        choice = self.ctx.broadcast_object(choice)
        if choice == "!none-valid":
            raise CheckpointError(
                f"'{self.ckpt_dir}' holds checkpoints but none is valid; refusing to start "
                "from scratch over them. HINT: `orchestrator ckpt inspect` shows why; move them away or use a new "
                "run.dir"
            )
        return Path(choice) if choice else None

    def load(
        self, folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, scaler: Any
    ) -> dict[str, Any]:
        """Restore model, optimizer, scheduler and scaler from ``folder``; return its train state."""
        weights = _safe_load(folder / MODEL_FILE)  # an unsafe or corrupt file: CheckpointError, not a config error
        try:
            unwrap(model).load_state_dict(weights, strict=True)
        except RuntimeError as exc:  # another architecture than the one saved: a config problem, not a crash
            first = str(exc).strip().splitlines()[0]
            raise ConfigError(
                f"checkpoint '{folder}' does not fit the model that task.factory/task.args build: "
                f"{first}. HINT: restore the task settings of this run, or use a new run.dir"
            ) from None
        rest = _safe_load(folder / OPTIM_FILE)
        optimizer.load_state_dict(rest["optimizer"])
        scheduler.load_state_dict(rest["scheduler"])
        if rest.get("scaler"):
            scaler.load_state_dict(rest["scaler"])
        return read_train_state(folder)


def _set_aside(folder: Path) -> None:
    aside = folder.with_name(f"{folder.name}.invalid-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")
    log.warning("setting aside broken checkpoint %s as %s", folder.name, aside.name)
    os.rename(folder, aside)
