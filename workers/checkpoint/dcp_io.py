"""The ``dcp/`` folder of a sharded checkpoint: torch.distributed.checkpoint (DCP) files, read safely.

One owner for the format. A sharded checkpoint's tensors — the model's under ``model/<name>`` and the optimizer's
under ``optim/<parameter name>/<state key>`` — are one flat DCP checkpoint: every rank writes its own shard file
(``__<rank>_0.distcp``, torch.save'd tensors, read back with ``weights_only=True``) and rank 0 the ``.metadata``
that maps every key's chunks to files. Only tensors go in: DCP would store anything else as a pickle and load it
with ``weights_only=False``, so a checkpoint whose metadata lists a non-tensor entry is refused.

``.metadata`` itself is a pickle (``FileSystemReader.read_metadata`` calls ``pickle.load``). Here it is read only
after the manifest's checksum matched (workers.checkpoint verifies first), and then by :class:`_MetadataUnpickler`,
which admits DCP's own metadata classes and the few torch values they hold; any other global — a payload — is
refused with an error naming the file, and never called.
"""

from __future__ import annotations

import io
import os
import pickle
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)

from workers.errors import CheckpointError, UnsafeCheckpointError

DCP_DIR = "dcp"
METADATA = ".metadata"
MODEL_PREFIX, OPTIM_PREFIX = "model/", "optim/"

# The globals a DCP metadata pickle names (torch 2.4-2.13): its dataclasses, torch.Size and dtypes, the layout
# decoder, and the pathlib path DCP records as the checkpoint id. Nothing else is ever looked up.
_ADMITTED = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata", "TensorStorageMetadata", "TensorProperties", "ChunkStorageMetadata", "MetadataIndex",
        "StorageMeta", "BytesStorageMetadata", "_MEM_FORMAT_ENCODING",
    },
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "collections": {"OrderedDict"},
}  # fmt: skip
# The only objects whose attributes a pickle may set (BUILD): instances of DCP's metadata dataclasses. BUILD on an
# admitted class or function itself would rewrite it for the whole process (e.g. a method of a torch type).
_BUILDABLE = (Metadata, TensorStorageMetadata, TensorProperties, ChunkStorageMetadata, MetadataIndex, StorageMeta,
              BytesStorageMetadata, _StorageInfo)  # fmt: skip


class _MetadataUnpickler(pickle._Unpickler):  # the pure-Python one: its opcodes can be overridden (BUILD)
    dispatch: ClassVar[dict] = dict(pickle._Unpickler.dispatch)

    def find_class(self, module: str, name: str) -> Any:
        if name in _ADMITTED.get(module, ()):
            return super().find_class(module, name)
        if module == "torch" and isinstance(torch.__dict__.get(name), torch.dtype):
            return torch.__dict__[name]
        raise pickle.UnpicklingError(f"global '{module}.{name}'")

    def load_build(self) -> None:
        if not isinstance(self.stack[-2], _BUILDABLE):
            raise pickle.UnpicklingError(f"setting attributes of {type(self.stack[-2]).__name__}")
        super().load_build()

    dispatch[pickle.BUILD[0]] = load_build


class _Writer(FileSystemWriter):
    """DCP's file writer, storing the checkpoint's id as a plain string: the default is a ``pathlib`` object, whose
    pickled class name differs between Python versions (3.13: ``pathlib._local``) and need not be admitted."""

    def storage_meta(self) -> StorageMeta | None:
        meta = super().storage_meta()
        if meta is not None and meta.checkpoint_id is not None:
            meta.checkpoint_id = str(meta.checkpoint_id)
        return meta


