"""workers/eval/: model selection (best, k best, patience, its saved state) and the exact evaluation — the mean
over the whole eval set, on world size 1 and on a real 2-rank gloo group whose ranks get uneven shares."""

from __future__ import annotations

import contextlib
import json
import math
import random
import re

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from workers.config import EvalConfig
from workers.contract import TrainState, check_selection_state
from workers.errors import CheckpointError, ConfigError
from workers.eval.evaluator import Evaluator
from workers.eval.selection import ModelSelection, selection_metric
from workers.stop import PREEMPT, STOP
from workers.tasks import resolve

from .helpers import quick_task, run_on_ranks

# ---------------------------------------------------------------- model selection


def _selection(**cfg) -> ModelSelection:
    return ModelSelection(EvalConfig(**cfg), metric=cfg.get("metric") or "loss")


def test_the_best_is_the_strict_best_and_patience_counts_evals_without_improvement():
    sel = _selection(patience=2)
    verdicts = [sel.observe(step, value) for step, value in [(10, 3.0), (20, 2.0), (30, 2.5), (40, 1.0)]]
    assert verdicts == [True, True, False, True]
    assert (sel.best_step, sel.best_value, sel.bad_evals, sel.should_stop) == (40, 1.0, 0, False)
    assert sel.observe(50, math.nan) is False  # a non-finite value is never a best, and counts against patience
    assert sel.bad_evals == 1 and not sel.should_stop
    assert sel.observe(60, 1.0) is False  # equal is no improvement
    assert sel.should_stop and sel.best_step == 40


def test_min_delta_decides_patience_but_not_the_best():
    sel = _selection(patience=2, min_delta=0.5)
    assert sel.observe(1, 5.0) and sel.observe(2, 4.9) and sel.observe(3, 4.8)  # new bests, each too small a gain
    assert (sel.best_step, sel.ref_value, sel.bad_evals, sel.should_stop) == (3, 5.0, 2, True)
    maximise = _selection(mode="max", metric="acc")
    assert [maximise.observe(s, v) for s, v in [(1, 0.5), (2, 0.4), (3, 0.7)]] == [True, False, True]
    assert maximise.best_step == 3 and maximise.cfg.patience is None and not maximise.should_stop


def test_the_k_best_checkpointed_evals_are_protected_from_retention():
    sel = _selection(keep_best=2)
    for step, value in [(10, 5.0), (20, 3.0), (30, 4.0), (40, 6.0)]:
        sel.observe(step, value)
        sel.checkpointed(step)
    assert sel.ranked == [(20, 3.0), (30, 4.0)] and sel.protected_steps == {20, 30}
    sel.observe(50, 1.0)  # a new best, not (yet) checkpointed: protected as the best, not ranked
    assert sel.ranked == [(20, 3.0), (30, 4.0)] and sel.protected_steps == {20, 30, 50}
    sel.checkpointed(60)  # a checkpoint of a step that was not evaluated changes nothing
    assert sel.ranked == [(20, 3.0), (30, 4.0)]
    sel.checkpointed(50)
    assert sel.ranked == [(50, 1.0), (20, 3.0)]


def test_the_state_travels_through_train_state_json_and_a_resume_continues_it():
    sel = _selection(patience=3, keep_best=2)
    for step, value in [(10, 2.0), (20, 1.0), (30, 1.5)]:
        sel.observe(step, value)
        sel.checkpointed(step)
    saved = TrainState.from_json(TrainState(30, 240, 1, 8, 0, selection=sel.state()).to_json()).selection
    assert saved == {
        "metric": "loss",
        "mode": "min",
        "best_step": 20,
        "best_value": 1.0,
        "ref_value": 1.0,
        "bad_evals": 1,
        "ranked": [[20, 1.0], [30, 1.5]],
        "last_eval_step": 30,
    }
    resumed = _selection(patience=3, keep_best=2)
    assert resumed.restore(saved)
    for s in (sel, resumed):  # both go on alike
        s.observe(40, 1.2)
        s.checkpointed(40)
    assert resumed.state() == sel.state() and resumed.protected_steps == {20, 40}
    assert not resumed.pending_eval(40, due=True) and resumed.pending_eval(50, due=True)
    assert not resumed.pending_eval(50, due=False)


