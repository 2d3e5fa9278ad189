"""workers/optim.py: the built-in warmup + decay by global step, the built-in optimizers and their weight-decay
groups, the task's own optimizer and scheduler (and the ConfigErrors for unusable ones), and a resume's settings."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from torch import nn

from workers.config import config_from_dict
from workers.errors import ConfigError
from workers.optim import apply_on_resume, build, describe, group_settings, lr_factor, no_decay_names
from workers.tasks import resolve

from .helpers import quick_task


def _optim(*overrides: str):
    return config_from_dict({}, list(overrides)).optim


@pytest.mark.parametrize(
    ("schedule", "expected"),
    [
        # steps 0..3 warm up linearly to 1; then from step 4 (progress 0) to step 20 (progress 1): 1 -> min_lr_ratio
        (
            "cosine",
            {
                0: 0.25,
                1: 0.5,
                3: 1.0,
                4: 1.0,
                8: 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4)),
                12: 0.55,
                20: 0.1,
                50: 0.1,
            },
        ),
        ("linear", {0: 0.25, 3: 1.0, 4: 1.0, 8: 0.775, 12: 0.55, 20: 0.1, 50: 0.1}),
        ("constant", {0: 0.25, 2: 0.75, 4: 1.0, 20: 1.0, 50: 1.0}),
    ],
)
def test_the_lr_factor_warms_up_then_decays_by_global_step(schedule, expected):
    cfg = _optim("optim.warmup_steps=4", f"optim.schedule={schedule}", "optim.min_lr_ratio=0.1")
    for step, factor in expected.items():
        assert lr_factor(cfg, 20, step) == pytest.approx(factor, abs=1e-12), step


def test_without_warmup_the_first_step_has_the_full_lr():
    assert lr_factor(_optim("optim.warmup_steps=0"), 10, 0) == 1.0
    assert lr_factor(_optim("optim.warmup_steps=10"), 10, 10) == 1.0  # warmup as long as the run: no decay
    assert lr_factor(_optim("optim.min_lr_ratio=0"), 10, 10) == 0.0


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(5, 4)
        self.proj = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)
        self.head = nn.Linear(4, 2, bias=False)


def _task(model: nn.Module, **hooks):
    """A task object with ``hooks`` (optimizer, scheduler) resolved through the task contract."""
    obj = type("Own", (), {"model": model, "dataset": [0], "loss": lambda self, m, b: 0, **hooks})()
    return resolve(obj)


def test_auto_no_decay_leaves_out_biases_norms_and_embeddings():
    model = Net()
    assert no_decay_names(model, "auto") == {"embed.weight", "proj.bias", "norm.weight", "norm.bias"}
    assert no_decay_names(model, "none") == set()
    assert no_decay_names(model, ("*.bias", "head.*")) == {"proj.bias", "norm.bias", "head.weight"}
    built = build(_optim("optim.weight_decay=0.1"), _task(model), model, max_steps=10)
    groups = built.optimizer.param_groups
    assert type(built.optimizer) is torch.optim.AdamW and not built.task_optimizer and not built.task_scheduler
    names = {id(p): n for n, p in model.named_parameters()}
    assert [[names[id(p)] for p in g["params"]] for g in groups] == [
        ["proj.weight", "head.weight"],
        ["embed.weight", "proj.bias", "norm.weight", "norm.bias"],
    ]
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
    one = build(_optim("optim.no_decay=none", "optim.name=sgd", "optim.momentum=0.5"), _task(model), model, 10)
    assert len(one.optimizer.param_groups) == 1 and type(one.optimizer) is torch.optim.SGD
    assert one.optimizer.param_groups[0]["momentum"] == 0.5
    with pytest.raises(ConfigError, match=r"'optim.no_decay' = \['\*.gamma'\]: matches no parameter"):
        build(_optim("optim.no_decay=['*.gamma']"), _task(model), model, 10)


def test_the_built_in_schedule_sets_each_steps_lr():
    task = quick_task()
    cfg = _optim("optim.lr=0.5", "optim.warmup_steps=2", "optim.schedule=linear", "optim.min_lr_ratio=0.2")
    built = build(cfg, task, task.model, max_steps=6)
    lrs = []
    for _ in range(7):
        lrs.append(built.optimizer.param_groups[0]["lr"])
        built.optimizer.step()
        built.scheduler.step()
    assert lrs == pytest.approx([0.5 * lr_factor(cfg, 6, s) for s in range(7)], abs=1e-15)
    assert lrs[:3] == pytest.approx([0.25, 0.5, 0.5]) and lrs[6] == pytest.approx(0.1)
    assert built.scheduler.builtin_schedule is True
    line = describe(built, cfg)
    assert line.startswith("optimizer AdamW (built-in), schedule built-in (2 warmup steps, then linear): group 0:")
    assert "lr 0.5," in line  # the configured lr, not the warmup's value at this step


def test_the_tasks_own_optimizer_and_scheduler_are_used():
    model = Net()
    task = _task(
        model,
        optimizer=lambda self, m: torch.optim.SGD(m.parameters(), lr=0.3),
        scheduler=lambda self, opt, steps: torch.optim.lr_scheduler.StepLR(opt, step_size=steps),
    )
    built = build(_optim(), task, model, max_steps=4)
    assert built.task_optimizer and built.task_scheduler and type(built.scheduler).__name__ == "StepLR"
    assert built.optimizer.param_groups[0]["lr"] == 0.3
    assert "schedule the task's" in describe(built, _optim())


@pytest.mark.parametrize(
    ("hooks", "message"),
    [
        ({"optimizer": 3}, "the task's 'optimizer' is int, not a function"),
        ({"optimizer": lambda self, m: "adam"}, "returned str, not a torch.optim.Optimizer"),
        ({"optimizer": lambda self, m: torch.optim.SGD(Net().parameters(), lr=0.1)}, "that is not one of the model's"),
        (
            {
                "optimizer": lambda self, m: torch.optim.SGD(
                    [{"params": [m.proj.weight]}, {"params": [m.proj.weight]}], lr=0.1
                )
            },
            "in more than one parameter group",
        ),
        (
            {"optimizer": lambda self, m: torch.optim.SGD([m.proj.weight, m.proj.weight], lr=0.1)},
            "holds 'proj.weight' twice",
        ),
        ({"optimizer": lambda self, m: torch.optim.SGD(m.parameters(), lr=-1.0)}, "failed: ValueError: Invalid"),
        ({"optimizer": lambda self, m: torch.optim.LBFGS(m.parameters())}, "whose step() needs a closure"),
        ({"scheduler": 7}, "the task's 'scheduler' is int, not a function"),
        ({"scheduler": lambda self, opt, steps: object()}, "which lacks step, state_dict, load_state_dict"),
    ],
)
def test_an_unusable_task_hook_is_a_config_error(hooks, message):
    model = Net()
    with pytest.raises(ConfigError) as info:
        build(_optim(), _task(model, **hooks), model, max_steps=4)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_no_trainable_parameters_is_a_config_error():
    model = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ConfigError, match="the model has no trainable parameters"):
        build(_optim(), _task(model), model, 4)


def test_a_resume_applies_the_current_settings_and_the_schedules_lr(caplog):
    model = Net()
    saved_cfg = _optim("optim.lr=0.1", "optim.weight_decay=0.01", "optim.warmup_steps=0", "optim.schedule=constant")
    run = build(saved_cfg, _task(model), model, max_steps=10)
    for _ in range(3):
        run.optimizer.step()
        run.scheduler.step()
    saved = (run.optimizer.state_dict(), run.scheduler.state_dict())
    now_cfg = _optim("optim.lr=0.2", "optim.weight_decay=0.05", "optim.warmup_steps=0", "optim.schedule=linear")
    resumed = build(now_cfg, _task(model), model, max_steps=10)
    fresh = group_settings(resumed.optimizer)
    resumed.optimizer.load_state_dict(saved[0])
    resumed.scheduler.load_state_dict(saved[1])
    assert resumed.optimizer.param_groups[0]["weight_decay"] == 0.01  # what the checkpoint held
    with caplog.at_level(logging.WARNING, logger="workers.optim"):
        apply_on_resume(resumed, fresh, now_cfg, max_steps=10)
    assert "optimizer weight_decay changed on resume: 0.01 -> 0.05" in caplog.text
    groups = resumed.optimizer.param_groups
    assert [g["weight_decay"] for g in groups] == [0.05, 0.0]
    assert [g["lr"] for g in groups] == pytest.approx([0.2 * lr_factor(now_cfg, 10, 3)] * 2)
    assert resumed.scheduler.get_last_lr() == [g["lr"] for g in groups]
    resumed.optimizer.step()
    resumed.scheduler.step()
    assert groups[0]["lr"] == pytest.approx(0.2 * lr_factor(now_cfg, 10, 4))  # the new schedule goes on from there
