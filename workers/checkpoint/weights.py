"""Weights in any of the usual layouts: unwrap DDP/compile wrappers, strip their key prefixes, load safely
(``weights_only=True``, never unpickling code), locate the weights of a run dir or checkpoint folder, and check
that they fit a model.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from workers.checkpoint import dcp_io
from workers.checkpoint.dcp_io import DCP_DIR, MODEL_PREFIX
from workers.checkpoint.manifest import find_latest_valid, verify
from workers.errors import CheckpointError, UnsafeCheckpointError
from workers.parallel import (
    is_sharded,
    like,
)
from workers.rundir import MANIFEST_FILE, MODEL_FILE, RunDir

_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


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


def is_state_dict(obj: Any) -> bool:
    return (
        isinstance(obj, Mapping)
        and bool(obj)
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())
    )


def safe_load(path: Path) -> Any:
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
    if not run.checkpoints.is_dir() and not (path / MANIFEST_FILE).exists():
        raise CheckpointError(
            f"'{path}' is a folder, but neither a run dir (it has no checkpoints folder) nor a checkpoint (it has no "
            f"{MANIFEST_FILE}). HINT: name a run dir, one of its checkpoint folders, or a weights file"
        )
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
    obj = safe_load(path)
    if not is_state_dict(obj) and isinstance(obj, Mapping):
        for key in ("model", "state_dict", "model_state_dict"):
            if is_state_dict(obj.get(key)):
                obj = obj[key]
                break
    if not is_state_dict(obj):
        raise CheckpointError(f"'{path}' holds no model state_dict (a mapping of names to tensors)")
    return strip_wrapper_prefixes(obj)


def load_full_weights(bare: nn.Module, weights: Mapping[str, torch.Tensor]) -> None:
    """``bare.load_state_dict(weights)`` for a full state, whether ``bare`` is sharded or not. Fit checked first."""
    if is_sharded(bare):
        now = bare.state_dict()
        weights = {k: like(v, now[k]) if isinstance(now.get(k), torch.Tensor) else v for k, v in weights.items()}
    bare.load_state_dict(weights, strict=True)
