"""The run directory: the one owner of every path of a run (submitit's ``JobPaths`` is the model).

Both sides use it — the launcher, the workers, the SLURM job side and the CLI tools — and it is passed explicitly.
No other module of the two packages spells a name of the run dir's layout (tests/test_architecture.py checks).
Torch-free and import-free (base layer): the launcher uses it before torch is imported.

Layout (README.md, "Run directory")::

    config.yaml                      the resolved config of the run
    .lock                            held (flock) by the launch that runs it
    checkpoints/step-00000040/       one committed checkpoint (model.pt, optim.pt, train_state.json, manifest.json)
    checkpoints/latest, best         the bare name of the newest / the best (evaluation) committed folder
    logs/rank-<r>.log                each rank's log
    logs/error-rank-<r>.json         a failed rank's error record (workers.contract.ErrorRecord)
    logs/heartbeat-rank-<r>.json     a rank's liveness (workers.heartbeat)
    logs/stacks-<attempt>.txt        every rank's stacks when the launcher judged the attempt hung
    logs/stacks-<attempt>.rank<r>.txt   a rank's stacks when its own watch found the attempt hung (torchrun, SLURM)
    logs/faulthandler-rank-<r>.txt   a rank's own stack dumps (the report's fallback where py-spy cannot read it)
    logs/nccl-trace-rank-<r>         NCCL's flight recorder dump at a collective timeout (GPUs)
    events.jsonl                     the local launcher's event log (restarts, dropped slots: elastic capacity)
    metrics.jsonl                    one JSON row per logged step
    metrics.attempt-<n>.jsonl        rows of an attempt that died after its last checkpoint (moved aside at restart)
    tracking.json, wandb/            the wandb run id; wandb's own files
    samples/rank-<r>.jsonl           audit trail of consumed sample indices (``data.record_indices``)
    profile/trace-rank-<r>-steps-<a>-<b>.json   a Chrome trace of steps a..b on rank r (``profile``)
    slurm/jobs.json, events.jsonl    submitted job ids; the job side's event log
    slurm/submitit/<job id>/         submitit's scripts and per-task stdout/stderr
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

# Inside one checkpoint folder. The manifest is written last: it is the commit marker.
MODEL_FILE, OPTIM_FILE, STATE_FILE, MANIFEST_FILE = "model.pt", "optim.pt", "train_state.json", "manifest.json"
CONFIG_FILE = "config.yaml"
_STEP_DIR = re.compile(r"^step-(\d{8})$")
_SET_ASIDE = re.compile(r"^step-(\d{8})\.invalid-(\d{8}-\d{6})-\d+$")
_STACKS = re.compile(r"^stacks-(\d+)(?:\.rank\d+)?\.txt$")
_RANK_STACKS = re.compile(r"\.rank(\d+)\.txt$")


def step_dir_name(step: int) -> str:
    """``step-00000040``: the name of the checkpoint folder of global step ``step``."""
    return f"step-{step:08d}"


def step_of(name: str) -> int | None:
    """The step of a checkpoint folder name (``step-00000040`` → 40); None for any other name."""
    match = _STEP_DIR.match(name)
    return int(match.group(1)) if match else None


def step_folders(ckpt_dir: Path) -> list[tuple[int, Path]]:
    """All ``step-XXXXXXXX`` folders under ``ckpt_dir`` (committed or not), newest first."""
    if not ckpt_dir.is_dir():
        return []
    found = [(s, p) for p in ckpt_dir.iterdir() if (s := step_of(p.name)) is not None and p.is_dir()]
    return sorted(found, reverse=True)


def _name_in(pointer: Path) -> str | None:
    """The step folder name a pointer file (``latest``, ``best``) holds, or None."""
    try:
        name = pointer.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None
    return name if step_of(name) is not None else None


@dataclass(frozen=True)
class RunDir:
    """Every path of one run. Pure path arithmetic: nothing here touches the disk except the scans."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))  # a str is accepted too

    # ---------------------------------------------------------------- the run
    @property
    def config(self) -> Path:
        return self.root / CONFIG_FILE

    @property
    def lock(self) -> Path:
        return self.root / ".lock"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    def metrics_attempt(self, n: int) -> Path:
        """Where the rows of a dead attempt go (rows after the step the next start resumed from)."""
        return self.root / f"metrics.attempt-{n}.jsonl"

    def metrics_attempts(self) -> list[Path]:
        return sorted(self.root.glob("metrics.attempt-*.jsonl")) if self.root.is_dir() else []

    @property
    def tracking(self) -> Path:
        return self.root / "tracking.json"

    @property
    def wandb(self) -> Path:
        return self.root / "wandb"

    def holds_a_run(self) -> bool:
        """Whether ``root`` carries a mark that only a run leaves: the lock file (every launch, the torchrun and
        SLURM entries included, takes it before it writes anything else), the checkpoints folder, or the job record
        of a run submitted to SLURM. A ``config.yaml`` or ``logs/`` alone is no such mark: users have their own."""
        return self.lock.is_file() or self.checkpoints.is_dir() or self.slurm_jobs.is_file()

    # ---------------------------------------------------------------- checkpoints
    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def latest(self) -> Path:
        return self.checkpoints / "latest"

    @property
    def best(self) -> Path:
        return self.checkpoints / "best"

    def best_name(self) -> str | None:
        """What ``checkpoints/best`` names, or None (absent, unreadable, or not a step folder name)."""
        return _name_in(self.best)

    def step_dir(self, step: int) -> Path:
        return self.checkpoints / step_dir_name(step)

    def step_folders(self) -> list[tuple[int, Path]]:
        """All checkpoint folders (committed or not), newest first."""
        return step_folders(self.checkpoints)

    def set_aside_folders(self) -> list[Path]:
        """Broken checkpoint folders kept for inspection (``step-XXXXXXXX.invalid-<time>-<pid>``), oldest first."""
        if not self.checkpoints.is_dir():
            return []
        found = [p for p in self.checkpoints.iterdir() if _SET_ASIDE.match(p.name) and p.is_dir()]
        return sorted(found, key=lambda p: (_SET_ASIDE.match(p.name).group(2), p.name))

    @staticmethod
    def set_aside_name(folder: Path, stamp: str, pid: int) -> Path:
        """Where a broken checkpoint folder is moved: beside it, renamed so no scan takes it for a checkpoint."""
        return folder.with_name(f"{folder.name}.invalid-{stamp}-{pid}")

    def committed_folders(self) -> list[tuple[int, Path]]:
        """Folders holding a manifest (the commit marker), newest first; not verified (no hashing here)."""
        return [(s, f) for s, f in self.step_folders() if (f / MANIFEST_FILE).is_file()]

    def latest_name(self) -> str | None:
        """What ``checkpoints/latest`` names, or None (absent, unreadable, or not a step folder name)."""
        return _name_in(self.latest)

    # ---------------------------------------------------------------- per rank
    @property
    def logs(self) -> Path:
        return self.root / "logs"

    def rank_log(self, rank: int) -> Path:
        return self.logs / f"rank-{rank}.log"

    def error_file(self, rank: int) -> Path:
        return self.logs / f"error-rank-{rank}.json"

    def error_files(self) -> list[Path]:
        return sorted(self.logs.glob("error-rank-*.json")) if self.logs.is_dir() else []

    def heartbeat_file(self, rank: int) -> Path:
        return self.logs / f"heartbeat-rank-{rank}.json"

    @property
    def profile(self) -> Path:
        return self.root / "profile"

    def profile_trace(self, rank: int, first: int, last: int) -> Path:
        """The Chrome trace (torch.profiler) of steps ``first..last`` on ``rank``."""
        return self.profile / f"trace-rank-{rank}-steps-{first}-{last}.json"

    def faulthandler_file(self, rank: int) -> Path:
        """Where a rank's faulthandler writes every thread's stack on the stacks signal (workers.contract)."""
        return self.logs / f"faulthandler-rank-{rank}.txt"

    @property
    def nccl_trace_prefix(self) -> Path:
        """torch's NCCL flight recorder dumps here, the rank's number appended (on a collective timeout)."""
        return self.logs / "nccl-trace-rank-"

    def stacks_file(self, attempt: int) -> Path:
        """Every rank's stacks, taken by the local launcher when it judged attempt ``attempt`` (0: the first) hung."""
        return self.logs / f"stacks-{attempt}.txt"

    def rank_stacks_file(self, attempt: int, rank: int) -> Path:
        """One rank's stacks, written by the rank's own watch (workers.selfwatch: torchrun, SLURM) when it found
        attempt ``attempt`` hung — a file per rank, so ranks on other nodes of a shared (NFS) file system never
        append to the same file (O_APPEND is not atomic across NFS clients)."""
        return self.logs / f"stacks-{attempt}.rank{rank}.txt"

    def rank_stacks_files(self, attempt: int) -> list[Path]:
        """The per-rank stacks files of attempt ``attempt``, in rank order (rank 10 after rank 2)."""
        if not self.logs.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.logs.glob(f"stacks-{attempt}.rank*.txt")
                 if (m := _RANK_STACKS.search(p.name))]  # fmt: skip
        return [p for _, p in sorted(found)]

    def stacks_attempts(self) -> list[int]:
        """The attempts that have a stacks file (the launcher's, or any rank's), oldest first."""
        if not self.logs.is_dir():
            return []
        return sorted({int(m.group(1)) for p in self.logs.glob("stacks-*.txt") if (m := _STACKS.match(p.name))})

    def heartbeat_files(self) -> list[Path]:
        return sorted(self.logs.glob("heartbeat-rank-*.json")) if self.logs.is_dir() else []

    @property
    def samples(self) -> Path:
        return self.root / "samples"

    def samples_file(self, rank: int) -> Path:
        return self.samples / f"rank-{rank}.jsonl"

    # ---------------------------------------------------------------- SLURM
    @property
    def slurm(self) -> Path:
        return self.root / "slurm"

    @property
    def slurm_jobs(self) -> Path:
        return self.slurm / "jobs.json"

    @property
    def launch_events(self) -> Path:
        return self.root / "events.jsonl"

    @property
    def slurm_events(self) -> Path:
        return self.slurm / "events.jsonl"

    @property
    def submitit(self) -> Path:
        return self.slurm / "submitit"

    def submitit_job(self, job_id: str) -> Path:
        return self.submitit / job_id
