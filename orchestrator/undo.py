"""Undo what a launch wrote into its run dir when the run turns out to be a usage error.

Most bad input is refused before anything is written (workers.preflight). Some can only be found by the workers —
a task factory that returns the wrong object, a checkpoint of another architecture or optimizer — after the
launcher has locked the run dir, written its config and the workers have opened their logs. A usage error must
leave the run dir as it was: this snapshot, taken before the first write, puts it back (or removes the run dir
when the launch created it). Checkpoints and wandb's files are not touched: nothing there changes before a usage
error except set-aside broken checkpoints, which are repairs, not input.
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
    """The run dir's files as they were (outside checkpoints and wandb): sizes, and the bytes of small files."""

    paths: RunDir
    existed: bool
    files: dict[Path, tuple[int, bytes | None]] = field(default_factory=dict)
    dirs: set[Path] = field(default_factory=set)

    @classmethod
    def take(cls, paths: RunDir) -> RunDirSnapshot:
        snap = cls(paths, paths.root.is_dir())
        for path in snap._walk():
            if path.is_dir():
                snap.dirs.add(path)
            elif path.is_file():
                size = path.stat().st_size
                snap.files[path] = (size, path.read_bytes() if size <= _KEEP_BYTES else None)
        return snap

    def _walk(self) -> list[Path]:
        skip = {self.paths.checkpoints, self.paths.wandb}
        found: list[Path] = []
        if not self.paths.root.is_dir():
            return found
        for top, dirs, names in os.walk(self.paths.root):
            base = Path(top)
            dirs[:] = [d for d in dirs if base / d not in skip]
            found += [base / d for d in dirs] + [base / n for n in names]
        return found

    def restore(self) -> None:
        """Put every file back as it was; remove what is new. Never raises (best effort, on the way out)."""
        if not self.existed:
            shutil.rmtree(self.paths.root, ignore_errors=True)
            return
        with contextlib.suppress(OSError):
            for path in sorted(self._walk(), reverse=True):  # files before the folders that hold them
                if path.is_dir() and path not in self.dirs:
                    shutil.rmtree(path, ignore_errors=True)
                elif path.is_file() and path not in self.files:
                    path.unlink(missing_ok=True)
            for path, (size, data) in self.files.items():
                if data is not None and (not path.is_file() or path.read_bytes() != data):
                    path.parent.mkdir(parents=True, exist_ok=True)
                    atomic_write(path, data)
                elif data is None and path.is_file() and path.stat().st_size > size:
                    os.truncate(path, size)  # a long log: what was appended goes
