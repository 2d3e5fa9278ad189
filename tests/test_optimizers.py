"""The user's optimizer and schedule, parameter groups without weight decay, optimizer state by parameter name, and
checkpoints of the first format — with real gloo process groups and real SIGKILLs.

- a task's own optimizer subclass with two groups at different lrs is the one used and saved (its own state entry
  is in ``optim.pt``, keyed by parameter name), the built-in schedule keeps the groups' lr ratio, and a SIGKILL +
  relaunch is bitwise; the same with the task's own scheduler (which the built-in schedule then leaves alone);
- ``optim.no_decay: auto`` on the charlm model: biases, norms and embeddings get no weight decay;
- a checkpoint of the first format (tests/fixtures/format1, optimizer state by position) resumes with today's code
  to the very bits that run reached then.

Resumes whose model or groups changed are in the bad-input table (tests/test_bad_input.py).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import EVERY, MAX_STEPS, ROOT, cli, launch, launch_and_kill, load, tensors_equal

from workers.config import OptimConfig
from workers.errors import ConfigError
from workers.optim import builtin_optimizer, lr_factor

FIXTURE = ROOT / "tests" / "fixtures" / "format1"


def _names(optim_pt: dict, group: int) -> list[str]:
    return optim_pt["optimizer"]["param_groups"][group]["params"]


@pytest.mark.parametrize("scheduler", ["built-in", "the task's"])
def test_a_tasks_optimizer_and_scheduler_are_used_saved_by_name_and_resume_bitwise(scheduler, tmp_path):
    own = ["task.args.own_optimizer=true"] + (["task.args.own_scheduler=true"] if scheduler == "the task's" else [])
    ref = launch(tmp_path / "ref", 2, *own)
    assert f"optimizer TaggedAdamW (the task's), schedule {scheduler}" in ref.stderr
    assert "group 0: 1 tensors, 512 parameters" in ref.stderr

    saved = load(tmp_path / "ref", "optim.pt")
    assert _names(saved, 0) == ["0.weight"] and _names(saved, 1) == [
        "0.bias",
        "2.weight",
        "2.bias",
        "4.weight",
        "4.bias",
    ]
    state = saved["optimizer"]["state"]
    assert set(state) == {"0.weight", "0.bias", "2.weight", "2.bias", "4.weight", "4.bias"}
    assert all(s["tagged_updates"] == MAX_STEPS for s in state.values())  # the subclass did every step
    lrs = [g["lr"] for g in saved["optimizer"]["param_groups"]]
    if scheduler == "built-in":  # warmup + cosine multiply each group's own lr: the 4:1 ratio holds
        factor = lr_factor(OptimConfig(warmup_steps=3), MAX_STEPS, MAX_STEPS)
        assert lrs == [4e-3 * factor, 1e-3 * factor]
    else:  # StepLR(3, 0.5) alone decides: 12 steps halve the lr four times, no warmup or cosine on top
        assert saved["scheduler_class"] == "StepLR (the task's)"
        assert lrs == [4e-3 * 0.5**4, 1e-3 * 0.5**4]

    run = tmp_path / "killed"
    launch_and_kill(run, 2, *own, "task.args.step_sleep_s=0.1", kill_after=f"step-{EVERY:08d}")
    launch(run, 2, *own)
    assert tensors_equal(load(run), load(tmp_path / "ref"))
    assert tensors_equal(load(run, "optim.pt"), saved)


def test_no_decay_auto_leaves_biases_norms_and_embeddings_out_of_weight_decay():
    from workers.tasks.charlm import TinyGPT

    model = TinyGPT(vocab_size=40, block_size=16, d_model=32, n_heads=2, n_layers=2, dropout=0.0)
    names = {id(p): n for n, p in model.named_parameters()}
    optimizer = builtin_optimizer(OptimConfig(weight_decay=0.1), model)
    decay, plain = ([names[id(p)] for p in g["params"]] for g in optimizer.param_groups)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.1, 0.0]
    # Decayed: the projections only (attention, feed-forward, output head).
    assert sorted(decay) == sorted(
        [f"blocks.{i}.{w}" for i in range(2) for w in ("self_attn.in_proj_weight", "self_attn.out_proj.weight",
                                                      "linear1.weight", "linear2.weight")] + ["head.weight"]
    )  # fmt: skip
    for name in ("tok.weight", "pos.weight", "norm.weight", "norm.bias", "blocks.0.norm1.weight", "blocks.1.norm2.bias",
                 "blocks.0.self_attn.in_proj_bias", "blocks.1.linear1.bias", "head.bias"):  # fmt: skip
        assert name in plain, name
    assert len(decay) + len(plain) == len(list(model.parameters()))

    biases = builtin_optimizer(OptimConfig(weight_decay=0.1, no_decay=("*.bias", "*_bias")), model)
    assert all(names[id(p)].endswith(("bias",)) for p in biases.param_groups[1]["params"])
    assert len(builtin_optimizer(OptimConfig(weight_decay=0.1, no_decay="none"), model).param_groups) == 1
    with pytest.raises(ConfigError, match=r"'optim.no_decay' = \['emb\*'\]: matches no parameter"):
        builtin_optimizer(OptimConfig(no_decay=("emb*",)), model)


def test_a_checkpoint_of_the_first_format_resumes_to_the_same_bits(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copytree(FIXTURE / "step-00000004", run / "checkpoints" / "step-00000004")
    (run / "checkpoints" / "latest").write_text("step-00000004\n")
    proc = cli(
        "launch", "configs/quickstart.yaml", "--nproc", "1", f"run.dir={run}",
        "task.args={n: 200, hidden: 16, eval_n: 0}", "train.max_steps=8", "train.checkpoint_every=4",
        "data.global_batch_size=8", "tracking.mode=disabled", "train.keep_checkpoints=5", check=True,
    )  # fmt: skip
    assert "resumed from" in proc.stderr and "step 4" in proc.stderr
    final = Path(run / "checkpoints" / "step-00000008")
    then = torch.load(FIXTURE / "final-model-step-8.pt", weights_only=True)
    now = torch.load(final / "model.pt", weights_only=True)
    # The fixture's final weights were computed on another CPU: its kernels may round differently by an ulp (seen:
    # 1.5e-8 on an AMD EPYC). A wrong position -> name mapping of the optimizer state is off by orders more.
    assert now.keys() == then.keys()
    assert max((now[k] - then[k]).abs().max().item() for k in now) <= 1e-6
    rewritten = torch.load(final / "optim.pt", weights_only=True)["optimizer"]
    assert "0.weight" in rewritten["state"]  # today's checkpoints name the state
    # The fixture's manifest has sha256 checksums (it verified, or it would not have resumed); today's, xxh3_128.
    old = json.loads((FIXTURE / "step-00000004" / "manifest.json").read_text())["files"]
    new = json.loads((final / "manifest.json").read_text())["files"]
    assert all("sha256" in e for e in old.values()) and all(set(e) == {"size", "xxh3_128"} for e in new.values())


def test_tied_weights_and_malformed_optimizer_state():
    from torch import nn

    from workers.checkpoint.compat import check_optimizer_fits
    from workers.checkpoint.optim_state import from_named, from_positions, to_named
    from workers.errors import CheckpointError

    class Tied(nn.Module):  # the head registered before the embedding it shares its weight with
        def __init__(self) -> None:
            super().__init__()
            self.head = nn.Linear(8, 20, bias=False)
            self.embed = nn.Embedding(20, 8)
            self.embed.weight = self.head.weight
            self.proj = nn.Linear(8, 8)

    model = Tied()
    groups = builtin_optimizer(OptimConfig(weight_decay=0.1), model).param_groups
    assert [p.shape for p in groups[0]["params"]] == [torch.Size([8, 8])]  # proj.weight only
    assert any(p is model.head.weight for p in groups[1]["params"])  # the tied embedding is not decayed

    # A task optimizer may give one group a key of its own: a resume is not refused for it.
    opt = torch.optim.AdamW(
        [{"params": [model.head.weight], "name": "tied"}, {"params": list(model.proj.parameters())}]
    )
    check_optimizer_fits(Path("ckpt"), opt, opt.state_dict(), "AdamW")
    good = to_named(model, opt)
    assert from_named("ckpt", model, opt, good)["param_groups"][0]["params"] == [0]

    bad_entries = [
        {**good, "param_groups": [good["param_groups"][0], {**good["param_groups"][1], "params": [["proj.weight"]]}]},
        {**good, "param_groups": [{**good["param_groups"][0], "params": ["head.weight", "head.weight"]},
                                  good["param_groups"][1]]},
        {**good, "state": {"head.weight": 5}},
        {**good, "state": {"nothing": {}}},
    ]  # fmt: skip
    for entry in bad_entries:
        with pytest.raises(CheckpointError):
            from_named("ckpt", model, opt, entry)
    for positions in ([0.0, 1, 2], [0, 0, 1]):
        with pytest.raises(CheckpointError):
            from_positions("ckpt", model, opt, {"state": {}, "param_groups": [{"params": positions}]})
