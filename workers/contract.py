"""What crosses the process boundary between the launch side and the workers, in one place.

Exit codes, environment variable names, the per-rank error record (with an enum of failure
kinds) and the typed train state of a checkpoint (``train_state.json``). Each file format here has one reader and
one writer, and the readers treat anything malformed as corrupt (None, or CheckpointError), never as a crash.

Base layer: torch-free; imports only :mod:`workers.errors`, :mod:`workers.fsutil` and :mod:`workers.rundir`.
"""

from __future__ import annotations

import dataclasses
import enum
import errno
import json
import signal
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from workers.errors import CheckpointError, NonFiniteError, UsageError
from workers.fsutil import atomic_write, atomic_write_raw
from workers.rundir import RunDir

# ---------------------------------------------------------------- exit codes

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


# ---------------------------------------------------------------- environment variables

ENV_LAUNCHER = "ORCH_LAUNCHER"  # "launcher" when our local launcher started the process
ENV_HEARTBEAT_INTERVAL = "ORCH_HEARTBEAT_INTERVAL_S"  # seconds between heartbeat writes (default 1)
ENV_TORCHELASTIC_ERROR_FILE = "TORCHELASTIC_ERROR_FILE"  # torchrun names a per-rank error file here
ENV_SLOT = "ORCH_SLOT"  # the worker's device slot: the CUDA device index on a GPU, the original local rank on CPU
# A sweep's trial: JSON {journal, study, number, metric, prune, dir, trial, overrides}.
ENV_SWEEP_TRIAL = "ORCH_SWEEP_TRIAL"
ENV_PY_SPY = "ORCH_PY_SPY"  # the py-spy executable for stack reports ("none": do not use py-spy, faulthandler only)
# A worker dumps every thread's stack (faulthandler) to its RunDir.faulthandler_file when sent this signal: the
# stack report's fallback where py-spy cannot read the process (not installed, no ptrace permission).
STACKS_SIGNAL = signal.SIGRTMIN + 3
# What a rank's own hang watch (workers.selfwatch) adds to its HangError when its main thread waits in a collective:
# a peer that does not come is the cause, so readers rank such a record after a rank's own failure.
HANG_WAITING = "waiting in a collective for a peer"


# ---------------------------------------------------------------- failures


class FailureKind(str, enum.Enum):
    """Why a rank failed, as written into its error record; decides whether a restart can help."""

    CONFIG = "config"  # a usage error (UsageError): the user must change something
    CHECKPOINT = "checkpoint"  # an unusable checkpoint or weights file, or a failed write
    NUMERICS = "numerics"  # NaN/inf in training (NonFiniteError): an exact resume would only repeat it
    DISK = "disk"  # a full or read-only file system, wherever it was met (a log, the metrics, a checkpoint)
    EXCEPTION = "exception"  # anything else: a restart from the latest checkpoint may heal it

    @classmethod
    def of(cls, exc: BaseException) -> FailureKind:
        if isinstance(exc, UsageError):
            return cls.CONFIG
        if isinstance(exc, NonFiniteError):
            return cls.NUMERICS
        if disk_trouble(exc) is not None:
            return cls.DISK
        return cls.CHECKPOINT if isinstance(exc, CheckpointError) else cls.EXCEPTION

    @property
    def retryable(self) -> bool:
        return self is FailureKind.EXCEPTION

    @property
    def known(self) -> bool:
        """A failure the product understands: its message says all (one line); the traceback only helps us."""
        return self is not FailureKind.EXCEPTION


_DISK_ERRNOS = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is used up",
                errno.EROFS: "the file system is read-only"}  # fmt: skip