def test_a_selection_saved_for_another_metric_or_mode_starts_afresh_but_keeps_the_last_eval():
    sel = _selection()
    sel.observe(10, 1.0)
    other = _selection(mode="max")
    assert other.restore(sel.state()) is False
    assert other.best_step is None and other.last_eval == (10, other.last_eval[1])
    assert not other.pending_eval(10, due=True)  # that eval's row exists: not evaluated again at resume
    unselected = ModelSelection(EvalConfig())
    assert unselected.observe(5, None) is False and unselected.state()["last_eval_step"] == 5
    assert unselected.best_step is None and unselected.bad_evals == 0


def test_a_malformed_selection_state_is_a_checkpoint_error():
    good = _selection().state()
    check_selection_state(good, "x")
    for bad in ({**good, "mode": "up"}, {**good, "ranked": [[1]]}, {**good, "bad_evals": True}, [], {}):
        with pytest.raises(CheckpointError, match="'x': 'selection' is malformed"):
            check_selection_state(bad, "x")
    text = json.loads(TrainState(1, 8, 1, 8, 0).to_json())
    with pytest.raises(CheckpointError, match="selection"):
        TrainState.from_json(json.dumps({**text, "selection": {**good, "metric": 3}}))


def test_the_selecting_metric():
    assert selection_metric(EvalConfig(metric="acc"), ["loss", "acc"]) == "acc"
    assert selection_metric(EvalConfig(), ["acc", "loss"]) == "loss"
    assert selection_metric(EvalConfig(), ["acc"]) is None  # evals run and are reported; nothing is selected
    with pytest.raises(ConfigError, match=r"'eval.patience' = 3: early stopping needs eval.metric.*acc"):
        selection_metric(EvalConfig(patience=3), ["acc"])
    with pytest.raises(ConfigError, match=re.escape("'eval.keep_best' = 2")):
        selection_metric(EvalConfig(keep_best=2), ["acc"])


# ---------------------------------------------------------------- the evaluator


class Scored:
    """A task with its own ``evaluate`` (per-sample absolute error and a hit rate) and random eval samples (a
    TensorDataset not declared free of randomness: its samples are seeded by index)."""

    def __init__(self, n_eval: int = 11, names: tuple[str, str] = ("abs", "hit"), mean: bool = False) -> None:
        torch.manual_seed(0)
        self.model = nn.Linear(3, 1)
        gen = torch.Generator().manual_seed(1)
        self.x, self.y = torch.randn(n_eval, 3, generator=gen), torch.randn(n_eval, 1, generator=gen)
        self.dataset = self.eval_dataset = TensorDataset(self.x, self.y)
        self.names, self.mean = names, mean

    def loss(self, model, batch):
        x, y = batch
        return nn.functional.mse_loss(model(x), y)

    def evaluate(self, model, batch):
        x, y = batch
        err = (model(x) - y).abs().squeeze(1)
        return {self.names[0]: err.mean() if self.mean else err, self.names[1]: (err < 0.8).float()}

    def expected(self) -> dict[str, float]:
        with torch.no_grad():
            err = (self.model(self.x) - self.y).abs().squeeze(1).double()
        return {self.names[0]: err.mean().item(), self.names[1]: (err < 0.8).double().mean().item()}


def _evaluator(task, ctx, batch_size: int = 3, lockstep: bool = False) -> Evaluator:
    task = resolve(task)
    return Evaluator(task, task.model, ctx, batch_size, seed=0, autocast=contextlib.nullcontext, lockstep=lockstep)


def test_the_loss_is_the_mean_over_the_whole_set_not_a_mean_of_batch_means(ctx):
    task = quick_task(eval_n=10)
    ev = Evaluator(task, task.model, ctx, batch_size=4, seed=0, autocast=contextlib.nullcontext)  # 4 + 4 + 2
    assert ev.probe(None) == ["loss"] and ev.probe("loss") == ["loss"]
    result = ev.run()
    x, y = task.eval_dataset.tensors
    with torch.no_grad():
        whole = nn.functional.mse_loss(task.model(x), y).item()
    assert result.samples == 10 and result.metrics["loss"] == pytest.approx(whole, rel=1e-6)
    batches = [nn.functional.mse_loss(task.model(x[i : i + 4]), y[i : i + 4]).item() for i in (0, 4, 8)]
    assert abs(sum(batches) / 3 - whole) > 1e-4  # (the mean of batch means would be another number)
    row = result.row()
    assert row == {"eval/loss": result.metrics["loss"], "eval/samples": 10, "eval/time_s": round(result.time_s, 6)}
    assert not result.abandoned and result.stop_code == 0


