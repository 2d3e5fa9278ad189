"""Values derived from the config and the world size (the per-rank batch plan), and the check that a resume
would not change what the run consumes. Never written back into the config. Torch-free.
"""

from __future__ import annotations

from dataclasses import dataclass

from workers.config.schema import Config, fail
from workers.contract import TrainState
from workers.errors import ConfigError


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
    profiled = [r for r in cfg.profile.ranks if r >= world_size] if cfg.profile.start_step is not None else []
    if profiled:
        fail(
            "profile.ranks", list(cfg.profile.ranks), f"rank {profiled[0]} is outside the world (size {world_size})",
            f"list ranks 0..{world_size - 1}",
        )  # fmt: skip
    shard = cfg.train.shard_size
    if cfg.train.parallel == "hsdp" and shard is not None and world_size % shard:
        fail("train.shard_size", shard, f"does not divide the world size {world_size}",
             f"use a divisor of {world_size} (the ranks of one node, or a share of them)")  # fmt: skip
    gbs = cfg.data.global_batch_size
    if cfg.data.micro_batch_size is not None:
        micro = cfg.data.micro_batch_size
        if gbs % (world_size * micro):
            fail(
                "data.global_batch_size",
                gbs,
                f"not divisible by world size {world_size} x data.micro_batch_size {micro}",
                f"use a multiple of {world_size * micro} or another micro batch",
            )
        return BatchPlan(world_size, gbs, gbs // world_size, micro, gbs // (world_size * micro))
    accum = cfg.train.grad_accum_steps
    if gbs % (world_size * accum):
        fail(
            "data.global_batch_size",
            gbs,
            f"not divisible by world size {world_size} x train.grad_accum_steps {accum}",
            f"use a multiple of {world_size * accum}, or change --nproc / train.grad_accum_steps",
        )
    return BatchPlan(world_size, gbs, gbs // world_size, gbs // (world_size * accum), accum)


def check_node_range(cfg: Config) -> None:
    """Every node count of ``slurm.nodes`` (a range: elastic) must give a world size the batch plan allows: a job
    granted any of them must be able to train. ConfigError naming the node counts that would fail."""
    s = cfg.slurm
    if s.min_nodes == s.max_nodes:
        return  # one world size: the batch plan's own check names it
    bad = []
    for nodes in range(s.min_nodes, s.max_nodes + 1):
        try:
            plan_batches(cfg, nodes * s.tasks_per_node)
        except ConfigError:
            bad.append(nodes)
    if not bad:
        return
    good = [n for n in range(s.min_nodes, s.max_nodes + 1) if n not in bad]
    fail(
        "slurm.nodes", s.nodes,
        f"with {', '.join(map(str, bad))} node(s) x {s.tasks_per_node} task(s) the world size would not divide "
        f"data.global_batch_size {cfg.data.global_batch_size} (with its micro-batches)",
        f"use node counts that divide it ({', '.join(map(str, good))})" if good
        else "change data.global_batch_size or --tasks-per-node",
    )  # fmt: skip


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
