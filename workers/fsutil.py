"""Small file-system helpers shared by checkpoints, configs, error records and exports (torch-free)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, BinaryIO

import xxhash

# Checksums of manifest entries (one owner: this module). New entries carry xxh3_128 (~5 GB/s here against
# sha256's ~1.3 GB/s, which held a synchronous save to a third of the disk's bandwidth); entries of checkpoints
# written before carry sha256 and still verify. A checksum guards against corruption (torn, truncated, bit-rotten
# files); it is no signature — whoever can write a checkpoint can write its manifest, so loading stays safe by
# other means (weights_only=True, restricted unpicklers).
DIGESTS: dict[str, tuple[Any, int]] = {"xxh3_128": (xxhash.xxh3_128, 32), "sha256": (hashlib.sha256, 64)}
NEW_DIGEST = "xxh3_128"


def digest_of(entry: dict[str, Any]) -> tuple[str, str] | None:
    """(algorithm, hex digest) of a manifest entry, or None when it has no well-formed one."""
    for name, (_, length) in DIGESTS.items():
        value = entry.get(name)
        if isinstance(value, str) and len(value) == length:
            return name, value
    return None


def file_digest(path: Path, algorithm: str = NEW_DIGEST, chunk: int = 1 << 24) -> str:
    """The file's digest, read in 16 MiB chunks (a 10 GB optimizer state must not need 10 GB of RAM)."""
    digest = DIGESTS[algorithm][0]()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durable(path: Path, data: bytes) -> dict[str, int | str]:
    """Write ``data`` to ``path``, flush and fsync; return ``{"size", NEW_DIGEST}`` (a manifest entry)."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return {"size": len(data), NEW_DIGEST: DIGESTS[NEW_DIGEST][0](data).hexdigest()}


def atomic_write(path: Path, data: bytes | str) -> None:
    """Replace ``path`` atomically: write a hidden sibling, fsync it, rename it over ``path``, fsync the folder.

    Readers see the old content or the new one, never a part; a kill leaves at worst a ``.tmp-*`` sibling.
    """
    path = Path(path)
    tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}")
    try:
        write_durable(tmp, data.encode() if isinstance(data, str) else data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a failed write (full disk, a folder in the way) leaves nothing behind
        raise
    fsync_dir(path.parent)


def atomic_write_raw(path: Path, data: bytes) -> None:
    """:func:`atomic_write` through os-level calls only (``os.open``/``os.write``, no Python file object, no
    logging): it takes no lock another thread may hold — for a process that ends because one of its threads hung
    (workers.selfwatch), where a buffered file or a logging handler could block forever."""
    path = Path(path)
    tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            view = memoryview(data)
            while view:  # os.write may write less than asked
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_stream(path: Path) -> Iterator[BinaryIO]:
    """:func:`atomic_write` for content written piece by piece: a binary file to write; at the end of the block it
    is fsynced and renamed over ``path``; an error (or a kill) inside leaves ``path`` as it was."""
    path = Path(path)
    tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}")
    try:
        with open(tmp, "wb") as sink:
            yield sink
            sink.flush()
            os.fsync(sink.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def append_line(path: Path, row: dict[str, Any]) -> None:
    """Append ``row`` as one JSON line (one small write, fsynced: an event log survives a crash right after)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_lines(path: Path) -> list[dict[str, Any]]:
    """The JSON objects of an event log, oldest first; a torn or malformed line, or one without an ``event``
    name, is skipped."""
    rows = []
    if path.is_file():
        for line in path.read_text(errors="replace").splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict) and isinstance(row.get("event"), str):
                rows.append(row)
    return rows


