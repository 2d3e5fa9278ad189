"""Evaluation: exact over the whole eval set on any world size (no padding, no drop), computed the way a single
process would over the saved weights, and perturbing nothing — a run with eval on ends bitwise equal to eval off."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import cli, launch, load, tensors_equal

EVAL_N, EVAL_BATCH = 1001, 16  # 1001 = 7 * 11 * 13: uneven shares on 2 and 3 ranks, a short last batch
EVAL = [
    f"task.args.eval_n={EVAL_N}", "task.args.per_sample_metrics=true", "eval.every=4",
    f"eval.batch_size={EVAL_BATCH}", "eval.metric=mse", "train.keep_checkpoints=3",
]  # fmt: skip


def _eval_rows(run) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "eval/samples" in r]


def _single_process_metrics(run, step: int) -> dict[str, float]:
    """What one process computes over the whole eval set with the weights saved at ``step``."""
    from workers.tasks.quickstart import build

    task = build(n=200, hidden=32, eval_n=EVAL_N)
    task.model.load_state_dict(load(run, step=step))
    x, y = task.eval_dataset.tensors
    with torch.no_grad():
        err = (task.model(x) - y).double()
    return {"mse": float((err**2).mean(dim=1).mean()), "mae": float(err.abs().mean(dim=1).mean())}


@pytest.fixture(scope="module")
def eval_runs(tmp_path_factory) -> dict[int, object]:
    base = tmp_path_factory.mktemp("eval")
    runs = {ws: base / f"ws{ws}" for ws in (1, 2, 3)}
    for ws, run in runs.items():
        launch(run, ws, *EVAL)
    return runs


@pytest.mark.parametrize("ws", [1, 2, 3])
def test_every_eval_sample_counts_once_and_metrics_match_a_single_process(eval_runs, ws):
    run = eval_runs[ws]
    rows = _eval_rows(run)
    assert [r["step"] for r in rows] == [4, 8, 12]
    for row in rows:
        assert row["eval/samples"] == EVAL_N and row["eval/time_s"] > 0
        expected = _single_process_metrics(run, row["step"])
        for name, value in expected.items():
            assert row[f"eval/{name}"] == pytest.approx(value, rel=1e-6), (name, row["step"])


def test_world_sizes_agree(eval_runs):
    by_ws = {ws: _eval_rows(run) for ws, run in eval_runs.items()}
    for a, b in zip(by_ws[1], by_ws[3], strict=True):
        assert a["eval/mse"] == pytest.approx(b["eval/mse"], rel=1e-5)
        assert a["eval/mae"] == pytest.approx(b["eval/mae"], rel=1e-5)


def test_eval_perturbs_nothing_with_random_augmentation_and_loader_workers(tmp_path):
    """Eval on vs off: bitwise the same final model and optimizer state (the augmentation draws from torch's global
    RNG in __getitem__; the eval's own per-sample seeding must not leak into training)."""
    common = ["task.args.augment=0.1", "data.num_workers=1", f"task.args.eval_n={EVAL_N}"]
    off, on = tmp_path / "off", tmp_path / "on"
    launch(off, 2, *common)
    launch(on, 2, *common, "eval.every=2", f"eval.batch_size={EVAL_BATCH}", "eval.at_end=true")
    assert [r["step"] for r in _eval_rows(on)] == [2, 4, 6, 8, 10, 12] and not _eval_rows(off)
    assert tensors_equal(load(on), load(off))
    assert tensors_equal(load(on, "optim.pt"), load(off, "optim.pt"))


def test_the_default_metric_is_the_loss_weighted_by_batch_size(tmp_path):
    run = tmp_path / "run"
    launch(run, 2, f"task.args.eval_n={EVAL_N}", "eval.at_end=true", f"eval.batch_size={EVAL_BATCH}")
    (row,) = _eval_rows(run)
    assert row["step"] == 12 and row["eval/samples"] == EVAL_N
    assert row["eval/loss"] == pytest.approx(_single_process_metrics(run, 12)["mse"], rel=1e-6)


SELECT = [f"task.args.eval_n={EVAL_N}", "eval.every=2", f"eval.batch_size={EVAL_BATCH}"]


def _state(run, step: int) -> dict:
    return json.loads((run / "checkpoints" / f"step-{step:08d}" / "train_state.json").read_text())


def test_best_is_kept_named_and_continued_across_a_resume(tmp_path):
    """mode=max on a falling loss: the first eval (step 2) stays the best, so the best is not the newest. It is
    checkpointed at its step, named by checkpoints/best, survives keep_checkpoints=1, and a resume continues the
    same selection (the patience counter too)."""
    run = tmp_path / "run"
    select = [*SELECT, "eval.mode=max", "train.keep_checkpoints=1", "train.checkpoint_every=100"]
    launch(run, 2, *select, "train.max_steps=8")
    assert (run / "checkpoints" / "best").read_text().strip() == "step-00000002"
    assert sorted(p.name for p in (run / "checkpoints").glob("step-*")) == ["step-00000002", "step-00000008"]
    selection = _state(run, 8)["selection"]
    assert selection["best_step"] == 2 and selection["bad_evals"] == 3  # evals at 4, 6, 8 did not improve
    proc = launch(run, 1, *select, "train.max_steps=12")  # resumed on another world size
    assert _state(run, 12)["selection"]["bad_evals"] == 5 and _state(run, 12)["selection"]["best_step"] == 2
    assert sorted(p.name for p in (run / "checkpoints").glob("step-*")) == ["step-00000002", "step-00000012"]
    assert (run / "checkpoints" / "best").read_text().strip() == "step-00000002"
    assert "new best" not in proc.stderr


def test_early_stopping_saves_and_ends_with_exit_0_and_a_relaunch_is_done(tmp_path):
    run = tmp_path / "run"
    early = [*SELECT, "eval.mode=max", "eval.patience=2"]  # best at step 2; no improvement at 4, 6: stop at 6
    proc = launch(run, 2, *early)
    assert "early stopping at step 6" in proc.stderr and "best eval/loss" in proc.stderr and "at step 2" in proc.stderr
    assert (run / "checkpoints" / "latest").read_text().strip() == "step-00000006"
    assert not (run / "checkpoints" / "step-00000008").exists()
    again = launch(run, 2, *early)
    assert "nothing to do: the run stopped early at step 6" in again.stderr
    assert (run / "checkpoints" / "latest").read_text().strip() == "step-00000006"


def test_selection_keeps_the_strict_best_ignores_non_finite_values_and_counts_patience():
    from workers.config import EvalConfig
    from workers.eval.selection import ModelSelection

    sel = ModelSelection(EvalConfig(every=1, min_delta=0.01, patience=2))
    assert sel.observe(1, float("nan")) is False and sel.best_step is None  # NaN is never a best
    assert sel.observe(2, 1.0) is True and sel.bad_evals == 0
    assert sel.observe(3, 0.995) is True and sel.best_step == 3  # a better value is the best, whatever min_delta
    assert sel.bad_evals == 1  # ... but not enough of an improvement for patience
    assert sel.observe(4, float("inf")) is False and sel.should_stop  # two evals without a min_delta improvement
    restored = ModelSelection(EvalConfig(every=1, min_delta=0.01, patience=2))
    assert restored.restore(sel.state()) and restored.should_stop and restored.best_step == 3
    assert not restored.pending_eval(4, due=True) and restored.pending_eval(5, due=True)


# ---------------------------------------------------------------- signals during an eval

# eval.mode=max on a falling mse: only the first eval is a new best, so no eval after it adds a checkpoint at its step
# (a new best is always saved) — the kills below wait for windows between checkpoints that such a save would close.
SIG_EVAL = [
    "task.args.per_sample_metrics=true", "task.args.eval_n=200", "eval.every=3", "eval.batch_size=8",
    "eval.metric=mse", "eval.mode=max", "tracking.mode=offline",
]  # fmt: skip
EVAL_CALLS = 1 + 13  # the probe, then one eval: 100 samples a rank in batches of 8


def _wandb_evals(run) -> list[tuple[int, float]]:
    """(step, eval/mse) of every wandb history row that has an eval, over all the run's offline logs."""
    from conftest import wandb_view

    from workers.tracking.wandb_records import offline_logs, read_records

    rid = wandb_view(run)[0]
    out = []
    for path in offline_logs(run, rid):
        for record in read_records(path):
            if record.WhichOneof("record_type") == "history":
                items = {item.key or "/".join(item.nested_key): item.value_json for item in record.history.item}
                if "eval/mse" in items:
                    out.append((record.history.step.num, json.loads(items["eval/mse"])))
    return out


def _wait_for(proc, condition, what: str) -> None:
    deadline = time.monotonic() + 120
    while not condition():
        assert proc.poll() is None, f"the run ended before {what}: {proc.stderr.read()}"
        assert time.monotonic() < deadline, f"no {what} in 120 s"
        time.sleep(0.01)


def test_a_stop_a_kill_and_a_hang_around_evals_lose_nothing_and_log_each_eval_once(tmp_path):
    """Evals at 3, 6, 9, 12; checkpoints at 4, 8, 12; 2 ranks; wandb offline. Against an uninterrupted run:
    (1) SIGTERM during the eval of step 6: abandoned, step 6 saved, no eval row; (2) the relaunch evaluates step 6
    first, then is SIGKILLed while training after the eval of step 9; (3) the next is SIGKILLed during the eval of
    step 9; (4) the last hangs in the eval of step 12, is detected as hung, restarts and finishes. The final model
    and optimizer are bitwise equal, and metrics.jsonl and wandb have each eval step exactly once, with the
    reference's values."""
    from conftest import QUICK, ROOT, env, latest_name, launch_and_kill

    ref, run = tmp_path / "ref", tmp_path / "run"
    launch(ref, 2, *SIG_EVAL)
    expected = [(r["step"], r["eval/mse"]) for r in _eval_rows(ref)]
    assert [s for s, _ in expected] == [3, 6, 9, 12]

    def start(*extra: str) -> subprocess.Popen:
        cmd = [sys.executable, "-m", "orchestrator", "launch", "configs/quickstart.yaml", "--nproc", "2",
               f"run.dir={run}", *QUICK, *SIG_EVAL, *extra]  # fmt: skip
        return subprocess.Popen(cmd, env=env(), cwd=ROOT, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                text=True, start_new_session=True)  # fmt: skip

    def marked(name: str) -> bool:
        return all((tmp_path / f"{name}-rank{r}").exists() for r in (0, 1))

    # (1) A stop during the eval of step 6 (each batch of it takes 0.3 s in this attempt).
    proc = start(f"task.args.slow_eval_after={EVAL_CALLS}", "task.args.slow_eval_s=0.3",
                 f"task.args.slow_eval_marker={tmp_path / 'm1'}")  # fmt: skip
    _wait_for(proc, lambda: marked("m1"), "eval of step 6")
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "eval at step 6 abandoned (stop request)" in err and latest_name(run) == "step-00000006", err
    assert [r["step"] for r in _eval_rows(run)] == [3]

    # (2) The relaunch evaluates step 6 first; SIGKILL while it trains after the eval of step 9.
    launch_and_kill(run, 2, *SIG_EVAL, "task.args.step_sleep_s=0.15", kill_after="step-00000008",
                    until=lambda: 9 in [r["step"] for r in _eval_rows(run)])  # fmt: skip
    assert [r["step"] for r in _eval_rows(run)] == [3, 6, 9]

    # (3) SIGKILL during the eval of step 9 (the first eval of this start: it resumes from step 8).
    launch_and_kill(run, 2, *SIG_EVAL, "task.args.slow_eval_after=1", "task.args.slow_eval_s=0.3",
                    f"task.args.slow_eval_marker={tmp_path / 'm2'}", kill_after="step-00000008",
                    until=lambda: marked("m2"))  # fmt: skip

    # (4) A hang in the eval of step 12 (an eval batch that never ends): found, the group restarted.
    proc = start(f"task.args.slow_eval_after={EVAL_CALLS}", "task.args.slow_eval_s=600",
                 f"task.args.slow_eval_marker={tmp_path / 'm3'}", "launch.max_restarts=1",
                 "launch.hang_timeout_s=3", "launch.grace_period_s=1")  # fmt: skip
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, err
    assert marked("m3") and "hung" in err and "at step 12" in err, err

    assert tensors_equal(load(run), load(ref)) and tensors_equal(load(run, "optim.pt"), load(ref, "optim.pt"))
    assert [(r["step"], r["eval/mse"]) for r in _eval_rows(run)] == expected
    assert sorted(_wandb_evals(run)) == expected, _wandb_evals(run)


# ---------------------------------------------------------------- orchestrator eval


def _files(root) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


def _eval_cli(*args: str) -> dict:
    proc = cli("eval", *args, "--json", check=True)
    return json.loads(proc.stdout)


def test_orchestrator_eval_gives_the_runs_numbers_on_any_nproc_and_any_layout_and_writes_nothing(eval_runs, tmp_path):
    """A run dir (its best checkpoint), the same on 3 ranks, its checkpoint folder, and a `module.`-prefixed copy
    of the weights with --config: the same numbers as the run's own eval row at that step; nothing written."""
    run = eval_runs[2]
    before = _files(run)
    best = (run / "checkpoints" / "best").read_text().strip()
    step = int(best.split("-")[1])
    (row,) = [r for r in _eval_rows(run) if r["step"] == step]
    one = _eval_cli(str(run))
    three = _eval_cli(str(run), "--nproc", "3")
    folder = _eval_cli(str(run / "checkpoints" / best), "--nproc", "2")
    prefixed = tmp_path / "ddp-weights.pt"
    torch.save({f"module.{k}": v for k, v in load(run, step=step).items()}, prefixed)
    copy = _eval_cli(str(prefixed), "--config", str(run / "config.yaml"))
    assert one["checkpoint"] == str(run / "checkpoints" / best) and one["step"] == step and copy["step"] is None
    for out in (one, three, folder, copy):
        assert out["samples"] == EVAL_N and sorted(out["metrics"]) == ["mae", "mse"]
        for name in ("mse", "mae"):
            assert out["metrics"][name] == pytest.approx(row[f"eval/{name}"], rel=1e-6), (name, out)
            assert out["metrics"][name] == pytest.approx(one["metrics"][name], rel=1e-6)
    assert _files(run) == before, "orchestrator eval wrote into the run dir"

    status = json.loads(cli("status", str(run), "--json", check=True).stdout)  # status and plot show the evals
    last = _eval_rows(run)[-1]
    assert status["last_eval"] == {"step": last["step"], "metrics": {"mae": last["eval/mae"], "mse": last["eval/mse"]}}
    assert status["best"] == {"metric": "mse", "value": row["eval/mse"], "step": step, "checkpoint": best}
    assert status["loss"] is not None  # the last training row, not the eval row after it
    png = tmp_path / "plot.png"
    cli("plot", str(run), "--out", str(png), check=True)
    assert int.from_bytes(png.read_bytes()[20:24], "big") > 1000  # 4 panels (3 without evals: 800 px high)


def test_orchestrator_eval_refuses_bad_input_with_one_line_and_exit_2(eval_runs, tmp_path):
    run = eval_runs[1]
    weights = run / "checkpoints" / "best"
    model = run / "checkpoints" / weights.read_text().strip() / "model.pt"
    damaged = tmp_path / "damaged"
    shutil.copytree(model.parent, damaged)
    (damaged / "model.pt").write_bytes(b"not a checkpoint")
    cases = {
        (str(model),): "is a weights file",
        (str(tmp_path / "nowhere"),): "does not exist",
        (str(run), "--nproc", "0"): "--nproc 0",
        (str(damaged),): "manifest says",
        (str(run), "task.args.hidden=8"): "does not fit the task's model",
        (str(run), "eval.batch_size=0"): "eval.batch_size",
    }
    for args, words in cases.items():
        proc = cli("eval", *args)
        assert proc.returncode == 2, (args, proc.stderr)
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and words in lines[0] and lines[0].startswith("orchestrator: error:"), (args, lines)
