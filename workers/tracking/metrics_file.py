"""The run's metrics file (``RunDir.metrics``) and its tracking file (the wandb run id): written by rank 0,
read by ``orchestrator status``/``plot``. A row is a JSON object with an integer ``step``.
"""

from __future__ import annotations

import json
import logging
import re
import secrets
from pathlib import Path
from typing import Any

from workers.contract import is_int
from workers.fsutil import atomic_write
from workers.rundir import RunDir

log = logging.getLogger("workers.tracking")


def read_run_id(paths: RunDir) -> str | None:
    """The run's wandb run id from its tracking file; None when absent or malformed."""
    try:
        rid = json.loads(paths.tracking.read_text())["wandb_run_id"]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError):
        return None
    return rid if isinstance(rid, str) and re.fullmatch(r"[A-Za-z0-9_-]{1,128}", rid) else None


def run_id(paths: RunDir) -> str:
    """The run's tracking id: read from the tracking file, created there on first use. Rank 0 only."""
    rid = read_run_id(paths)
    if rid is not None:
        return rid
    if paths.tracking.exists():
        log.warning("%s is malformed: starting a new wandb run id (the old run is not continued)", paths.tracking)
    rid = secrets.token_hex(4)
    paths.root.mkdir(parents=True, exist_ok=True)
    atomic_write(paths.tracking, json.dumps({"wandb_run_id": rid}) + "\n")
    return rid


def read_metrics(paths: RunDir) -> list[dict[str, Any]]:
    """The rows of the run's metrics file: JSON objects with an integer ``step`` (a line torn by a kill, or
    anything else malformed, is skipped)."""
    rows, skipped = [], 0
    if paths.metrics.exists():
        lines = paths.metrics.read_text(errors="replace").splitlines()
        for number, line in enumerate(lines, 1):
            try:
                row = json.loads(line)
            except ValueError:
                row = None
            if isinstance(row, dict) and is_int(row.get("step")):
                rows.append(row)
            elif line.strip() and number < len(lines):  # a torn last line is a kill's normal trace, not damage
                skipped += 1
    if skipped:
        log.warning("%s: skipped %d malformed row(s) (not a JSON object with an integer step)", paths.metrics, skipped)
    return rows


def _drop_torn_last_line(path: Path) -> None:
    """A kill in the middle of an append leaves a partial last line: cut it so the file stays valid JSONL."""
    if not path.exists():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        atomic_write(path, data[: data.rfind(b"\n") + 1])


def set_aside_dead_rows(paths: RunDir, start_step: int) -> None:
    """At a start from ``start_step``, rows of later steps belong to an attempt that died after its last
    checkpoint (or, with another config, a run that started over): move them to ``metrics.attempt-<n>.jsonl`` so
    the metrics file always describes the run its checkpoints describe. Rank 0, before any row is written."""
    if not paths.metrics.exists():
        return
    keep, dead, malformed = [], [], 0
    for line in paths.metrics.read_text(errors="replace").splitlines(keepends=True):
        try:
            step = json.loads(line).get("step")
        except (ValueError, AttributeError):
            step = None
        malformed += not is_int(step) and bool(line.strip())
        (dead if is_int(step) and step > start_step else keep).append(line)
    if malformed:  # kept where they are (readers skip them): damage is reported, never "repaired" away
        log.warning(
            "%s: skipped %d malformed row(s) (not a JSON object with an integer step)", paths.metrics, malformed
        )
    if not dead:
        return
    aside = paths.metrics_attempt(len(paths.metrics_attempts()) + 1)
    atomic_write(aside, "".join(dead))  # first: a kill in between duplicates rows, never loses them
    atomic_write(paths.metrics, "".join(keep))
    log.warning(
        "%s: %d row(s) after step %d belong to an attempt that ended without a later checkpoint; moved to %s",
        paths.metrics.name, len(dead), start_step, aside.name,
    )  # fmt: skip


class JsonlSink:
    """Appends one JSON object per logged step to the run's metrics file; the rows reach the file at
    :meth:`flush` at the latest (earlier whenever the file's 8 KiB buffer fills, so a large batch takes several
    writes). Rows are appended in order, so a kill keeps every flushed row and tears at most the last line being
    written (readers skip it; the next start cuts it).
    """

    def __init__(self, paths: RunDir, start_step: int) -> None:
        self.path = paths.metrics
        _drop_torn_last_line(self.path)
        set_aside_dead_rows(paths, start_step)
        self.skip_through = start_step
        self._file = None

    def log(self, step: int, row: dict[str, Any]) -> None:
        if self._file is None:
            self._file = open(self.path, "a")  # noqa: SIM115 - kept open; written through at each flush
        self._file.write(json.dumps({"step": step, **row}) + "\n")

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()

    def finish(self, quick: bool = False) -> None:
        if self._file is not None:
            self._file.close()
