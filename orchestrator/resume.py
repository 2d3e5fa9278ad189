"""Continuing a run from its own saved config: ``orchestrator resume RUN_DIR``, and the note ``launch`` prints when
the config it was given differs from the one a run dir was started with (an fsdp run relaunched without
``train.parallel=fsdp`` would otherwise silently continue as ddp)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from workers.config import Config, load_config
from workers.errors import ConfigError
from workers.rundir import RunDir

log = logging.getLogger("orchestrator.resume")

# Keys that say where or how many, not what is trained: a difference there is expected, never worth a note.
_WHERE = ("run.dir", "launch.nproc")


def resume_config(run_dir: str, overrides: list[str]) -> Config:
    """The run's saved config with ``overrides`` applied; ``run.dir`` is the path given (the saved one may be
    relative to wherever the run was started). ConfigError when ``run_dir`` holds no run."""
    paths = RunDir(run_dir)
    if not paths.config.is_file():
        raise ConfigError(
            f"'{run_dir}' is not a run dir (no {paths.config.name}). HINT: name the run.dir of an earlier launch, "
            "or start a run with orchestrator launch CONFIG.yaml"
        )
    return load_config(paths.config, [*overrides, f"run.dir={Path(run_dir)}"])


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value and key != "args":  # task.args is one value: the factory's arguments
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def config_changes(saved: Config, now: Config) -> list[str]:
    """``key: saved -> now`` for every key whose value differs (where and how many workers aside)."""
    before, after = _flat(saved.to_dict()), _flat(now.to_dict())
    return [
        f"{key}: {before.get(key)!r} -> {after.get(key)!r}"
        for key in sorted(before.keys() | after.keys())
        if key not in _WHERE and before.get(key) != after.get(key)
    ]


def note_changes(cfg: Config, paths: RunDir) -> None:
    """Before a launch over an existing run: say which keys differ from the config the run was started with (the
    run dir's config is rewritten with the new one). A saved config that no longer reads is left unremarked: the
    launch's own checks speak for what matters (the checkpoint's compatibility)."""
    if not paths.config.is_file():
        return
    try:
        saved = load_config(paths.config)
    except ConfigError:
        return
    changes = config_changes(saved, cfg)
    if changes:
        log.warning(
            "run dir %s was started with another config; now: %s. HINT: `orchestrator resume %s` continues with "
            "the saved config",
            paths.root, "; ".join(changes), paths.root,
        )  # fmt: skip