class RunDirLock:
    """An exclusive ``flock`` on the run dir's lock file (``RunDir.lock``) held for a whole launch: two launches
    never share a run dir.

    The kernel drops the lock when the holder dies (even by SIGKILL), so there is no stale lock to clean up.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._fd: int | None = None

    # How long a lock whose launcher is gone may still be held: its workers hold it too (workers.lifeline) and end
    # within moments of their launcher; a relaunch right after a `kill -9` waits for them instead of failing.
    DEAD_HOLDER_WAIT_S = 30.0

    def acquire(self) -> RunDirLock:
        """Take the lock or raise BlockingIOError naming the holder's pid. A lock held after its launcher died
        (by the launch's last workers, on their way out) is waited for, up to ``DEAD_HOLDER_WAIT_S``."""
        import fcntl  # noqa: PLC0415 - POSIX only

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline, told = time.monotonic() + self.DEAD_HOLDER_WAIT_S, False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
                if not _pid_gone(holder) or time.monotonic() > deadline:
                    os.close(fd)
                    raise BlockingIOError(
                        f"run dir '{self.path.parent}' is in use by another launch (pid {holder})"
                    ) from None
                if not told:
                    logging.getLogger("workers").warning(
                        "run dir %s: the launch that held it (pid %s) is gone; waiting for its workers to exit",
                        self.path.parent, holder,
                    )  # fmt: skip
                    told = True
                time.sleep(0.1)
                continue
            except OSError as exc:  # a file system without flock (some NFS / Lustre mounts): run unguarded
                logging.getLogger("workers").warning("cannot lock %s (%s): two launches could share it", self.path, exc)
            break
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    @staticmethod
    def is_held(path: Path) -> bool:
        """Whether a launch holds the lock at ``path`` now. Read-only: opens the file for reading, tries a shared
        lock and lets it go; it creates, writes and waits for nothing (``status`` must change nothing)."""
        import fcntl  # noqa: PLC0415 - POSIX only

        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            return False  # no lock file: no launch ever held it here
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        except OSError:
            return False  # no flock on this file system: cannot tell
        finally:
            os.close(fd)  # drops the shared lock, if taken
        return False

    @property
    def fd(self) -> int | None:
        """The locked open file (None when not held): a process that holds a copy of it holds the lock too."""
        return self._fd

    def lost(self) -> str | None:
        """Why the lock no longer guards the run dir — ``"deleted"`` or ``"replaced"`` (another launch's lock file
        stands at the path now) — or None while it does."""
        if self._fd is None:
            return None
        try:
            there = os.stat(self.path)
        except FileNotFoundError:
            return "deleted"
        except OSError:
            return None  # cannot tell (a flaky file system): not a reason to stop a run
        mine = os.fstat(self._fd)
        return None if (there.st_dev, there.st_ino) == (mine.st_dev, mine.st_ino) else "replaced"

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock
            self._fd = None


def _pid_gone(text: str) -> bool:
    """The lock file's pid names no live process (not a number: cannot tell, so not gone). A lock held by another
    host's launch on a shared file system would look gone here: it is then only waited for, never taken."""
    try:
        os.kill(int(text), 0)
    except ValueError:
        return False
    except ProcessLookupError:
        return True
    except OSError:  # EPERM: alive, another user's
        return False
    return False


_POOL: ThreadPoolExecutor | None = None


def _hash_pool() -> ThreadPoolExecutor:
    """The threads that checksum big chunks while they are written (shared: the training thread's saves and the
    background commit's never need more than one each)."""
    global _POOL
    if _POOL is None:
        _POOL = ThreadPoolExecutor(max_workers=2, thread_name_prefix="checksum")
    return _POOL


class HashingWriter:
    """A write-only file object that hashes (``NEW_DIGEST``) and counts what passes through it to ``f``.

    Lets ``torch.save`` stream straight to disk while the manifest entry is computed on the way: no second
    in-memory copy of the state, no second read of the file.
    """

    def __init__(self, f) -> None:
        self.f, self.digest, self.size = f, DIGESTS[NEW_DIGEST][0](), 0

    _PARALLEL_BYTES = 1 << 20  # below this, handing the chunk to another thread costs more than it saves

    def write(self, data: bytes) -> int:
        size = memoryview(data).nbytes
        self.size += size
        if size < self._PARALLEL_BYTES:
            self.digest.update(data)
            return self.f.write(data)
        # Hash and write the same chunk at once (both release the GIL); the chunk is neither changed nor freed
        # before this call returns, and chunks are hashed in order because each waits for its own.
        hashed = _hash_pool().submit(self.digest.update, data)
        try:
            return self.f.write(data)
        finally:
            hashed.result()

    def flush(self) -> None:
        self.f.flush()

    def entry(self) -> dict[str, int | str]:
        return {"size": self.size, NEW_DIGEST: self.digest.hexdigest()}
