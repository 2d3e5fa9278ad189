"""Undo what a launch wrote into its run dir when its first attempt turns out to be a usage error.

Most bad input is refused before anything is written (workers.preflight). Some can only be found by the workers —
a task factory that returns the wrong object, a checkpoint of another architecture or optimizer, a bad
``train.init_from`` file — after the launcher has locked the run dir, written its config and the workers have
opened their logs. A usage error must leave the run dir as it was: this snapshot of the files a launch writes
(config, lock, logs, metrics, tracking, samples), taken before the first write, puts them back — or removes the run
dir when the launch created it. Nothing else is touched: checkpoints, wandb's files, anything of the user's.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from workers.fsutil import atomic_write
from workers.rundir import RunDir

_KEEP_BYTES = 4 << 20  # files up to this size are restored byte for byte; larger ones (long logs) are truncated


@dataclass
class RunDirSnapshot:
    """The launch-written files of a run dir as they were: sizes, and the bytes of small files."""

    paths: RunDir
    existed: bool
    files: dict[Path, tuple[int, bytes | None]] = field(default_factory=dict)
    dirs: set[Path] = field(default_factory=set)
    committed: set[Path] = field(default_factory=set)

    @classmethod
    def take(cls, paths: RunDir) -> RunDirSnapshot:
        snap = cls(paths, paths.root.is_dir(), committed={f for _, f in paths.committed_folders()})
        for path in snap._owned():
            if path.is_dir():
                snap.dirs.add(path)
            elif path.is_file():
                size = path.stat().st_size
                snap.files[path] = (size, path.read_bytes() if size <= _KEEP_BYTES else None)
        return snap

    def _owned(self) -> list[Path]:
        """The files a launch writes outside checkpoints: the run's own files and its logs and samples folders."""
        p = self.paths
        found = [p.config, p.lock, p.metrics, p.tracking, *p.metrics_attempts()]
        for folder in (p.logs, p.samples):
            found.append(folder)
            if folder.is_dir():
                found += sorted(folder.rglob("*"))
        return found

    def restore(self) -> None:
        """Put every launch-written file back as it was; remove the new ones. Best effort: never raises."""
        if {f for _, f in self.paths.committed_folders()} - self.committed:
            return  # the attempt trained far enough to commit a checkpoint: its files are the run's now
        if not self.existed:
            shutil.rmtree(self.paths.root, ignore_errors=True)
            return
        for path in sorted(self._owned(), reverse=True):  # files before the folders that hold them
            with contextlib.suppress(OSError):
                if path.is_dir() and path not in self.dirs:
                    shutil.rmtree(path, ignore_errors=True)
                elif path.is_file() and path not in self.files:
                    path.unlink()
        for path, (size, data) in self.files.items():
            with contextlib.suppress(OSError):
                if data is not None and (not path.is_file() or path.read_bytes() != data):
                    path.parent.mkdir(parents=True, exist_ok=True)
                    atomic_write(path, data)
                elif data is None and path.is_file() and path.stat().st_size > size:
                    os.truncate(path, size)  # a long log: what was appended goes
