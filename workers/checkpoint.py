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
import io
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from workers.dist import DistContext

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


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_file(path: Path, data: bytes) -> dict[str, Any]:
    """Write, flush, fsync; return the manifest entry (size, sha256)."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def _torch_bytes(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _replace_text(path: Path, text: str) -> None:
    """Atomically replace a small text file (write a sibling, fsync, rename)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    _write_file(tmp, text.encode())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


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
        if hashlib.sha256(path.read_bytes()).hexdigest() != entry["sha256"]:
            raise CheckpointError(f"'{path}' does not match its sha256 in the manifest (corrupt)")
    return manifest


def committed_steps(ckpt_dir: Path) -> list[tuple[int, Path]]:
    """All ``step-XXXXXXXX`` folders (committed or not), newest first."""
    if not ckpt_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in ckpt_dir.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return sorted(found, reverse=True)


def find_latest_valid(ckpt_dir: Path, warn: bool = True) -> Path | None:
    """The newest checkpoint that passes :func:`verify`; broken newer ones are skipped with a warning."""
    for _, folder in committed_steps(ckpt_dir):
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
class Checkpointer:
    """Saves and restores training state under ``ckpt_dir``. One per process; see the module docstring."""

    ckpt_dir: Path
    ctx: DistContext
    keep: int = 2

    def save(
        self,
        step: int,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
        scaler: Any,
        train_state: dict[str, Any],
    ) -> Path:
        """Collective: must be called on all ranks. Rank 0 writes and commits; then all ranks pass a barrier.

        Returns the committed folder. Older checkpoints beyond ``keep`` are deleted only after the commit.
        """
        target = self.ckpt_dir / step_dir_name(step)
        if self.ctx.is_main:
            self._write_and_commit(target, model, optimizer, scheduler, scaler, train_state)
            self._apply_retention(step)
        self.ctx.barrier()
        return target

    def _write_and_commit(
        self,
        target: Path,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
        scaler: Any,
        train_state: dict[str, Any],
    ) -> None:
        self.ckpt_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.ckpt_dir / f".tmp-{target.name}-{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        payloads = {
            MODEL_FILE: _torch_bytes(unwrap(model).state_dict()),
            OPTIM_FILE: _torch_bytes(
                {
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict(),
                }
            ),
            STATE_FILE: json.dumps(train_state, indent=1, sort_keys=True).encode(),
        }
        files = {name: _write_file(tmp / name, data) for name, data in payloads.items()}
        # The manifest goes last: its presence (and matching hashes) is what makes the folder count.
        _write_file(
            tmp / MANIFEST_FILE,
            json.dumps({"format": FORMAT_VERSION, "step": train_state["step"], "files": files}, indent=1).encode(),
        )
        _fsync_dir(tmp)
        if target.exists():  # an uncommitted or broken leftover at this step: keep it aside, lose nothing
            target.rename(target.with_name(f"{target.name}.invalid-{time.strftime('%Y%m%d-%H%M%S')}"))
        os.rename(tmp, target)
        _fsync_dir(self.ckpt_dir)
        _replace_text(self.ckpt_dir / LATEST_FILE, target.name + "\n")

    def _apply_retention(self, newest: int) -> None:
        for step, folder in committed_steps(self.ckpt_dir)[self.keep :]:
            if step < newest:
                shutil.rmtree(folder, ignore_errors=True)

    def clean_stale_temporaries(self) -> None:
        """Remove half-written ``.tmp-*`` folders a killed save left behind (rank 0, before training)."""
        if self.ctx.is_main and self.ckpt_dir.is_dir():
            for path in self.ckpt_dir.glob(".tmp-*"):
                shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)

    def find_resume_point(self) -> Path | None:
        """Rank 0 picks the newest valid checkpoint and every rank gets the same answer. Collective."""
        choice = None
        if self.ctx.is_main:
            found = find_latest_valid(self.ckpt_dir)
            had_any = bool(committed_steps(self.ckpt_dir))
            if found is None and had_any:
                choice = "!none-valid"
            else:
                choice = str(found) if found else None
        choice = self.ctx.broadcast_object(choice)
        if choice == "!none-valid":
            raise CheckpointError(
                f"'{self.ckpt_dir}' holds checkpoints but none is valid; refusing to start "
                "from scratch over them. HINT: move them away or use a new run.dir"
            )
        return Path(choice) if choice else None

    def load(
        self, folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, scaler: Any
    ) -> dict[str, Any]:
        """Restore model, optimizer, scheduler and scaler from ``folder``; return its train state."""
        unwrap(model).load_state_dict(_safe_load(folder / MODEL_FILE), strict=True)
        rest = _safe_load(folder / OPTIM_FILE)
        optimizer.load_state_dict(rest["optimizer"])
        scheduler.load_state_dict(rest["scheduler"])
        if rest.get("scaler"):
            scaler.load_state_dict(rest["scaler"])
        return read_train_state(folder)
