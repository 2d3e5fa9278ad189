"""The trainer in-process (world size 1, no process group): built in one piece, it trains, stops on request with a
save, resumes bitwise, evaluates and selects; its progress is the state a checkpoint holds."""

from __future__ import annotations

import json
import re

import pytest
import torch

from workers.config import config_from_dict
from workers.dist import DistContext
from workers.errors import ConfigError
from workers.rundir import RunDir
from workers.stop import NONE, STOP, StopFlag
from workers.train.parts import build_parts
from workers.train.trainer import Trainer


def _cfg(run, *overrides: str):
    base = {
        "run": {"dir": str(run)},
        "task": {"factory": "workers.tasks.quickstart:build", "args": {"n": 96, "hidden": 8, "eval_n": 24}},
        "data": {"global_batch_size": 8},
        "train": {"max_steps": 8, "checkpoint_every": 4, "log_every": 2, "seed": 3},
        "optim": {"lr": 0.01, "warmup_steps": 2},
        "tracking": {"mode": "disabled"},
    }
    return config_from_dict(base, list(overrides))


def _ctx() -> DistContext:
    return DistContext.from_env("cpu", env={})


def _fit(cfg, stop: StopFlag | None = None):
    RunDir(cfg.run.dir).root.mkdir(parents=True, exist_ok=True)  # (the launch's preflight makes it)
    return Trainer(cfg, _ctx(), RunDir(cfg.run.dir), stop=stop).fit()


class StopAt(StopFlag):
    """A stop request that arrives while step ``at`` is in flight (as a signal would set the flag)."""

    def __init__(self, at: int) -> None:
        super().__init__()
        self.at = at

    @property
    def code(self) -> int:
        return STOP if self.current_step >= self.at else NONE

    @code.setter
    def code(self, value: int) -> None:
        pass


def _weights(run, step: int) -> dict[str, torch.Tensor]:
    return torch.load(RunDir(run).step_dir(step) / "model.pt", weights_only=True)


def test_a_run_stopped_and_resumed_ends_bitwise_equal_to_one_that_never_stopped(tmp_path):
    straight = _fit(_cfg(tmp_path / "a"))
    assert (straight.step, straight.stopped_early) == (8, False)

    half = _fit(_cfg(tmp_path / "b"), StopAt(5))  # 5 is not a checkpoint step: the stop saves it
    assert (half.step, half.stopped_early) == (5, True)
    again = _fit(_cfg(tmp_path / "b"))
    assert again.step == 8
    a, b = _weights(tmp_path / "a", 8), _weights(tmp_path / "b", 8)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_stop_request_saves_the_step_in_flight_and_leaves(tmp_path):
    stop = StopFlag()
    stop.code = STOP  # as the signal handler sets it
    result = _fit(_cfg(tmp_path / "r"), stop)
    assert (result.step, result.stopped_early, result.stop_reason) == (1, True, "stop")
    assert RunDir(tmp_path / "r").latest_name() == "step-00000001"
    rows = [line for line in RunDir(tmp_path / "r").metrics.read_text().splitlines() if line]
    assert rows and '"step": 1' in rows[-1]  # the row of the step is written before its checkpoint exists


def test_nothing_to_do_at_max_steps(tmp_path):
    _fit(_cfg(tmp_path / "r", "train.max_steps=2"))
    trainer = Trainer(_cfg(tmp_path / "r", "train.max_steps=2"), _ctx(), RunDir(tmp_path / "r"))
    assert trainer.fit().step == 2 and trainer.step == 2


def test_evaluation_and_selection_keep_the_best_checkpoint(tmp_path):
    cfg = _cfg(tmp_path / "r", "eval.every=2", "eval.keep_best=1", "train.keep_checkpoints=1")
    assert _fit(cfg).step == 8
    paths = RunDir(tmp_path / "r")
    best = paths.best_name()
    assert best is not None and (paths.checkpoints / best).is_dir()
    evals = [line for line in paths.metrics.read_text().splitlines() if "eval/loss" in line]
    assert len(evals) == 4  # steps 2, 4, 6, 8


def test_the_progress_is_the_checkpoints_train_state(tmp_path):
    parts = build_parts(_cfg(tmp_path / "r", "eval.every=2"), _ctx(), RunDir(tmp_path / "r"))
    parts.progress.step = 4
    state = parts.progress.state_dict()
    assert (state.step, state.samples_seen, state.global_batch_size, state.seed) == (4, 32, 8, 3)
    assert state.optimizer == "AdamW" and state.selection is not None and state.nonfinite_skipped == 0
    plan = parts.progress.save_plan()
    assert plan.export_model is False and plan.best_step is None  # export_model=final; nothing evaluated yet
    parts.progress.step = 8
    assert parts.progress.save_plan().export_model is True
    parts.progress.load_state_dict(state)
    assert parts.progress.step == 4


def test_the_parts_are_frozen_and_refuse_a_config_they_cannot_run(tmp_path):
    parts = build_parts(_cfg(tmp_path / "r"), _ctx(), RunDir(tmp_path / "r"))
    with pytest.raises(AttributeError):
        parts.model = None  # type: ignore[misc]
    assert parts.evaluator is None and parts.selection is None and not parts.sharded
    with pytest.raises(ConfigError, match=r"'train\.sync_batchnorm' = True: torch's SyncBatchNorm runs on CUDA"):
        build_parts(_cfg(tmp_path / "r", "train.sync_batchnorm=true"), _ctx(), RunDir(tmp_path / "r"))
    no_eval = _cfg(tmp_path / "r", "task.args={n: 96, hidden: 8, eval_n: 0}", "eval.every=2")
    with pytest.raises(ConfigError, match=r"'eval\.every' = 2: the task has no eval_dataset"):
        build_parts(no_eval, _ctx(), RunDir(tmp_path / "r"))


