"""Where training starts: the run's newest valid checkpoint (every resume check first, then the load), or the
weights of ``train.init_from``, or the task's fresh model."""

from __future__ import annotations

import logging
from pathlib import Path

from workers.checkpoint import first_mismatch, load_full_weights, locate_weights, read_located, read_train_state
from workers.config import check_not_past_the_end, check_resume_compatible, config_changes, load_config
from workers.dist import DistContext
from workers.errors import CheckpointError, ConfigError
from workers.optim import apply_on_resume, group_settings
from workers.rundir import CONFIG_FILE, RunDir
from workers.train.parts import Parts

log = logging.getLogger("workers.trainer")


def start(parts: Parts, ctx: DistContext, paths: RunDir) -> None:
    """Put ``parts`` where this start begins (``parts.progress.step``). Collective (the resume choice; a sharded
    load). A checkpoint that does not fit, or ``train.init_from`` weights that do not, are usage errors."""
    cfg = parts.cfg
    parts.ckpt.clean_stale_temporaries()
    folder = parts.ckpt.resume_point().resolved() if cfg.run.resume else None
    if folder is not None:
        _resume(parts, ctx, paths, folder)
    elif cfg.train.init_from:
        _init_from(parts, cfg.train.init_from)


def _resume(parts: Parts, ctx: DistContext, paths: RunDir, folder: Path) -> None:
    cfg = parts.cfg
    saved = read_train_state(folder)
    check_resume_compatible(cfg, saved, str(folder), len(parts.task.dataset))
    check_not_past_the_end(cfg, saved, str(folder))
    if saved.max_steps is not None and cfg.train.max_steps < saved.max_steps:
        log.warning(
            "train.max_steps is %d, the run was saved with %d: the LR schedule now decays to step %d",
            cfg.train.max_steps, saved.max_steps, cfg.train.max_steps,
        )  # fmt: skip
    fresh = group_settings(parts.optim.optimizer)  # the settings as built now, before the saved ones replace them
    state = parts.ckpt.restore(folder, saved)
    apply_on_resume(parts.optim, fresh, cfg.optim, cfg.train.max_steps)
    log.info(
        "resumed from %s: step %d, %d samples seen, saved at world size %d, now %d",
        folder, state.step, state.samples_seen, state.world_size, ctx.world_size,
    )  # fmt: skip
    _note_config_changes(parts, ctx, paths, folder)


def _note_config_changes(parts: Parts, ctx: DistContext, paths: RunDir, folder: Path) -> None:
    """Say which keys differ from the config the checkpoint was saved with (an fsdp run relaunched without
    ``train.parallel=fsdp`` would otherwise go on as ddp without a word). After every resume check passed: a
    refused resume stays one line."""
    try:
        saved = load_config(folder / CONFIG_FILE)
    except ConfigError:
        return  # an older checkpoint without its config, or one that no longer reads: nothing to compare
    changes = config_changes(saved, parts.cfg)
    if changes and ctx.is_main:
        log.warning(
            "the config differs from the one %s was saved with: %s. HINT: `orchestrator resume %s` continues "
            "with the run's saved config", folder.name, "; ".join(changes), paths.root,
        )  # fmt: skip


def _init_from(parts: Parts, source: str) -> None:
    """Start from the weights in ``train.init_from``; anything wrong with them is the user's to fix (exit 2)."""
    try:
        origin = locate_weights(source)  # a run dir: its newest valid checkpoint, named in the log below
        weights = read_located(origin)
    except CheckpointError as exc:
        raise ConfigError(f"config key 'train.init_from' = {source!r}: {exc}") from None
    problem = first_mismatch(parts.model, weights)
    if problem:
        raise ConfigError(
            f"config key 'train.init_from' = {source!r}: does not fit the task's model: {problem}. "
            "HINT: check task.factory / task.args, or the file"
        )
    load_full_weights(parts.model, weights)  # sliced to this rank's shards when sharded
    log.info("initialised weights from %s", origin)