def test_evaluation_perturbs_no_rng_and_restores_the_training_mode(ctx):
    task = Scored()
    ev = _evaluator(task, ctx)
    ev.probe(None)
    task.model.train()
    torch.manual_seed(3)
    random.seed(3)
    before = (torch.get_rng_state(), random.getstate())
    first = ev.run()
    assert torch.equal(torch.get_rng_state(), before[0]) and random.getstate() == before[1]
    assert task.model.training
    task.model.eval()
    assert ev.run().metrics == first.metrics and not task.model.training  # eval mode stays eval mode
    assert first.metrics == pytest.approx(task.expected(), rel=1e-12) and first.samples == 11


def test_the_task_metrics_are_checked_at_the_probe(ctx):
    with pytest.raises(ConfigError, match=r"returned \[\] for metric 'abs': expected per-sample values of shape"):
        _evaluator(Scored(mean=True), ctx).probe(None)
    with pytest.raises(ConfigError, match="metric named 'samples'"):
        _evaluator(Scored(names=("samples", "hit")), ctx).probe(None)
    absent = "'eval.metric' = 'acc': the task's evaluate() does not produce it"
    with pytest.raises(ConfigError, match=re.escape(absent)):
        _evaluator(Scored(), ctx).probe("acc")
    empty = Scored(n_eval=0)
    with pytest.raises(ConfigError, match="eval_dataset is empty"):
        _evaluator(empty, ctx)


def test_a_stop_request_abandons_the_eval(ctx):
    ev = _evaluator(Scored(), ctx)
    ev.probe(None)
    seen = []
    result = ev.run(interrupt=lambda: STOP if len(seen) >= 2 else 0, progress=seen.append)
    assert result.abandoned and result.stop_code == STOP and result.metrics == {} and result.samples == 0
    assert seen == [1, 2]


def _two_rank_eval(ctx, lockstep: bool):
    """On each rank: the exact eval of an 11-sample set in batches of 3 (rank 0: 5 samples, rank 1: 6); an eval
    that only rank 1 is asked to stop; a probe where the ranks' metric names differ."""
    task = Scored(n_eval=11)
    ev = _evaluator(task, ctx, lockstep=lockstep)
    out = {"names": ev.probe("hit"), "share": len(list(ev._my_batches()))}
    result = ev.run()
    out.update(metrics=result.metrics, samples=result.samples, expected=task.expected())
    stopped = ev.run(interrupt=lambda: PREEMPT if ctx.rank == 1 else 0)
    out["stopped"] = (stopped.abandoned, stopped.stop_code)
    both = ev.run(interrupt=lambda: STOP if ctx.rank == 0 else PREEMPT)
    out["both"] = both.stop_code
    try:
        _evaluator(Scored(names=("abs", "hit") if ctx.rank == 0 else ("abs", "acc")), ctx).probe(None)
    except ConfigError as exc:
        out["differ"] = str(exc)
    return out


@pytest.mark.parametrize("lockstep", [False, True])
def test_two_ranks_evaluate_every_sample_once_with_uneven_shares(lockstep):
    ranks = run_on_ranks(_two_rank_eval, lockstep)
    assert [r["share"] for r in ranks] == [2, 2]  # 5 samples: 3 + 2; 6 samples: 3 + 3
    for r in ranks:
        assert r["names"] == ["abs", "hit"] and r["samples"] == 11
        assert r["metrics"] == pytest.approx(r["expected"], rel=1e-12)  # the whole set's mean, not a mean of means
        assert r["stopped"] == (True, PREEMPT) and r["both"] == PREEMPT  # the strongest request of any rank
        assert "rank 0: abs, hit; rank 1: abs, acc" in r["differ"]
    assert ranks[0]["metrics"] == ranks[1]["metrics"]