def read_metadata(folder: Path) -> Metadata:
    """The DCP metadata of ``folder`` (a ``dcp/`` folder), unpickled with the restricted unpickler and checked:
    tensor entries only, each chunk in a plain file of the folder, no stream transforms. Call only after the
    manifest's checksums matched. UnsafeCheckpointError for a payload, CheckpointError for anything malformed."""
    path = folder / METADATA
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"'{path}' is unreadable: {exc.strerror or exc}") from None
    try:
        metadata = _MetadataUnpickler(io.BytesIO(data)).load()
    except pickle.UnpicklingError as exc:
        raise UnsafeCheckpointError(
            f"'{path}' is refused: it holds pickled code or objects beyond DCP's metadata ({exc}), which is never run"
        ) from None
    except Exception as exc:  # truncated, or admitted classes fed nonsense
        raise CheckpointError(f"'{path}' is not DCP metadata: {type(exc).__name__}: {exc}") from None
    try:
        _check_metadata(path, metadata)
    except CheckpointError:
        raise
    except Exception as exc:  # a forged object without the fields its class declares (NEWOBJ skips __init__)
        raise CheckpointError(f"'{path}' is malformed DCP metadata: {type(exc).__name__}: {exc}") from None
    return metadata


def _check_metadata(path: Path, metadata: Any) -> None:
    """Types all the way down, so that nothing later trips over a forged field (a CheckpointError, never a crash)."""
    if not isinstance(metadata, Metadata) or not isinstance(metadata.state_dict_metadata, Mapping):
        raise CheckpointError(f"'{path}' is not DCP metadata")
    for key, entry in metadata.state_dict_metadata.items():
        if not isinstance(entry, TensorStorageMetadata):  # DCP loads non-tensor entries with weights_only=False
            raise UnsafeCheckpointError(
                f"'{path}' lists {key!r} as a pickled object, not a tensor: refused (our checkpoints hold tensors only)"
            )
        well_formed = (
            isinstance(key, str)
            and isinstance(entry.properties, TensorProperties)
            and isinstance(entry.properties.dtype, torch.dtype)
            and isinstance(entry.size, torch.Size)
            and isinstance(entry.chunks, list)
            and all(isinstance(c, ChunkStorageMetadata) for c in entry.chunks)
        )
        if not well_formed:
            raise CheckpointError(f"'{path}': the entry {key!r} is malformed")
    if not isinstance(metadata.storage_data, Mapping):
        raise CheckpointError(f"'{path}': its storage data is malformed")
    for index, info in metadata.storage_data.items():
        if not isinstance(index, MetadataIndex) or not isinstance(info, _StorageInfo):
            raise CheckpointError(f"'{path}': its storage data is malformed")
        where = getattr(info, "relative_path", None)
        if not (
            isinstance(where, str) and where and "/" not in where and "\\" not in where and where not in (".", "..")
        ):
            raise CheckpointError(f"'{path}': the chunk of {getattr(index, 'fqn', index)!r} names no plain file")
        if getattr(info, "transform_descriptors", None):
            raise CheckpointError(f"'{path}': the chunk of {index.fqn!r} needs stream transforms, which we never write")


def tensor_shapes(metadata: Metadata, prefix: str) -> dict[str, tuple[torch.Size, torch.dtype]]:
    """The keys under ``prefix`` (prefix removed) with their global shape and dtype."""
    return {
        key[len(prefix) :]: (entry.size, entry.properties.dtype)
        for key, entry in metadata.state_dict_metadata.items()
        if key.startswith(prefix)
    }


def shard_files(folder: Path, metadata: Metadata) -> list[str]:
    """The files the metadata's chunks live in, sorted."""
    return sorted({info.relative_path for info in metadata.storage_data.values()})