def test_a_stop_agreed_at_the_last_step_still_runs_the_final_eval(tmp_path):
    """A resume at max_steps has nothing to do: an eval due at the last step cannot wait for it."""
    cfg = _cfg(tmp_path / "r", "eval.every=3", "eval.at_end=true")
    result = _fit(cfg, StopAt(8))
    assert (result.step, result.stopped_early, result.stop_reason) == (8, True, "stop")
    evals = [json.loads(line)["step"] for line in RunDir(tmp_path / "r").metrics.read_text().splitlines()
             if "eval/loss" in line]  # fmt: skip
    assert evals == [3, 6, 8]
    assert _fit(cfg).step == 8  # and the relaunch finds nothing left to do


def test_what_a_failed_start_opened_is_closed(tmp_path, monkeypatch):
    from workers.train import trainer as trainer_module

    closed = []
    real_close = trainer_module.ReportingSession.close
    monkeypatch.setattr(
        trainer_module.ReportingSession, "close", lambda self, quick: closed.append(quick) or real_close(self, quick)
    )

    def unwritable(*args: object) -> None:
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(trainer_module, "IndexRecorder", unwritable)
    with pytest.raises(OSError, match="Read-only"):
        _fit(_cfg(tmp_path / "r", "data.record_indices=true"))
    assert closed == [True]  # the reporting (metrics file, wandb, progress bar) was closed, quickly


def test_an_empty_dataset_is_a_usage_error_before_anything_runs(tmp_path):
    cfg = _cfg(tmp_path / "r", "task.args={n: 0, hidden: 8, eval_n: 0}")
    with pytest.raises(
        ConfigError, match=r"'task\.factory' = 'workers\.tasks\.quickstart:build': the task's dataset is empty"
    ):
        build_parts(cfg, _ctx(), RunDir(tmp_path / "r"))


def test_a_task_that_declares_tokens_gets_tokens_per_s_and_no_mfu_on_a_cpu(tmp_path):
    cfg = config_from_dict(
        {
            "run": {"dir": str(tmp_path / "r")},
            "task": {"factory": "workers.tasks.charlm:build", "args": {"block_size": 16, "d_model": 16, "n_layers": 1}},
            "data": {"global_batch_size": 4},
            "train": {"max_steps": 2, "log_every": 1, "checkpoint_every": 2},
            "tracking": {"mode": "disabled"},
        }
    )
    assert _fit(cfg).step == 2
    rows = [json.loads(line) for line in RunDir(tmp_path / "r").metrics.read_text().splitlines()]
    assert rows and all(r["tokens_per_s"] == pytest.approx(r["samples_per_s"] * 16, rel=1e-3) for r in rows)
    assert not any("mfu" in r for r in rows)  # a CPU has no known peak


def test_a_task_declaring_a_nonsense_rate_is_named():
    from workers.tasks import resolve
    from workers.tasks.quickstart import build

    task = build(n=8, hidden=4, eval_n=0)
    task.flops_per_sample = -3
    with pytest.raises(ConfigError, match="the task's flops_per_sample is -3: it must be a positive number"):
        resolve(task)


def test_a_profile_window_writes_a_chrome_trace_of_the_profiled_rank(tmp_path):
    cfg = _cfg(tmp_path / "r", "profile.start_step=3", "profile.steps=2")
    assert _fit(cfg).step == 8
    traces = sorted((tmp_path / "r" / "profile").iterdir())
    assert [t.name for t in traces] == ["trace-rank-0-steps-3-4.json"]
    trace = json.loads(traces[0].read_text())
    assert trace["traceEvents"] and any("aten::" in e.get("name", "") for e in trace["traceEvents"])


@pytest.mark.parametrize(
    ("overrides", "said"),
    [
        (["profile.start_step=3", "profile.steps=0"], "'profile.steps' = 0: must be in [1, 100000]"),
        (["profile.start_step=9"], "'profile.start_step' = 9: past train.max_steps=8"),
        (["profile.start_step=-1"], "'profile.start_step' = -1: must be in"),
        (["profile.start_step=2", "profile.ranks=[0, 3]"], "'profile.ranks' = [0, 3]: rank 3 is outside the world"),
    ],
)
def test_a_profile_that_cannot_run_is_a_usage_error(tmp_path, overrides, said):
    with pytest.raises(ConfigError, match=re.escape(said)):
        build_parts(_cfg(tmp_path / "r", *overrides), _ctx(), RunDir(tmp_path / "r"))


@pytest.mark.parametrize("mode", ["fsdp", "hsdp"])
def test_a_model_state_that_is_no_tensor_is_refused_naming_the_sharded_mode(mode):
    from workers.config import TrainConfig
    from workers.parallel import shard
    from workers.tasks import resolve
    from workers.tasks.quickstart import build

    class Counted(torch.nn.Linear):
        def get_extra_state(self) -> dict:
            return {"calls": 3}  # a state_dict entry that is no tensor

        def set_extra_state(self, state: dict) -> None:
            pass

    raw = build(n=8, hidden=4)
    raw.model = torch.nn.Sequential(Counted(4, 4))
    task = resolve(raw, "workers.tasks.quickstart:build")
    with pytest.raises(ConfigError, match=rf"a dict, not a tensor: train\.parallel={mode} checkpoints hold tensors"):
        shard(task.model, task, _ctx(), TrainConfig(parallel=mode))
