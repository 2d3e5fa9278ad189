"""Elastic capacity of a local launch: the device slots the group runs on, and when one of them is dropped.

Every worker runs on a *slot* (``ORCH_SLOT``): the CUDA device index on a GPU, the original local rank on the CPU.
A slot whose worker is the root cause of two attempts in a row is taken to be broken (a failing GPU, a device that
keeps erroring), not unlucky: with ``launch.min_nproc`` below ``--nproc`` it is dropped and the group restarts on
the others — at the largest world size, not below ``min_nproc``, that the global batch divides. The data stream
is the global one, so the run continues exactly (README: "Resume, on any number of workers"). Without
``min_nproc`` nothing is dropped, and the report names the slot that kept failing.

Only the decision lives here (data in, data out); the launcher starts groups on the slots it is given.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from orchestrator.outcome import RunResult
from workers.config import Config, ConfigError, plan_batches

REPEATED = 2  # root-cause failures in a row that condemn a slot


@dataclass(frozen=True)
class Drop:
    """A decision to go on without ``slot``: the group restarts on ``slots``."""

    slot: int
    reason: str  # what its worker did, twice in a row
    slots: tuple[int, ...]  # the slots of the next group (the largest usable prefix of what is left)

    def describe(self) -> str:
        return (
            f"slot {self.slot} dropped: its worker failed {REPEATED} attempts in a row ({self.reason}); "
            f"continuing on {len(self.slots)} worker(s), slots {list(self.slots)}"
        )


@dataclass
class Capacity:
    """The slots of a local launch and the failure streak of each. ``slots``: the next group's (rank r runs on
    ``slots[r]``); ``left``: every slot not dropped (some may sit out when the batch does not divide)."""

    cfg: Config
    slots: tuple[int, ...]
    min_nproc: int
    left: list[int] = field(default_factory=list)
    streaks: dict[int, int] = field(default_factory=dict)
    last_reason: dict[int, str] = field(default_factory=dict)

    @classmethod
    def of(cls, cfg: Config) -> Capacity:
        nproc = cfg.launch.nproc
        slots = tuple(range(nproc))
        return cls(cfg, slots, cfg.launch.min_nproc or nproc, list(slots))

    def failed_slot(self, result: RunResult) -> int | None:
        """The slot whose worker caused the attempt's failure (None: no single rank did)."""
        rc = result.root_cause
        if rc is None or rc.lost_peer or not 0 <= rc.rank < len(self.slots):
            return None
        return self.slots[rc.rank]

    def observe(self, result: RunResult) -> Drop | None:
        """Count the attempt's failure against its slot; a :class:`Drop` when the slot is to be left out now."""
        slot = self.failed_slot(result)
        self.streaks = {slot: self.streaks.get(slot, 0) + 1} if slot is not None else {}
        if slot is None:
            return None
        assert result.root_cause is not None
        self.last_reason[slot] = result.root_cause.describe().split(": ", 1)[-1]
        if self.streaks[slot] < REPEATED:
            return None
        rest = [s for s in self.left if s != slot]
        world = self.world_for(len(rest))
        if world is None:
            return None
        self.left, self.slots, self.streaks = rest, tuple(rest[:world]), {}
        return Drop(slot, self.last_reason[slot], self.slots)

    def world_for(self, available: int, least: int | None = None) -> int | None:
        """The largest world size in ``[least (min_nproc), available]`` whose batch plan divides (None: none does)."""
        for world in range(available, (least or self.min_nproc) - 1, -1):
            try:
                plan_batches(self.cfg, world)
            except ConfigError:
                continue
            return world
        return None

    def repeated(self) -> str | None:
        """A line naming the slot that failed the last attempts in a row (for the final report), or None."""
        for slot, streak in self.streaks.items():
            if streak >= REPEATED:
                world = self.world_for(len(self.slots) - 1, least=1) if self.min_nproc >= len(self.slots) else None
                hint = f"; launch.min_nproc={world} would let the run go on without it" if world else ""
                return f"slot {slot} was the cause of the last {streak} attempts ({self.last_reason[slot]}){hint}"
        return None
