"""Evaluation defects (issue 23, item 4), each driven as a user meets it: the real CLI, real gloo workers.

- metric names that differ between ranks are one error line (never summed position by position);
- a task metric named like one of ours (``samples``, ``time_s``: ``eval/samples``, ``eval/time_s``) is refused;
- a changed ``eval.mode`` / ``eval.metric`` on resume never writes a second eval row for one step;
- ``orchestrator eval ... eval.metric=X`` with an X the evaluation does not produce is exit 2 naming X;
- without ``eval.metric``, a task whose ``evaluate`` has no ``loss`` still evaluates; only selection (patience,
  keep_best) needs the key, and says so at start.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import cli, launch

EVAL_N = 50
# A task with its own evaluate(): per-sample values under the names in task.args.metric_names.
NAMED = ["task.factory=orch_test_tasks:named_metrics", f"task.args.eval_n={EVAL_N}", "eval.batch_size=8"]
EVAL_ARGS = "{n: 200, hidden: 32, eval_n: %d, %s}"  # task.args for `orchestrator eval` (its config: the quickstart's)


def _eval_rows(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "eval/samples" in r]


def _error_line(proc) -> str:
    """The one line a usage error prints (exit 2, no traceback)."""
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("orchestrator: error:"), proc.stderr
    return lines[0]


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    """A weights file of the quickstart model the tests' tasks build (task.args n=200, hidden=32)."""
    import torch

    from workers.tasks.quickstart import build

    path = tmp_path_factory.mktemp("weights") / "model.pt"
    torch.save(build(n=200, hidden=32, eval_n=EVAL_N).model.state_dict(), path)
    return path


def _eval(weights: Path, task_args: str, *extra: str, nproc: int = 1):
    return cli(
        "eval", str(weights), "--config", "configs/quickstart.yaml", "--nproc", str(nproc), "--json",
        "task.factory=orch_test_tasks:named_metrics", f"task.args={EVAL_ARGS % (EVAL_N, task_args)}",
        "eval.batch_size=8", *extra,
    )  # fmt: skip


# ---------------------------------------------------------------- 1. names that differ between ranks


def test_metric_names_that_differ_between_ranks_are_one_error_line_in_training(tmp_path):
    """Rank 0 returns {mae, mse}, rank 1 {acc, mse}: both have eval.metric=mse, so nothing local notices; summed by
    position, rank 0's mae and rank 1's acc would make one number."""
    run = tmp_path / "run"
    proc = launch(run, 2, *NAMED, "task.args.metric_names=mse,mae", "task.args.rank1_metric_names=mse,acc",
                  "eval.every=4", "eval.metric=mse", check=False)  # fmt: skip
    line = _error_line(proc)
    assert "rank 0: mae, mse" in line and "rank 1: acc, mse" in line, line
    assert not run.exists(), "a usage error left the run dir behind"


def test_metric_names_that_differ_between_ranks_are_one_error_line_in_orchestrator_eval(weights):
    proc = _eval(weights, "metric_names: 'mse,mae', rank1_metric_names: 'mse,acc'", nproc=2)
    line = _error_line(proc)
    assert "rank 0: mae, mse" in line and "rank 1: acc, mse" in line, line
    assert not proc.stdout.strip()


# ---------------------------------------------------------------- 2. names like ours


def test_a_task_metric_named_samples_is_refused_at_start(tmp_path):
    run = tmp_path / "run"
    proc = launch(run, 1, *NAMED, "task.args.metric_names=mse,samples", "eval.every=4", "eval.metric=mse",
                  check=False)  # fmt: skip
    line = _error_line(proc)
    assert "'samples'" in line and "eval/samples" in line, line
    assert not run.exists(), "a usage error left the run dir behind"


def test_a_task_metric_named_time_s_is_refused_by_orchestrator_eval(weights):
    line = _error_line(_eval(weights, "metric_names: 'time_s,mse'"))
    assert "'time_s'" in line and "eval/time_s" in line, line


# ---------------------------------------------------------------- 3. a changed selection on resume


def test_changing_eval_mode_or_metric_on_resume_writes_each_eval_row_once(tmp_path):
    """Each relaunch resumes from the step its predecessor ended at, which had an eval: a selection that starts
    afresh (another mode, another metric, no metric) must still know that step was evaluated."""
    run = tmp_path / "run"
    named = [*NAMED, "task.args.metric_names=mse,mae", "eval.every=4"]
    launch(run, 1, *named, "eval.metric=mse", "train.max_steps=8")
    changed = launch(run, 1, *named, "eval.metric=mse", "eval.mode=max", "train.max_steps=12")
    assert "model selection starts afresh" in changed.stderr, changed.stderr
    assert [r["step"] for r in _eval_rows(run)] == [4, 8, 12]
    launch(run, 1, *named, "eval.metric=mae", "eval.mode=max", "train.max_steps=16")
    assert [r["step"] for r in _eval_rows(run)] == [4, 8, 12, 16]
    launch(run, 1, *named, "train.max_steps=20")  # no eval.metric: no selection at all
    assert [r["step"] for r in _eval_rows(run)] == [4, 8, 12, 16, 20]


# ---------------------------------------------------------------- 4. orchestrator eval eval.metric=X


def test_orchestrator_eval_refuses_a_metric_the_evaluation_does_not_produce(weights):
    line = _error_line(_eval(weights, "metric_names: 'mse,mae'", "eval.metric=acc"))
    assert "'eval.metric' = 'acc'" in line and "mae, mse" in line, line
    ok = _eval(weights, "metric_names: 'mse,mae'", "eval.metric=mse")
    assert ok.returncode == 0, ok.stderr
    assert sorted(json.loads(ok.stdout)["metrics"]) == ["mae", "mse"]


# ---------------------------------------------------------------- 5. no eval.metric, no loss


def test_eval_without_a_metric_key_evaluates_a_task_without_loss_and_selects_nothing(tmp_path):
    """Enabling eval is one key: the task's metrics are written, nothing is selected (no best checkpoint)."""
    run = tmp_path / "run"
    launch(run, 2, *NAMED, "task.args.metric_names=mse,mae", "eval.every=4")
    rows = _eval_rows(run)
    assert [r["step"] for r in rows] == [4, 8, 12]
    for row in rows:
        assert row["eval/samples"] == EVAL_N and row["eval/mae"] == pytest.approx(2 * row["eval/mse"], rel=1e-9)
    assert not (run / "checkpoints" / "best").exists()


@pytest.mark.parametrize(("key", "value"), [("eval.patience", 2), ("eval.keep_best", 3)])
def test_selection_without_a_metric_key_asks_for_one_at_start(tmp_path, key, value):
    run = tmp_path / "run"
    proc = launch(run, 1, *NAMED, "task.args.metric_names=mse,mae", "eval.every=4", f"{key}={value}", check=False)
    line = _error_line(proc)
    assert f"'{key}' = {value}" in line and "eval.metric" in line and "mae, mse" in line, line
    assert not run.exists(), "a usage error left the run dir behind"
