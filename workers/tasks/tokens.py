"""Token files: a flat binary of token ids (``uint16`` or ``uint32``, native byte order, no header), read through a
memory map: a dataset of any size trains with memory that does not grow with the file (nanoGPT's and Megatron's
format). This module owns the format: :class:`TokenWindows` reads it, :func:`tokenize` writes it.

Sample ``i`` is the window ``ids[i*seq_len : i*seq_len + seq_len + 1]`` (input and next-token target), so a file of
``T`` ids holds ``(T - 1) // seq_len`` samples. The file is opened once, when the dataset is made, and every map is
made from that descriptor: a file renamed over the path during the run is never read (the run keeps the file it
checked), and one whose size changes in place is refused. A spawned loader worker gets the dataset pickled as its
path and opens it again, refusing another file than the one the rank opened.

No torch import at module level: ``orchestrator data tokenize`` needs none.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import weakref
from pathlib import Path
from stat import S_ISREG
from typing import Any, BinaryIO

import numpy as np

from workers.contract import disk_trouble, is_int
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
_LEAVE_IT = "leave a token file as it is while a run reads it; write new data to a new file"


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


def open_token_file(path: str, dtype: str, key: str) -> tuple[int, os.stat_result]:
    """A read-only descriptor of ``path`` and its stat; ConfigError naming ``key`` (the descriptor closed) when it is
    missing, not a file, empty or not a whole number of ``dtype`` ids."""
    hint = "HINT: make one with `orchestrator data tokenize TEXT OUT`"
    try:  # (O_NONBLOCK: a FIFO at the path must not block the open; it changes nothing for a file)
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as exc:
        raise ConfigError(f"config key '{key}' = {path!r}: {exc.strerror or exc}. {hint}") from None
    stat, width = os.fstat(fd), np.dtype(DTYPES[dtype]).itemsize
    problem = None
    if not S_ISREG(stat.st_mode) or stat.st_size == 0:
        problem = f"{'empty' if S_ISREG(stat.st_mode) else 'not a file'}. {hint}"
    elif stat.st_size % width:
        problem = (f"{stat.st_size} bytes is not a whole number of {dtype} ids ({width} bytes each). "
                   "HINT: is task.args.dtype the one the file was written with?")  # fmt: skip
    if problem:
        os.close(fd)
        raise ConfigError(f"config key '{key}' = {path!r}: {problem}")
    return fd, stat


def first_id_outside(fd: int, dtype: str, vocab_size: int) -> tuple[int, int] | None:
    """``(position, id)`` of the first id of the token file open as ``fd`` at or above ``vocab_size``; None when
    every id is below it. Reads 1 MiB at a time from the start: memory does not grow with the file."""
    width = np.dtype(DTYPES[dtype])
    if vocab_size > np.iinfo(width).max:
        return None  # every id the file's width can hold is in the vocabulary
    buffer, offset = bytearray(_SCAN_CHUNK), 0
    while size := os.preadv(fd, [buffer], offset):  # (a file's read is whole but at its end: whole ids)
        ids = np.frombuffer(buffer, width, count=size // width.itemsize)
        if ids.max() >= vocab_size:
            at = int(np.argmax(ids >= vocab_size))
            return offset // width.itemsize + at, int(ids[at])
        offset += size
    return None


def outside_vocab(path: str, dtype: str, vocab_size: int, position: int, token: int) -> ConfigError:
    """The usage error of a token id at or above ``task.args.vocab_size`` (an embedding would fail less clearly,
    and a restart would read the same id)."""
    return ConfigError(
        f"config key 'task.args.vocab_size' = {vocab_size}: {path!r} holds token id {token} (id number {position} of "
        f"the file), outside the vocabulary. HINT: set task.args.vocab_size to the tokenizer's vocabulary size (above "
        f"{token}), and task.args.dtype (now {dtype}) to the width the file was written with"
    )


def _check_windows(fd: int, size: int, path: str, seq_len: int, dtype: str, vocab_size: int | None) -> int:
    """The number of ids of the token file open as ``fd``; ConfigError when it is too short for one window, or
    (for a file of at most ``_SCAN_LIMIT`` bytes) holds an id outside the vocabulary."""
    count = size // np.dtype(DTYPES[dtype]).itemsize
    if count < seq_len + 1:
        raise ConfigError(
            f"config key 'task.args.seq_len' = {seq_len}: larger than {path!r} allows ({count} ids; a window "
            f"takes seq_len + 1). HINT: a smaller seq_len, or a longer file"
        )
    found = first_id_outside(fd, dtype, vocab_size) if vocab_size is not None and size <= _SCAN_LIMIT else None
    if found is not None:
        raise outside_vocab(path, dtype, vocab_size, *found)
    return count


class TokenWindows:
    """Map-style dataset over a token file: ``(input, target)`` long tensors of ``seq_len`` ids each."""

    def __init__(self, path: str, seq_len: int, dtype: str = "uint16", vocab_size: int | None = None,
                 key: str = "task.args.tokens") -> None:  # fmt: skip
        """``vocab_size``: ids at or above it are refused (:func:`outside_vocab`): in the whole file now, when it is
        at most ``_SCAN_LIMIT`` bytes; else in each window as it is read."""
        check_window_args(seq_len, dtype, vocab_size)
        fd, stat = open_token_file(path, dtype, key)
        try:
            count = _check_windows(fd, stat.st_size, path, seq_len, dtype, vocab_size)
        except BaseException:
            os.close(fd)
            raise
        self.path, self.seq_len, self.dtype, self.vocab_size, self.key = path, seq_len, dtype, vocab_size, key
        self.tokens, self._len = count, (count - 1) // seq_len
        self._file = (stat.st_dev, stat.st_ino, stat.st_size)  # the file this dataset checked, and reads
        self._fd: int | None = fd
        self._closer: weakref.finalize | None = weakref.finalize(self, os.close, fd)  # closed with the dataset
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
            fd = self._descriptor()
            size = os.fstat(fd).st_size
            if size != self._file[2]:  # written to in place: the windows and the checks no longer hold
                raise ConfigError(
                    f"config key '{self.key}' = {self.path!r}: the file changed while the run read it ({self._file[2]} "
                    f"bytes when it opened, now {size}). HINT: {_LEAVE_IT}"
                )
            self._map_handle = mmap.mmap(fd, size, access=mmap.ACCESS_READ)
            if hasattr(mmap, "MADV_RANDOM"):
                self._map_handle.madvise(mmap.MADV_RANDOM)
            self._ids = np.frombuffer(self._map_handle, dtype=DTYPES[self.dtype])
        self._reads += 1
        return self._ids

    def _descriptor(self) -> int:
        """The open file; in a process that got the dataset pickled (a spawned loader worker), the path opened again,
        refused when it is no longer the file the rank opened."""
        if self._fd is None:
            fd, stat = open_token_file(self.path, self.dtype, self.key)
            if (stat.st_dev, stat.st_ino) != self._file[:2]:
                os.close(fd)
                raise ConfigError(
                    f"config key '{self.key}' = {self.path!r}: another file took its place after the run opened it. "
                    f"HINT: {_LEAVE_IT}"
                )
            self._fd, self._closer = fd, weakref.finalize(self, os.close, fd)
        return self._fd

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
        # A spawned loader worker opens and maps the file itself (a forked one inherits the descriptor).
        return {**self.__dict__, "_fd": None, "_closer": None, "_ids": None, "_map_handle": None, "_reads": 0}


def tokenize(text: Path, out: Path, dtype: str = "uint16") -> int:
    """Write the token file of a UTF-8 text file, byte-level (id = byte, vocabulary 256: nothing to download),
    streaming (any size); atomically (a reader never sees half a file). Returns the number of ids written.
    UsageError (one line) for a text that is missing, empty or unreadable, an unknown dtype, an existing ``out``, or
    a write that fails (a full disk, a read-only folder): then nothing it made is left, folders included."""
    if dtype not in DTYPES:
        raise UsageError(f"--dtype {dtype!r}: one of {', '.join(DTYPES)}")
    if not text.is_file():
        raise UsageError(f"'{text}': no such file")
    if text.stat().st_size == 0:
        raise UsageError(f"'{text}' is empty: nothing to tokenize")
    if out.exists():
        raise UsageError(f"'{out}' exists. HINT: remove it, or choose another OUT")
    try:
        source = open(text, "rb")  # noqa: SIM115 (the with below closes it)
    except OSError as exc:
        raise UsageError(f"'{text}': cannot be read ({exc.strerror or exc})") from None
    with source:
        made = _make_folders(out.parent)
        try:
            return _write_ids(source, out, DTYPES[dtype])
        except BaseException as exc:
            for folder in made:  # the deepest first; empty: atomic_stream removed its temporary file
                with contextlib.suppress(OSError):
                    folder.rmdir()
            if not isinstance(exc, OSError):
                raise
            width = np.dtype(DTYPES[dtype]).itemsize
            raise UsageError(
                f"'{out}': tokenizing '{text}' into it failed ({disk_trouble(exc) or exc.strerror or exc}); nothing "
                f"was left behind. HINT: an OUT in a folder you may write to, with room for {width} bytes a byte of "
                "TEXT"
            ) from None


def _make_folders(folder: Path) -> list[Path]:
    """Make ``folder`` and its missing parents; the ones made, the deepest first. UsageError (none left) when it
    cannot."""
    missing = []
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    for made, path in enumerate(reversed(missing)):
        try:
            path.mkdir()
        except OSError as exc:
            for done in missing[len(missing) - made :]:
                with contextlib.suppress(OSError):
                    done.rmdir()
            raise UsageError(f"'{path}': cannot make the folder for OUT: {exc.strerror or exc}") from None
    return missing


def _write_ids(source: BinaryIO, out: Path, dtype: type) -> int:
    count = 0
    with atomic_stream(out) as sink:
        while chunk := source.read(_CHUNK):
            sink.write(np.frombuffer(chunk, dtype=np.uint8).astype(dtype))  # (tofile's short write has no errno)
            count += len(chunk)
    return count
