"""Durable writes of a checkpoint's files: ``torch.save`` streamed through a hashing writer with fsync (two files
at once), host snapshots for background saves, the one-line error of a failed write, setting a broken folder aside.
"""

from __future__ import annotations

import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from workers.contract import disk_trouble
from workers.errors import CheckpointError
from workers.fsutil import HashingWriter
from workers.rundir import RunDir

log = logging.getLogger("workers.checkpoint")


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


def write_error(target: Path, exc: BaseException) -> CheckpointError:
    """The one-line error of a failed checkpoint write: a full or read-only disk is named as such."""
    said = (exc.strerror if isinstance(exc, OSError) else None) or str(exc).strip().splitlines()[-1]
    trouble = disk_trouble(exc)
    hint = {None: "check free space and write permission on run.dir", "the file system is read-only":
            "make run.dir's file system writable"}.get(trouble, "free space on run.dir's file system")  # fmt: skip
    return CheckpointError(
        f"cannot write checkpoint '{target}': {f'{trouble} ({said})' if trouble else said} — older checkpoints are "
        f"intact. HINT: {hint}, then run the same command again"
    )


def set_aside(folder: Path) -> None:
    aside = RunDir.set_aside_name(folder, time.strftime("%Y%m%d-%H%M%S"), os.getpid())
    log.warning("setting aside broken checkpoint %s as %s", folder.name, aside.name)
    os.rename(folder, aside)