def disk_trouble(exc: BaseException) -> str | None:
    """What is wrong with the disk, when ``exc`` (or what caused it) says so: a full disk (ENOSPC, EDQUOT — also
    as torch's zip writer reports a short write: "unexpected pos") or a read-only file system; None otherwise."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in _DISK_ERRNOS:
            return _DISK_ERRNOS[exc.errno]
        if "unexpected pos" in str(exc) or "No space left on device" in str(exc):
            return _DISK_ERRNOS[errno.ENOSPC]
        exc = exc.__cause__ or exc.__context__
    return None


@dataclass(frozen=True)
class ErrorRecord:
    """A failed rank's report (``RunDir.error_file(rank)``), written by the rank, read by the launcher."""

    rank: int
    kind: FailureKind
    message: str
    traceback: str = ""
    time: float = 0.0
    job_id: str | None = None  # under SLURM: tells this job's failure from an older job's

    @classmethod
    def from_exception(cls, rank: int, exc: BaseException, job_id: str | None = None) -> ErrorRecord:
        return cls(
            rank, FailureKind.of(exc), f"{type(exc).__name__}: {exc}", "".join(traceback.format_exception(exc)),
            time.time(), job_id,
        )  # fmt: skip

    @property
    def detail(self) -> str:
        """The message without the exception's type name (what a usage error prints)."""
        return self.message.partition(": ")[2] or self.message

    def to_json(self) -> str:
        return json.dumps({**dataclasses.asdict(self), "kind": self.kind.value})

    def write(self, path: Path, raw: bool = False) -> None:
        """``raw``: through os-level writes only (fsutil.atomic_write_raw): a process whose other thread hung."""
        path.parent.mkdir(parents=True, exist_ok=True)
        (atomic_write_raw if raw else atomic_write)(path, self.to_json().encode())

    @property
    def lost_peer(self) -> bool:
        """The failure only reports that another rank vanished (a broken connection in a collective)."""
        return any(mark in self.message for mark in _PEER_LOST)

    @property
    def waited_on_peer(self) -> bool:
        """A hang the rank's own watch found while it waited in a collective: the peer it waited for is the cause."""
        return self.message.startswith("HangError: ") and HANG_WAITING in self.message

    @property
    def secondary(self) -> bool:
        """The failure only follows another rank's: it saw that rank vanish, or waited for it in a collective."""
        return self.lost_peer or self.waited_on_peer

    def write_torchelastic(self, path: Path, raw: bool = False) -> None:
        """The same failure in torchrun's error-file format, so torchrun's own summary names our root cause.

        torchrun takes the failure with the smallest timestamp, in whole seconds, as the root cause. A rank whose
        failure only follows another's (:attr:`secondary`) fails within about the same second as that rank: it is
        stamped one second later. ``raw``: as in :meth:`write`.
        """
        stamp = int(self.time) + (1 if self.secondary else 0)
        payload = {"message": {"message": self.message, "extraInfo": {
            "py_callstack": self.traceback, "timestamp": str(stamp),
        }}}  # fmt: skip
        path.parent.mkdir(parents=True, exist_ok=True)
        (atomic_write_raw if raw else atomic_write)(path, json.dumps(payload).encode())

    @classmethod
    def read(cls, path: Path) -> ErrorRecord | None:
        """The record in ``path``; None when absent or malformed (a torn write, another program's file)."""
        try:
            return cls.from_json(path.read_text())
        except (OSError, UnicodeDecodeError):
            return None

    @classmethod
    def from_json(cls, text: str) -> ErrorRecord | None:
        """Parse a record (from a file or the worker's report pipe); None when malformed."""
        try:
            data = json.loads(text)
            return cls(
                rank=_typed(data["rank"], int),
                kind=FailureKind(data["kind"]),
                message=_typed(data["message"], str),
                traceback=_typed(data.get("traceback", ""), str),
                time=float(_typed(data.get("time", 0.0), (int, float))),
                job_id=_typed(data.get("job_id"), (str, type(None))),
            )
        except (ValueError, KeyError, TypeError):
            return None


_PEER_LOST = ("Connection closed by peer", "Connection reset by peer", "DistBackendError:", "DistNetworkError:")


def first_failure(
    paths: RunDir, job_id: str | None = None, since: float = 0.0, own: bool = False
) -> ErrorRecord | None:
    """The error record of the rank that failed first (earliest time), of job ``job_id`` when given, written at or
    after ``since`` — a rank's own failure before any that only followed another's (:attr:`ErrorRecord.secondary`:
    a rank that saw its peer vanish, or whose watch found it waiting in a collective for a hung peer); ``own``: a
    rank's own failure only."""
    errors = [e for p in paths.error_files() if (e := ErrorRecord.read(p)) is not None]
    errors = [e for e in errors if (job_id is None or e.job_id == job_id) and e.time >= since]
    errors = [e for e in errors if not (own and e.secondary)]
    return min(errors, key=lambda e: (e.secondary, e.time)) if errors else None