class _SafeReader(FileSystemReader):
    """DCP's file reader with the restricted metadata read."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        metadata = read_metadata(Path(self.path))
        metadata.storage_meta = metadata.storage_meta or dcp.metadata.StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class _TensorsOnlyPlanner(DefaultLoadPlanner):
    """Never unpickles a non-tensor entry (read_metadata refuses them; this is the second lock)."""

    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        raise UnsafeCheckpointError(f"DCP entry {read_item.dest_index.fqn!r} is a pickled object: refused")


def save(flat: dict[str, torch.Tensor], folder: Path, group: Any = None) -> None:
    """Write ``flat`` (key -> tensor or DTensor) as a DCP checkpoint into ``folder``, each rank its own shard file,
    fsynced (rank 0 also ``.metadata``). Collective over ``group`` (all ranks, same keys); None without one."""
    distributed = dist.is_available() and dist.is_initialized()
    writer = _Writer(str(folder), single_file_per_rank=True, sync_files=True, thread_count=1)
    dcp.save(flat, storage_writer=writer, process_group=group, no_dist=not distributed)


def own_files(folder: Path, rank: int) -> list[Path]:
    """The files of ``folder`` this rank wrote (``__<rank>_*``; rank 0 also ``.metadata``)."""
    mine = sorted(folder.glob(f"__{rank}_*"))
    return [*mine, folder / METADATA] if rank == 0 else mine


def load(targets: dict[str, torch.Tensor], folder: Path, distributed: bool) -> None:
    """Fill ``targets`` (key -> tensor or DTensor, in place) from the DCP checkpoint in ``folder``, resharding to
    whatever layout the targets have. Collective when ``distributed`` (all ranks, same keys). Keys the checkpoint
    lacks are a CheckpointError (the caller checks fit first, with better messages)."""
    try:
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
            warnings.filterwarnings("ignore", message=".*single process", category=UserWarning)
            dcp.load(targets, storage_reader=_SafeReader(str(folder)), planner=_TensorsOnlyPlanner(),
                     no_dist=not distributed)  # fmt: skip
    except CheckpointError:
        raise
    except Exception as exc:  # DCP wraps rank failures in CheckpointException
        unsafe = _find(exc, UnsafeCheckpointError)
        if unsafe is not None:
            raise unsafe from None
        raise CheckpointError(f"'{folder}' cannot be loaded: {_first_line(exc)}") from None


def read_full(folder: Path, prefix: str) -> dict[str, torch.Tensor]:
    """Every tensor under ``prefix`` as a full (unsharded) CPU tensor, prefix removed, without a process group:
    ``ckpt export``, ``train.init_from``, ``load_weights``."""
    shapes = tensor_shapes(read_metadata(folder), prefix)
    targets = {prefix + k: torch.empty(size, dtype=dtype) for k, (size, dtype) in shapes.items()}
    load(targets, folder, distributed=False)
    return {k[len(prefix) :]: v for k, v in targets.items()}


def fsync_files(paths: list[Path]) -> None:
    """fsync each file (DCP's sync_files covers the shards; the renamed ``.metadata`` and folder need it too)."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def find_os_error(exc: BaseException) -> OSError | None:
    """The OSError behind a DCP failure (its CheckpointException wraps each rank's), if any."""
    found = _find(exc, OSError)
    return found if isinstance(found, OSError) else None


def _find(exc: BaseException, kind: type[BaseException]) -> BaseException | None:
    """``kind`` among ``exc``, its causes and DCP's per-rank failures."""
    seen: list[BaseException] = [exc]
    while seen:
        e = seen.pop()
        if isinstance(e, kind):
            return e
        seen.extend(x for x in (e.__cause__, e.__context__) if x is not None)
        failures = getattr(e, "failures", None)
        if isinstance(failures, Mapping):
            seen.extend(v for v in failures.values() if isinstance(v, BaseException))
            seen.extend(v[0] for v in failures.values() if isinstance(v, tuple) and v)
    return None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def layout(folder: Path) -> dict[str, Any]:
    """What ``ckpt inspect`` shows of a verified ``dcp/`` folder: its shard files with their total size, and the
    model's tensors (count, parameters, bytes) as the metadata lists them — nothing is loaded."""
    metadata = read_metadata(folder)
    files = shard_files(folder, metadata)
    model = tensor_shapes(metadata, MODEL_PREFIX)
    numel = {k: torch.Size(size).numel() for k, (size, _) in model.items()}
    return {
        "shard_files": files,
        "shard_bytes": sum((folder / f).stat().st_size for f in files),
        "tensors": len(model),
        "parameters": sum(numel.values()),
        "bytes": sum(n * dtype.itemsize for n, (_, (_, dtype)) in zip(numel.values(), model.items(), strict=True)),
    }
