"""Which rank is the straggler. Under DDP every rank's step takes as long as the slowest one's (the gradient
all-reduce waits for it), so step times cannot tell; the time a rank computes before it waits can. A rank whose
compute over a logged window is at least ``RATIO`` times the median of the others' is the straggler — when the
excess also matters (``MIN_SHARE`` of the step: sub-millisecond jitter between equally fast ranks is no straggler).
Torch-free: ``orchestrator status`` uses it on the metrics rows."""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from typing import Any

RATIO = 1.25
MIN_SHARE = 0.1  # the excess over the others' median, as a share of the step time
PER_RANK = (
    "cpu_percent", "rss_mb", "rss_peak_mb", "cuda_max_mem_mb", "step_time_ms", "data_wait_ms", "compute_ms",
)  # fmt: skip


def find_straggler(compute_ms: Sequence[float], step_ms: Sequence[float]) -> tuple[int, float] | None:
    """(rank, its compute over the median of the others') of the straggler, or None. One rank at most: the one
    with the largest ratio."""
    if len(compute_ms) < 2:
        return None
    best: tuple[int, float] | None = None
    for rank, mine in enumerate(compute_ms):
        others = statistics.median([c for r, c in enumerate(compute_ms) if r != rank])
        ratio = mine / others if others > 0 else float("inf") if mine > 0 else 1.0
        material = mine - others >= MIN_SHARE * max(step_ms[rank], 1e-9)
        if ratio >= RATIO and material and (best is None or ratio > best[1]):
            best = (rank, ratio)
    return best


def ranks_of(row: Mapping[str, Any]) -> list[dict[str, float]]:
    """The per-rank values of a metrics row (``rank<r>/<name>``), one object per rank, in rank order."""
    ranks: dict[int, dict[str, float]] = {}
    for key, value in row.items():
        head, _, name = key.partition("/")
        if head.startswith("rank") and head[4:].isdigit() and name in PER_RANK:
            ranks.setdefault(int(head[4:]), {"rank": int(head[4:])})[name] = value
    return [ranks[r] for r in sorted(ranks)]


def straggler_of(row: Mapping[str, Any]) -> dict[str, Any] | None:
    """``{"rank", "ratio"}`` of a metrics row's straggler, or None (also for rows without compute times)."""
    ranks = ranks_of(row)
    if not ranks or any("compute_ms" not in r for r in ranks):
        return None
    found = find_straggler([r["compute_ms"] for r in ranks], [r.get("step_time_ms", 0.0) for r in ranks])
    return None if found is None else {"rank": found[0], "ratio": round(found[1], 2)}