def is_int(value: Any) -> bool:
    """An integer in a JSON file the product reads back (``true`` is not one, though Python says it is)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _typed(value: Any, types: type | tuple[type, ...]) -> Any:
    if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        raise TypeError("a boolean where a number is expected")
    if not isinstance(value, types):
        raise TypeError(f"{value!r} is not {types}")
    return value


# ---------------------------------------------------------------- the train state of a checkpoint


ORDER_SCHEMES = ("feistel", "randperm")  # the global order's schemes (workers.data.order); train_state's ``order``
LEGACY_ORDER = "randperm"  # what a checkpoint without ``order`` was written with


@dataclass(frozen=True)
class TrainState:
    """``train_state.json`` of a checkpoint: the world-size-independent position of the run (JSON, not pickle).

    Fields added after the first format are optional (None) so older checkpoints still read; unknown keys are kept
    in ``extra`` and written back unchanged.
    """

    step: int
    samples_seen: int
    world_size: int
    global_batch_size: int
    seed: int
    max_steps: int | None = None
    task: str | None = None
    tracking_run_id: str | None = None
    dataset_len: int | None = None
    task_args: dict[str, Any] | None = None
    torch: str | None = None
    time: float | None = None
    optimizer: str | None = None  # the optimizer's class name (a resume with another optimizer is refused)
    selection: dict[str, Any] | None = None  # model selection (workers.eval.selection): best, k best, patience counter
    nonfinite_skipped: int | None = None  # steps skipped for non-finite gradients so far (train.nonfinite)
    nonfinite_streak: int | None = None  # consecutive ones up to this step (a resume continues the count)
    parallel: str | None = None  # train.parallel at save: "ddp" (model.pt + optim.pt) | "fsdp" (shards under dcp/)
    order: str | None = None  # the global order's scheme (ORDER_SCHEMES); None: written before it, LEGACY_ORDER
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        return json.dumps({**self.extra, **data}, indent=1)

    @classmethod
    def from_json(cls, text: str, where: str = "train_state.json") -> TrainState:
        """Parse and check every field; CheckpointError naming ``where`` and the first bad field otherwise."""
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise CheckpointError(f"'{where}' is not JSON: {exc}") from None
        if not isinstance(data, dict):
            raise CheckpointError(f"'{where}' is not a JSON object")
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            if f.name == "extra":
                continue
            types, required = _STATE_TYPES[f.name]
            if f.name not in data or data[f.name] is None:
                if required:
                    raise CheckpointError(f"'{where}' lacks '{f.name}'")
                continue
            value = data[f.name]
            if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
                raise CheckpointError(f"'{where}': '{f.name}' = {value!r} is not {'/'.join(t.__name__ for t in types)}")
            if f.name in _NON_NEGATIVE and value < 0:
                raise CheckpointError(f"'{where}': '{f.name}' = {value!r} is negative")
            values[f.name] = value
        if "selection" in values:
            check_selection_state(values["selection"], where)
        if values.get("order", LEGACY_ORDER) not in ORDER_SCHEMES:
            raise CheckpointError(f"'{where}': 'order' = {values['order']!r} is not one of {', '.join(ORDER_SCHEMES)}")
        extra = {k: v for k, v in data.items() if k not in values and k not in _STATE_TYPES}
        return cls(**values, extra=extra)

    @classmethod
    def read(cls, path: Path) -> TrainState:
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"'{path}' is unreadable: {exc}") from None
        return cls.from_json(text, str(path))


_STATE_TYPES: dict[str, tuple[tuple[type, ...], bool]] = {
    "step": ((int,), True), "samples_seen": ((int,), True), "world_size": ((int,), True),
    "global_batch_size": ((int,), True), "seed": ((int,), True), "max_steps": ((int,), False),
    "task": ((str,), False), "tracking_run_id": ((str,), False), "dataset_len": ((int,), False),
    "task_args": ((dict,), False), "torch": ((str,), False), "time": ((int, float), False),
    "optimizer": ((str,), False), "selection": ((dict,), False), "nonfinite_skipped": ((int,), False),
    "nonfinite_streak": ((int,), False), "parallel": ((str,), False), "order": ((str,), False),
}  # fmt: skip
_NON_NEGATIVE = {
    "step", "samples_seen", "world_size", "global_batch_size", "seed", "max_steps", "dataset_len",
    "nonfinite_skipped", "nonfinite_streak",
}  # fmt: skip


def check_selection_state(data: Any, where: str) -> None:
    """Schema of ``train_state.json``'s ``selection``: CheckpointError naming ``where`` when malformed."""
    ok = (
        isinstance(data, dict) and isinstance(data.get("metric"), str) and data.get("mode") in ("min", "max")
        and (data.get("best_step") is None or is_int(data["best_step"]))
        and (data.get("best_value") is None or is_number(data["best_value"]))
        and (data.get("ref_value") is None or is_number(data["ref_value"]))
        and (data.get("last_eval_step") is None or is_int(data["last_eval_step"]))
        and is_int(data.get("bad_evals")) and isinstance(data.get("ranked"), list)
        and all(isinstance(e, list) and len(e) == 2 and is_int(e[0]) and is_number(e[1]) for e in data["ranked"])
    )  # fmt: skip
    if not ok:
        raise CheckpointError(f"'{where}': 'selection' is malformed")
