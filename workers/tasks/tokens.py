"""Token files: a flat binary of token ids (``uint16`` or ``uint32``, native byte order, no header), read through a
memory map: a dataset of any size trains with memory that does not grow with the file (nanoGPT's and Megatron's
format). This module owns the format: :class:`TokenWindows` reads it, :func:`tokenize` writes it.

Sample ``i`` is the window ``ids[i*seq_len : i*seq_len + seq_len + 1]`` (input and next-token target), so a file of
``T`` ids holds ``(T - 1) // seq_len`` samples. The map is opened lazily in each process (a forked or spawned loader
worker opens its own; the dataset pickles as its path).

No torch import at module level: ``orchestrator data tokenize`` needs none.
"""

from __future__ import annotations

import mmap
import os
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from workers.contract import is_int
from workers.errors import ConfigError, UsageError
from workers.fsutil import atomic_stream

DTYPES = {"uint16": np.uint16, "uint32": np.uint32}
BYTE_VOCAB = 256  # tokenize's vocabulary: the bytes of the UTF-8 text
_CHUNK = 1 << 24  # tokenize reads the text 16 MiB at a time
# Reads between fresh maps. Every page a map has touched stays mapped, and counted in the process's RSS, until it is
# unmapped: over an epoch that would be the whole file (nanoGPT remakes its np.memmap per batch for this reason), and
# a kernel that maps a whole large folio per fault maps ~200 KB per random read here.
_REMAP_EVERY = 16
# Token files up to this size have every id checked against ``vocab_size`` when opened, 1 MiB at a time: measured
# here 2 GB/s from a cold page cache (0.85 GB/s for a sparse file's first read), 14 GB/s from a warm one: at most
# ~1 s at a rank's start (~2.5 s for the sparse file). Larger files are checked window by window as they are read:
# the same usage error, at the step that reads the id.
_SCAN_LIMIT = 2 << 30
_SCAN_CHUNK = 1 << 20


def check_window_args(seq_len: Any, dtype: Any, vocab_size: Any) -> None:
    """``task.args.seq_len``, ``dtype`` and ``vocab_size`` of a token file: ConfigError naming the key, with a hint,
    for a value of the wrong type or out of range (a string ``seq_len`` must not be a TypeError at a comparison)."""
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise ConfigError(
            f"config key 'task.args.dtype' = {dtype!r}: must be one of {', '.join(DTYPES)}. HINT: the width the file "
            "was written with: uint16 for ids up to 65,535 (orchestrator data tokenize's default), uint32 above"
        )
    if not is_int(seq_len) or seq_len < 1:
        raise ConfigError(
            f"config key 'task.args.seq_len' = {seq_len!r}: must be a whole number of at least 1 (the ids of one "
            "sample's input). HINT: e.g. task.args.seq_len=64"
        )
    if vocab_size is not None and (not is_int(vocab_size) or vocab_size < 1):
        raise ConfigError(
            f"config key 'task.args.vocab_size' = {vocab_size!r}: must be a whole number of at least 1. HINT: 256 "
            "for orchestrator data tokenize's files, the tokenizer's vocabulary size for others"
        )


def check_token_file(path: str, dtype: str, key: str) -> int:
    """The number of token ids in ``path``; ConfigError naming ``key`` when it is missing, empty or not a whole
    number of ``dtype`` ids."""
    hint = "HINT: make one with `orchestrator data tokenize TEXT OUT`"
    try:
        size = os.stat(path).st_size
    except OSError as exc:
        raise ConfigError(f"config key '{key}' = {path!r}: {exc.strerror or exc}. {hint}") from None
    if not os.path.isfile(path) or size == 0:
        raise ConfigError(f"config key '{key}' = {path!r}: {'empty' if size == 0 else 'not a file'}. {hint}")
    width = np.dtype(DTYPES[dtype]).itemsize
    if size % width:
        raise ConfigError(
            f"config key '{key}' = {path!r}: {size} bytes is not a whole number of {dtype} ids ({width} bytes each). "
            "HINT: is task.args.dtype the one the file was written with?"
        )
    return size // width


