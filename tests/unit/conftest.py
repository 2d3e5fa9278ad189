"""Fixtures of the in-process tier (tests/conftest.py, the end-to-end tests' own, is not loaded when tests/unit is the
rootdir). Everything here runs in the test process: world size 1 on the CPU without a process group; where a
collective matters, :func:`unit.helpers.run_on_ranks` forks a real 2-rank gloo group."""

from __future__ import annotations

import pytest

from workers.dist import DistContext
from workers.rundir import RunDir

from .helpers import cpu_context


@pytest.fixture
def ctx() -> DistContext:
    """World size 1 on the CPU, no process group: every collective of the context is a no-op."""
    context = cpu_context()
    assert context.world_size == 1 and not context.distributed and context.source == "single"
    return context


@pytest.fixture
def run_dir(tmp_path) -> RunDir:
    """An empty run dir (its root exists, as the launch's preflight leaves it)."""
    paths = RunDir(tmp_path / "run")
    paths.root.mkdir()
    return paths
