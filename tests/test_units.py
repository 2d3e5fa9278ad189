"""Fast in-process checks of the pieces: config tree, global sample order, prefix stripping, LR schedule."""

from __future__ import annotations

import dataclasses
import itertools
import subprocess
import sys

import pytest
import torch
from conftest import ROOT

from workers.checkpoint import strip_wrapper_prefixes
from workers.config import Config, ConfigError, config_from_dict, dump_config, load_config, plan_batches
from workers.data import GlobalOrder, StepBatchSampler
from workers.optim import lr_factor


def test_config_loads_overrides_and_round_trips(tmp_path):
    cfg = load_config(
        ROOT / "configs/quickstart.yaml",
        ["train.max_steps=7", "optim.betas=[0.8, 0.9]", "task.args.hidden=8", "train.init_from=null"],
    )
    assert cfg.train.max_steps == 7 and cfg.optim.betas == (0.8, 0.9) and cfg.task.args["hidden"] == 8
    assert isinstance(cfg.optim.lr, float)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train.max_steps = 3  # type: ignore[misc]
    (tmp_path / "c.yaml").write_text(dump_config(cfg))
    assert load_config(tmp_path / "c.yaml") == cfg


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("trian.max_steps=3", "did you mean 'train.max_steps'"),
        ("data.global_bach_size=3", "did you mean 'data.global_batch_size'"),
        ("train.seed=true", "expected int, got bool"),
        ("optim.betas=[1]", "expected a list of 2 items"),
        ("train.max_steps=0", "must be >= 1"),
        ("train.max_steps", "is not key=value"),
        ("task.factory=nocolon", "expected 'package.module:function'"),
        ("train.max_steps.x=1", "expected int, got dict"),
    ],
)
def test_config_errors_name_the_key_and_hint(override, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        config_from_dict({}, [override])


def test_batch_plan_is_derived_and_checked():
    cfg = config_from_dict({"data": {"global_batch_size": 48}, "train": {"grad_accum_steps": 2}})
    plan = plan_batches(cfg, 3)
    assert (plan.per_rank_batch, plan.micro_batch, plan.accum_steps) == (16, 8, 2)
    micro = config_from_dict({"data": {"global_batch_size": 48, "micro_batch_size": 4}})
    assert plan_batches(micro, 1).accum_steps == 12 and plan_batches(micro, 4).accum_steps == 3
    with pytest.raises(ConfigError, match="not divisible by world size 5"):
        plan_batches(cfg, 5)


def test_config_errors_need_no_torch():
    """Config errors answer before torch is imported (fast failure for a typo)."""
    code = (
        "import sys; from workers.config import load_config, ConfigError\n"
        "try: load_config('configs/quickstart.yaml', ['train.nope=1'])\n"
        "except ConfigError: pass\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def test_global_order_is_the_same_for_every_world_size_and_cursor():
    n, gbs, steps = 50, 12, 10  # crosses epoch boundaries mid-batch
    order = GlobalOrder(n, seed=3)
    stream = [order.take(s * gbs, gbs) for s in range(steps)]
    for epoch in range(3):  # each epoch is a permutation, and epochs differ
        perm = order.permutation(epoch).tolist()
        assert sorted(perm) == list(range(n))
    assert order.permutation(0).tolist() != order.permutation(1).tolist()
    for ws in (1, 2, 3, 4):
        cfg = config_from_dict({"data": {"global_batch_size": gbs}})
        plan = plan_batches(cfg, ws)
        for start in (0, 4):  # from scratch and resumed at step 4
            per_rank = [iter(StepBatchSampler(n, 3, plan, r, start)) for r in range(ws)]
            for s in range(start, steps):
                items = [item for it in per_rank for item in next(it)]
                assert [i for _, i in items] == stream[s], (ws, start, s)
                assert [p for p, _ in items] == list(range(s * gbs, (s + 1) * gbs))  # stream positions


def test_strip_wrapper_prefixes_only_when_every_key_has_them():
    t = torch.zeros(1)
    assert strip_wrapper_prefixes({"_orig_mod.module.a": t, "_orig_mod.module.b": t}).keys() == {"a", "b"}
    mixed = {"module.a": t, "b": t}  # a real submodule named "module": keep it
    assert strip_wrapper_prefixes(mixed).keys() == mixed.keys()


def test_lr_schedule_warms_up_then_decays_by_global_step():
    cfg = Config().optim.__class__(lr=1.0, warmup_steps=4, schedule="cosine", min_lr_ratio=0.1)
    factors = [lr_factor(cfg, 20, s) for s in range(21)]
    assert factors[:4] == [0.25, 0.5, 0.75, 1.0]
    assert all(a >= b for a, b in itertools.pairwise(factors[3:]))
    assert factors[20] == pytest.approx(0.1)


def test_unwrap_peels_compile_and_dataparallel_in_any_nesting():
    from torch import nn

    from workers.checkpoint import unwrap

    model = nn.Linear(2, 2)
    assert unwrap(torch.compile(nn.DataParallel(model))) is model
    assert unwrap(nn.DataParallel(torch.compile(model))) is model


class _RandomSamples:
    def __len__(self) -> int:
        return 10

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.rand(3)  # augmentation drawn from the global RNG, as user code does


def test_samples_are_seeded_by_stream_position_unless_the_task_opts_out():
    from workers.data import IndexedDataset
    from workers.slurm import parse_time_left

    seeded = IndexedDataset(_RandomSamples(), seed=7)
    a, b = seeded[(42, 3)][1], seeded[(42, 3)][1]
    assert torch.equal(a, b) and not torch.equal(a, seeded[(43, 3)][1])  # a function of the stream position
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    plain = IndexedDataset(_RandomSamples(), seed=7, seed_samples=False)
    assert torch.equal(plain[(42, 3)][1], expected)  # opted out: the RNG is left alone
    # squeue's time-left format (used to tell a time limit from a preemption)
    assert [parse_time_left(t) for t in ("0:45", "1:02:03", "2-00:00:10", "UNLIMITED")] == [45, 3723, 172810, None]
