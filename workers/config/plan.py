"""Values derived from the config and the world size (the per-rank batch plan), and the check that a resume
would not change what the run consumes. Never written back into the config. Torch-free.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from workers.config.schema import Config, fail
from workers.contract import TrainState


@dataclass(frozen=True)
class BatchPlan:
    """Per-rank batching derived from ``data.global_batch_size`` and the world size at start."""

    world_size: int
    global_batch_size: int
    per_rank_batch: int  # samples each rank consumes per optimizer step
    micro_batch: int  # samples per forward/backward
    accum_steps: int  # micro-steps per optimizer step


def plan_batches(cfg: Config, world_size: int) -> BatchPlan:
    """Derive the per-rank batch plan; raises ConfigError when the numbers do not divide, or when a key names a
    rank outside the world (``profile.ranks``)."""
    misfit = world_size_misfit(cfg, world_size)
    if misfit is not None:
        fail(*misfit)
    gbs = cfg.data.global_batch_size
    if cfg.data.micro_batch_size is not None:
        micro = cfg.data.micro_batch_size
        return BatchPlan(world_size, gbs, gbs // world_size, micro, gbs // (world_size * micro))
    accum = cfg.train.grad_accum_steps
    return BatchPlan(world_size, gbs, gbs // world_size, gbs // (world_size * accum), accum)


def world_size_misfit(cfg: Config, world_size: int) -> tuple[str, Any, str, str] | None:
    """The first key that ``world_size`` does not fit, as (key, value, problem, hint) for :func:`fail`; None when
    the config trains on that world size."""
    profiled = [r for r in cfg.profile.ranks if r >= world_size] if cfg.profile.start_step is not None else []
    if profiled:
        problem = f"rank {profiled[0]} is outside the world (size {world_size})"
        return "profile.ranks", list(cfg.profile.ranks), problem, f"list ranks 0..{world_size - 1}"
    shard = cfg.train.shard_size
    if cfg.train.parallel == "hsdp" and shard is not None and world_size % shard:
        hint = f"use a divisor of {world_size} (the ranks of one node, or a share of them)"
        return "train.shard_size", shard, f"does not divide the world size {world_size}", hint
    gbs, micro, accum = cfg.data.global_batch_size, cfg.data.micro_batch_size, cfg.train.grad_accum_steps
    if micro is not None and gbs % (world_size * micro):
        problem = f"not divisible by world size {world_size} x data.micro_batch_size {micro}"
        return "data.global_batch_size", gbs, problem, f"use a multiple of {world_size * micro} or another micro batch"
    if micro is None and gbs % (world_size * accum):
        problem = f"not divisible by world size {world_size} x train.grad_accum_steps {accum}"
        hint = f"use a multiple of {world_size * accum}, or change --nproc / train.grad_accum_steps"
        return "data.global_batch_size", gbs, problem, hint
    return None


def check_node_range(cfg: Config) -> None:
    """Every node count of ``slurm.nodes`` (a range: elastic) must give a world size the config fits: a job granted
    any of them must be able to train. ConfigError naming the node counts that would fail, and for each the key
    their world size does not fit."""
    s = cfg.slurm
    if s.min_nodes == s.max_nodes:
        return  # one world size: the batch plan's own check names it
    counts = range(s.min_nodes, s.max_nodes + 1)
    misfits = {n: m[0] for n in counts if (m := world_size_misfit(cfg, n * s.tasks_per_node)) is not None}
    if not misfits:
        return
    keys = list(dict.fromkeys(misfits.values()))  # in the order of the node counts
    said = "; ".join(
        f"with {', '.join(str(n) for n, k in misfits.items() if k == key)} node(s) x {s.tasks_per_node} task(s) "
        f"{_WORLD_MISFITS[key](cfg)}"
        for key in keys
    )
    good = [n for n in counts if n not in misfits]
    fail(
        "slurm.nodes", s.nodes, said,
        f"use node counts that fit ({', '.join(map(str, good))})" if good
        else f"change {' / '.join(keys)} or --tasks-per-node",
    )  # fmt: skip


# What a node count's world size does not fit, by the key world_size_misfit names.
_WORLD_MISFITS: dict[str, Callable[[Config], str]] = {
    "data.global_batch_size": lambda c: (
        f"the world size would not divide data.global_batch_size {c.data.global_batch_size} (with its micro-batches)"
    ),
    "train.shard_size": lambda c: f"the world size would not be a multiple of train.shard_size {c.train.shard_size}",
    "profile.ranks": lambda c: f"the world would not hold profile.ranks {list(c.profile.ranks)}",
}


def check_resume_compatible(cfg: Config, saved: TrainState, where: str, dataset_len: int | None = None) -> None:
    """Refuse a resume whose config would silently change what the run consumes (raises ConfigError).

    ``saved`` is the checkpoint's train state. The data position is ``step x global batch`` in the global order
    of ``train.seed``, so both must match. (Whether the run is past ``train.max_steps`` is
    :func:`check_not_past_the_end`'s, once the resume point is known to be valid.)
    """
    hint = "put it back, or start a new run.dir (train.init_from can take these weights)"
    for key, now, then in (
        ("train.seed", cfg.train.seed, saved.seed),
        ("data.global_batch_size", cfg.data.global_batch_size, saved.global_batch_size),
        ("task.factory", cfg.task.factory, saved.task),
        ("task.factory (its dataset's length)", dataset_len, saved.dataset_len if dataset_len else None),
    ):
        if then is not None and now != then:
            fail(key, now, f"the checkpoint in {where} was saved with {then!r}; resuming would change the data", hint)


def check_not_past_the_end(cfg: Config, saved: TrainState, where: str) -> None:
    """The run can be extended (a larger ``train.max_steps``) but not cut below the step it reached."""
    if saved.step > cfg.train.max_steps:
        fail(
            "train.max_steps",
            cfg.train.max_steps,
            f"the run in {where} is already at step {saved.step}",
            "raise train.max_steps to continue it, or use a new run.dir",
        )
