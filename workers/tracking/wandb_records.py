"""Read the records of a wandb ``.wandb`` transaction log (what ``mode="offline"`` writes), with wandb's own
protobuf schema (``wandb.proto.wandb_internal_pb2.Record``).

wandb 0.2x+ no longer ships a Python reader for this file (its Go core writes it); the framing is LevelDB's log
format behind a 7-byte ``:W&B`` header: 32 KiB blocks of ``crc32 (4) | length (2) | type (1) | data`` records,
split across blocks as FIRST/MIDDLE/LAST. A record torn by a kill (short or failing its checksum) ends the scan.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from workers.rundir import RunDir

_HEADER_LEN, _BLOCK, _REC_HEADER = 7, 32 * 1024, 7
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def iter_record_bytes(path: Path) -> Iterator[bytes]:
    data = Path(path).read_bytes()
    if not data.startswith(b":W&B"):
        raise ValueError(f"'{path}' is not a wandb transaction log")
    pos, pending = _HEADER_LEN, b""
    while True:
        left = _BLOCK - pos % _BLOCK
        if left < _REC_HEADER:  # block trailer: zero padding
            pos += left
            continue
        if pos + _REC_HEADER > len(data):
            return
        crc, length, kind = struct.unpack_from("<IHB", data, pos)
        chunk = data[pos + _REC_HEADER : pos + _REC_HEADER + length]
        if kind == 0 or len(chunk) < length or zlib.crc32(chunk, zlib.crc32(bytes([kind]))) != crc:
            return  # end of data, or a record torn by a kill
        pos += _REC_HEADER + length
        if kind == _FULL:
            yield chunk
        elif kind == _FIRST:
            pending = chunk
        elif kind == _MIDDLE:
            pending += chunk
        elif kind == _LAST:
            yield pending + chunk
            pending = b""


def read_records(path: Path) -> Iterator[Any]:
    """Parsed ``Record`` messages of one ``run-<id>.wandb`` file."""
    from wandb.proto import wandb_internal_pb2  # noqa: PLC0415 - only for readers

    for raw in iter_record_bytes(path):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        yield record


def history_steps(path: Path) -> list[int]:
    """The ``step`` of every history row in the file, in order."""
    return [r.history.step.num for r in read_records(path) if r.WhichOneof("record_type") == "history"]


def offline_logs(run_dir: Path, run_id: str) -> list[Path]:
    """All offline transaction logs of one wandb run id in the run's wandb folder (one per start), oldest first."""
    return sorted(RunDir(run_dir).wandb.glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))


def last_persisted_step(run_dir: Path, run_id: str) -> int:
    """The highest history step wandb actually wrote for this run, over all its offline logs (0 if none)."""
    return max((max(history_steps(p), default=0) for p in offline_logs(run_dir, run_id)), default=0)