def first_id_outside(f: BinaryIO, dtype: str, vocab_size: int) -> tuple[int, int] | None:
    """``(position, id)`` of the first id of the open token file ``f`` at or above ``vocab_size``; None when every
    id is below it. Reads 1 MiB at a time from the start: memory does not grow with the file."""
    width = np.dtype(DTYPES[dtype])
    if vocab_size > np.iinfo(width).max:
        return None  # every id the file's width can hold is in the vocabulary
    buffer, done = bytearray(_SCAN_CHUNK), 0
    f.seek(0)
    while size := f.readinto(buffer):  # (a buffered reader fills the buffer unless the file ends)
        ids = np.frombuffer(buffer, width, count=size // width.itemsize)
        if ids.max() >= vocab_size:
            at = int(np.argmax(ids >= vocab_size))
            return done + at, int(ids[at])
        done += len(ids)
    return None


def outside_vocab(path: str, dtype: str, vocab_size: int, position: int, token: int) -> ConfigError:
    """The usage error of a token id at or above ``task.args.vocab_size`` (an embedding would fail less clearly,
    and a restart would read the same id)."""
    return ConfigError(
        f"config key 'task.args.vocab_size' = {vocab_size}: {path!r} holds token id {token} (id number {position} of "
        f"the file), outside the vocabulary. HINT: set task.args.vocab_size to the tokenizer's vocabulary size (above "
        f"{token}), and task.args.dtype (now {dtype}) to the width the file was written with"
    )


class TokenWindows:
    """Map-style dataset over a token file: ``(input, target)`` long tensors of ``seq_len`` ids each."""

    def __init__(self, path: str, seq_len: int, dtype: str = "uint16", vocab_size: int | None = None,
                 key: str = "task.args.tokens") -> None:  # fmt: skip
        """``vocab_size``: ids at or above it are refused (:func:`outside_vocab`): in the whole file now, when it is
        at most ``_SCAN_LIMIT`` bytes; else in each window as it is read."""
        check_window_args(seq_len, dtype, vocab_size)
        count = check_token_file(path, dtype, key)
        if count < seq_len + 1:
            raise ConfigError(
                f"config key 'task.args.seq_len' = {seq_len}: larger than {path!r} allows ({count} ids; a window "
                f"takes seq_len + 1). HINT: a smaller seq_len, or a longer file"
            )
        if vocab_size is not None and count * np.dtype(DTYPES[dtype]).itemsize <= _SCAN_LIMIT:
            with open(path, "rb") as f:
                found = first_id_outside(f, dtype, vocab_size)
            if found is not None:
                raise outside_vocab(path, dtype, vocab_size, *found)
        self.path, self.seq_len, self.dtype, self.vocab_size = path, seq_len, dtype, vocab_size
        self.tokens = count
        self._len = (count - 1) // seq_len
        self._ids: np.ndarray | None = None
        self._map_handle: mmap.mmap | None = None
        self._reads = 0

    def __len__(self) -> int:
        return self._len

    def _map(self) -> np.ndarray:
        """The file's ids through a read-only map, made afresh every ``_REMAP_EVERY`` reads; random access (no
        read-ahead: a window is a few hundred bytes)."""
        if self._ids is None or self._reads >= _REMAP_EVERY:
            self._unmap()
            with open(self.path, "rb") as f:
                self._map_handle = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            if hasattr(mmap, "MADV_RANDOM"):
                self._map_handle.madvise(mmap.MADV_RANDOM)
            self._ids = np.frombuffer(self._map_handle, dtype=DTYPES[self.dtype])
        self._reads += 1
        return self._ids

    def _unmap(self) -> None:
        self._ids, self._reads = None, 0  # (windows are copies: no view of the map outlives it)
        if self._map_handle is not None:
            self._map_handle.close()
            self._map_handle = None

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        import torch  # noqa: PLC0415 (see the module docstring)

        if not 0 <= index < self._len:
            raise IndexError(index)
        start = index * self.seq_len
        ids = self._map()[start : start + self.seq_len + 1]
        if self.vocab_size is not None and ids.max() >= self.vocab_size:
            at = int(np.argmax(ids >= self.vocab_size))
            raise outside_vocab(self.path, self.dtype, self.vocab_size, start + at, int(ids[at]))
        window = torch.from_numpy(ids.astype(np.int64))
        return window[:-1], window[1:]

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_ids": None, "_map_handle": None, "_reads": 0}  # a worker maps the file itself


def tokenize(text: Path, out: Path, dtype: str = "uint16") -> int:
    """Write the token file of a UTF-8 text file, byte-level (id = byte, vocabulary 256: nothing to download),
    streaming (any size); atomically (a reader never sees half a file). Returns the number of ids written.
    UsageError (one line) for a text that is missing or empty, an unknown dtype, or an existing ``out``."""
    if dtype not in DTYPES:
        raise UsageError(f"--dtype {dtype!r}: one of {', '.join(DTYPES)}")
    if not text.is_file():
        raise UsageError(f"'{text}': no such file")
    if text.stat().st_size == 0:
        raise UsageError(f"'{text}' is empty: nothing to tokenize")
    if out.exists():
        raise UsageError(f"'{out}' exists. HINT: remove it, or choose another OUT")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"'{out.parent}': cannot make the folder for OUT: {exc.strerror or exc}") from None
    count = 0
    with atomic_stream(out) as sink, open(text, "rb") as source:
        while chunk := source.read(_CHUNK):
            np.frombuffer(chunk, dtype=np.uint8).astype(DTYPES[dtype]).tofile(sink)
            count += len(chunk)
    return count
