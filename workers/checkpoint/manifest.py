"""The on-disk format of a checkpoint: its manifest, verification, the newest valid one, its train state.

Layout of one checkpoint, ``checkpoints/step-00000040/``:

- ``model.pt``       the unwrapped model's ``state_dict`` (no ``module.`` / ``_orig_mod.`` keys)
- ``optim.pt``       ``{"optimizer", "scheduler", "scaler"}`` state dicts; the optimizer's keyed by parameter name
                     (workers.checkpoint.optim_state; the first format's positions still load)
- ``train_state.json`` step, samples seen, world size at save, seed, ... (non-tensor state is JSON)
- ``manifest.json``  size and checksum (xxh3_128; sha256 in older ones) of every file above; written last: it is
                     the commit marker

A sharded (``train.parallel: fsdp``) checkpoint is the same folder, but the model's and the optimizer's tensors are a
DCP checkpoint under ``dcp/`` (workers.checkpoint.dcp_io: one shard file per rank, ``.metadata``), ``optim.pt`` holds
the rest of the optimizer entry (groups, non-tensor state) and the scheduler and scaler, and ``model.pt`` (the full
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
from pathlib import Path
from typing import Any

from workers.checkpoint import dcp_io
from workers.checkpoint.dcp_io import DCP_DIR, METADATA
from workers.contract import TrainState, is_int
from workers.errors import CheckpointError
from workers.fsutil import digest_of, file_digest
from workers.rundir import MANIFEST_FILE, MODEL_FILE, OPTIM_FILE, STATE_FILE, step_folders

log = logging.getLogger("workers.checkpoint")

FORMAT_VERSION = 1


DCP_METADATA = f"{DCP_DIR}/{METADATA}"  # the manifest entry that makes a checkpoint a sharded one


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

    An unsafe one that verification sees (pickled objects in a sharded checkpoint's DCP metadata, whose checksums
    match: forged, never the trace of a crash) is not skipped but raised: falling back to an older checkpoint would
    hide an attack on the run dir. Pickled code in ``model.pt`` / ``optim.pt`` is not read here; loading refuses it
    (UnsafeCheckpointError) when the checkpoint is used."""
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
