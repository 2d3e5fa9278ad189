"""workers/config/: YAML + dotted overrides into one frozen typed tree, one-line ConfigErrors naming the key, the
per-rank batch plan, the resume checks and the diff told at a resume."""

from __future__ import annotations

import dataclasses
import re

import pytest

from workers.config import (
    Config,
    ConfigError,
    check_node_range,
    check_not_past_the_end,
    check_resume_compatible,
    config_changes,
    config_from_dict,
    dump_config,
    load_config,
    plan_batches,
)
from workers.contract import TrainState


def _one_line_error(overrides: list[str], data: dict | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        config_from_dict(data or {}, overrides)
    message = str(info.value)
    assert "\n" not in message, message
    return message


def test_yaml_and_overrides_make_a_typed_frozen_tree_that_round_trips(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(
        "run: {dir: runs/x}\n"
        "train:\n  max_steps: 1e3\n  seed: 5\n"
        "optim: {lr: 3e-4, betas: [0.8, 0.99]}\n"
        "train.log_every: 7\n"  # a dotted top-level key nests into its section
    )
    cfg = load_config(path, ["data.global_batch_size=48", "task.args={n: 64, hidden: 8}", "train.nonfinite=off"])
    assert cfg.train.max_steps == 1000 and type(cfg.train.max_steps) is int  # YAML 1.2 float notation, whole
    assert cfg.optim.lr == 3e-4 and type(cfg.optim.lr) is float
    assert cfg.optim.betas == (0.8, 0.99)  # a list in YAML, the schema's tuple here
    assert cfg.train.log_every == 7 and cfg.train.seed == 5
    assert cfg.data.global_batch_size == 48 and cfg.task.args == {"n": 64, "hidden": 8}
    assert cfg.train.nonfinite == "off"  # YAML reads a bare `off` as false
    assert cfg.launch.nproc == 1 and cfg.eval.enabled is False  # defaults fill the rest
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train.max_steps = 3
    again = tmp_path / "again.yaml"
    again.write_text(dump_config(cfg))
    assert load_config(again) == cfg
    assert config_from_dict(cfg.to_dict()) == cfg


def test_a_string_that_looks_like_a_float_survives_the_dump():
    cfg = config_from_dict({"tracking": {"name": "3e-4"}})
    assert cfg.tracking.name == "3e-4"
    assert "'3e-4'" in dump_config(cfg) or '"3e-4"' in dump_config(cfg)


@pytest.mark.parametrize(
    ("override", "key", "words"),
    [
        ("data.global_batch_size=0", "data.global_batch_size", "must be in [1"),
        ("optim.name=lion", "optim.name", "must be one of adamw, adam, sgd"),
        ("train.precision=fp8", "train.precision", "must be one of"),
        ("optim.betas=[0.9, 1.0]", "optim.betas[1]", "must be in [0.0, 1.0)"),
        ("optim.betas=[0.9]", "optim.betas", "expected a list of 2 items"),
        ("train.seed=-1", "train.seed", "must be in [0"),
        ("optim.lr=.nan", "optim.lr", "finite"),
        ("train.max_steps=2.5", "train.max_steps", "a fraction"),
        ("train.max_steps=true", "train.max_steps", "expected int, got bool"),
        ("train.max_steps=99999999999999999999", "train.max_steps", "out of range"),
        ("run.dir=~", "run.dir", "got no value"),
        ("run.dir=/", "run.dir", "file system's root"),
        ("launch.device=tpu", "launch.device", "must be one of auto, cpu, cuda"),
        ("eval.mode=up", "eval.mode", "must be one of min, max"),
        ("task.factory=nocolon", "task.factory", "package.module:function"),
    ],
)
def test_a_bad_value_is_one_line_naming_the_key(override, key, words):
    message = _one_line_error([override])
    assert f"'{key}'" in message and words in message, message


def test_settings_valid_alone_are_refused_together():
    assert config_from_dict({}, ["train.sync_batchnorm=true"]).train.sync_batchnorm is True
    assert config_from_dict({}, ["train.parallel=fsdp"]).train.parallel == "fsdp"
    message = _one_line_error(["train.sync_batchnorm=true", "train.parallel=fsdp"])
    assert "'train.sync_batchnorm'" in message and "train.parallel=fsdp" in message
    assert "'train.precision' = 'fp16'" in _one_line_error(["train.precision=fp16", "train.parallel=fsdp"])


def test_unknown_keys_get_a_did_you_mean():
    assert "did you mean 'train.max_steps'?" in _one_line_error(["train.max_step=3"])
    assert "did you mean 'train.max_steps'?" in _one_line_error([], {"trian": {"max_steps": 3}})
    assert "did you mean 'optim.warmup_steps'?" in _one_line_error(["optim.warmup=3"])
    assert "valid sections:" in _one_line_error(["zzzz=1"])


def test_malformed_overrides_and_sections():
    assert "is not key=value" in _one_line_error(["train.max_steps"])
    assert "is not a section" in _one_line_error(["train.max_steps=3", "train.max_steps.x=1"])
    assert "expected a mapping (a section)" in _one_line_error(["train=3"])
    assert "control character" in _one_line_error(["run.dir=a\nb"])


def test_a_key_given_twice_in_a_file_names_both_lines(tmp_path):
    twice = tmp_path / "twice.yaml"
    twice.write_text("train:\n  max_steps: 3\n  max_steps: 4\n")
    with pytest.raises(ConfigError, match=r"'max_steps' is given twice \(lines 2 and 3\)"):
        load_config(twice)
    both_ways = tmp_path / "both.yaml"
    both_ways.write_text("train:\n  seed: 1\ntrain.seed: 2\n")
    with pytest.raises(ConfigError, match=r"'train.seed' is given twice \(lines 2 and 3"):
        load_config(both_ways)
    with pytest.raises(ConfigError, match="is given twice"):  # the same without the lines: a dict from code
        config_from_dict({"train": {"seed": 1}, "train.seed": 2})


def test_config_file_problems_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="is a directory"):
        load_config(tmp_path)
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  max_steps: [1,\n")
    with pytest.raises(ConfigError, match=r"is not valid YAML at line \d+"):
        load_config(bad)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("42\n")
    with pytest.raises(ConfigError, match="must be a YAML mapping"):
        load_config(scalar)


@pytest.mark.parametrize(("world", "accum", "expected"), [(1, 2, (24, 12, 2)), (2, 2, (12, 6, 2)), (3, 2, (8, 4, 2))])
def test_the_batch_plan_keeps_the_global_batch_on_any_world_size(world, accum, expected):
    cfg = config_from_dict({}, ["data.global_batch_size=24", f"train.grad_accum_steps={accum}"])
    plan = plan_batches(cfg, world)
    assert (plan.per_rank_batch, plan.micro_batch, plan.accum_steps) == expected
    assert plan.per_rank_batch * world == plan.global_batch_size == 24
    assert plan.micro_batch * plan.accum_steps == plan.per_rank_batch


def test_a_micro_batch_derives_the_accumulation_and_indivisible_plans_are_refused():
    cfg = config_from_dict({}, ["data.global_batch_size=24", "data.micro_batch_size=4"])
    assert (plan_batches(cfg, 3).accum_steps, plan_batches(cfg, 2).accum_steps) == (2, 3)
    with pytest.raises(ConfigError, match=r"'data.global_batch_size' = 24: not divisible by world size 4 x data."):
        plan_batches(cfg, 4)
    accum = config_from_dict({}, ["data.global_batch_size=24", "train.grad_accum_steps=5"])
    with pytest.raises(ConfigError, match=re.escape("train.grad_accum_steps 5")):
        plan_batches(accum, 1)


def test_a_node_range_names_the_key_each_refused_node_count_does_not_fit():
    base = ["data.global_batch_size=24", "train.grad_accum_steps=1", "slurm.tasks_per_node=2"]
    cfg = config_from_dict({}, [*base, "train.parallel=hsdp", "train.shard_size=4", "slurm.nodes=1-4"])
    with pytest.raises(ConfigError) as caught:  # world sizes 2, 4, 6, 8: each divides the batch of 24
        check_node_range(cfg)
    assert str(caught.value) == (
        "config key 'slurm.nodes' = '1-4': with 1, 3 node(s) x 2 task(s) the world size would not be a multiple of "
        "train.shard_size 4. HINT: use node counts that fit (2, 4)"
    )
    both = config_from_dict({}, [*base, "train.parallel=hsdp", "train.shard_size=4", "slurm.nodes=1-8"])
    with pytest.raises(ConfigError, match=r"with 1, 3, 5, 7 node\(s\) x 2 task\(s\) the world size would not be a "
                       r"multiple of train\.shard_size 4; with 8 node\(s\) x 2 task\(s\) the world size would not "
                       r"divide data\.global_batch_size 24 .*HINT: use node counts that fit \(2, 4, 6\)"):  # fmt: skip
        check_node_range(both)
    check_node_range(config_from_dict({}, [*base, "train.parallel=hsdp", "train.shard_size=2", "slurm.nodes=1-4"]))


def test_a_node_range_names_every_node_count_whose_world_size_does_not_divide_the_batch():
    def refusal(nodes: str, tasks: int = 1) -> str:
        cfg = config_from_dict({}, [f"slurm.nodes={nodes}", f"slurm.tasks_per_node={tasks}",
                                    "data.global_batch_size=24", "train.grad_accum_steps=2"])  # fmt: skip
        with pytest.raises(ConfigError) as info:
            check_node_range(cfg)
        assert "\n" not in str(info.value)
        return str(info.value)

    # 24 samples in 2 micro-steps: world sizes 1, 2, 3, 4, 6, 12 work; 5, 7 and 8 do not
    message = refusal("1-8")
    assert "'slurm.nodes' = '1-8': with 5, 7, 8 node(s) x 1 task(s) the world size would not divide" in message
    assert "use node counts that fit (1, 2, 3, 4, 6)" in message
    message = refusal("2-4", tasks=2)  # world sizes 4, 6, 8: only 8 fails
    assert "with 4 node(s) x 2 task(s)" in message and "(2, 3)" in message
    assert "with 3, 5 node(s) x 3 task(s)" in refusal("3-5", tasks=3)  # 9 and 15 fail, 12 works
    check_node_range(config_from_dict({}, ["slurm.nodes=1-4", "data.global_batch_size=24"]))  # all divide


def test_a_resume_that_would_change_the_data_is_refused():
    cfg = config_from_dict({}, ["train.seed=3", "data.global_batch_size=8", "train.max_steps=10"])
    saved = TrainState(
        step=6, samples_seen=48, world_size=2, global_batch_size=8, seed=3, task=cfg.task.factory, dataset_len=100
    )
    check_resume_compatible(cfg, saved, "ckpt", dataset_len=100)  # the same: nothing to say
    check_not_past_the_end(cfg, saved, "ckpt")
    for override, key in (
        ("train.seed=4", "train.seed"),
        ("data.global_batch_size=16", "data.global_batch_size"),
        ("task.factory=a.b:c", "task.factory"),
    ):
        changed = config_from_dict(cfg.to_dict(), [override])
        with pytest.raises(ConfigError, match=rf"'{key}' = .*the checkpoint in ckpt was saved with"):
            check_resume_compatible(changed, saved, "ckpt", dataset_len=100)
    with pytest.raises(ConfigError, match="its dataset's length"):
        check_resume_compatible(cfg, saved, "ckpt", dataset_len=101)
    shorter = config_from_dict(cfg.to_dict(), ["train.max_steps=5"])
    with pytest.raises(ConfigError, match=re.escape("'train.max_steps' = 5: the run in ckpt is already at step 6")):
        check_not_past_the_end(shorter, saved, "ckpt")
    old = TrainState(step=6, samples_seen=48, world_size=2, global_batch_size=8, seed=3)  # no task recorded
    check_resume_compatible(config_from_dict(cfg.to_dict(), ["task.factory=a.b:c"]), old, "ckpt", dataset_len=5)


def test_config_changes_name_what_differs_except_where_and_how_many():
    saved = config_from_dict({}, ["run.dir=/tmp/a", "launch.nproc=2", "task.args={n: 8}", "optim.lr=0.1"])
    now = config_from_dict(
        saved.to_dict(), ["run.dir=/tmp/b", "launch.nproc=3", "task.args={n: 9}", "optim.lr=0.2", "train.parallel=fsdp"]
    )
    assert config_changes(saved, now) == [
        "optim.lr: 0.1 -> 0.2",
        "task.args: {'n': 8} -> {'n': 9}",  # the factory's arguments are one value
        "train.parallel: 'ddp' -> 'fsdp'",
    ]
    assert config_changes(saved, saved) == []
    assert isinstance(Config(), Config) and config_changes(Config(), config_from_dict({})) == []


def test_a_key_glued_to_its_value_is_named_with_the_space_yaml_needs(tmp_path):
    """`{n:200}` is YAML for one key "n:200" with no value: a factory would get an unknown keyword, a retried crash."""
    with pytest.raises(ConfigError, match=r"override 'task.args=\{n:200\}': 'n:200' is one key with no value: YAML "
                                          r"needs a space after ':' \(write 'n: 200'\)"):  # fmt: skip
        config_from_dict({}, ["task.args={n:200}"])
    path = tmp_path / "c.yaml"
    path.write_text("task:\n  args: {hidden:32}\n")
    with pytest.raises(ConfigError, match=r"line 2.*'hidden:32' is one key with no value.*'hidden: 32'"):
        load_config(path)
    assert config_from_dict({}, ["task.args={url: 'http://x:80', n: 2}"]).task.args["url"] == "http://x:80"
