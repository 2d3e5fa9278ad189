"""Continuing a run from its own saved config: ``orchestrator resume RUN_DIR`` (nobody retypes the overrides a run
was started with; a resume given another config names the keys that differ: workers.config.diff)."""

from __future__ import annotations

from pathlib import Path

from workers.config import Config, load_config
from workers.errors import ConfigError
from workers.rundir import RunDir


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
