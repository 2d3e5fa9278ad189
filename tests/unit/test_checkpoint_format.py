"""workers/checkpoint/ (the format, not the Checkpointer): manifests and verification on folders built by hand,
the newest valid checkpoint, weights in the usual layouts and their safe loading, the fit checks, durable writes
and host snapshots, optimizer state by parameter name, and rank 0's commit."""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
from pathlib import Path

import pytest
import torch
from torch import nn

from workers.checkpoint import find_latest_valid, load_weights, locate_weights, read_train_state, verify
from workers.checkpoint.commit import Committer, Payload
from workers.checkpoint.compat import check_model_fits, check_optimizer_fits
from workers.checkpoint.files import save_torch_durable, save_torch_files, set_aside, snapshot, write_error
from workers.checkpoint.optim_state import from_named, from_positions, join_tensors, split_tensors, to_named
from workers.checkpoint.states import SavePlan
from workers.checkpoint.weights import first_mismatch, safe_load, strip_wrapper_prefixes, unwrap
from workers.contract import TrainState
from workers.errors import CheckpointError, IncompatibleCheckpointError, UnsafeCheckpointError
from workers.fsutil import file_digest, write_durable
from workers.rundir import MANIFEST_FILE, MODEL_FILE, OPTIM_FILE, STATE_FILE, RunDir


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2))


def _state(step: int) -> TrainState:
    return TrainState(step=step, samples_seen=8 * step, world_size=1, global_batch_size=8, seed=0)


def _commit_by_hand(folder: Path, step: int, model: nn.Module | None = None) -> Path:
    """A committed checkpoint folder as the commit protocol leaves it: three files, the manifest last."""
    folder.mkdir(parents=True)
    files = {
        MODEL_FILE: save_torch_durable(folder / MODEL_FILE, (model or _model(step)).state_dict()),
        OPTIM_FILE: save_torch_durable(folder / OPTIM_FILE, {"optimizer": {"state": {}, "param_groups": []}}),
        STATE_FILE: write_durable(folder / STATE_FILE, _state(step).to_json().encode()),
    }
    (folder / MANIFEST_FILE).write_text(json.dumps({"format": 1, "step": step, "files": files}))
    return folder


@pytest.fixture
def ckpts(run_dir: RunDir) -> RunDir:
    _commit_by_hand(run_dir.step_dir(4), 4)
    _commit_by_hand(run_dir.step_dir(8), 8)
    return run_dir


# ---------------------------------------------------------------- manifest


def test_a_folder_built_by_the_protocol_verifies(ckpts: RunDir):
    manifest = verify(ckpts.step_dir(8))
    assert set(manifest["files"]) == {MODEL_FILE, OPTIM_FILE, STATE_FILE}
    entry = manifest["files"][MODEL_FILE]
    path = ckpts.step_dir(8) / MODEL_FILE
    assert entry["size"] == path.stat().st_size and entry["xxh3_128"] == file_digest(path)
    assert read_train_state(ckpts.step_dir(8)) == _state(8)
    assert find_latest_valid(ckpts.checkpoints) == ckpts.step_dir(8)


def _flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def _edit_manifest(folder: Path, edit) -> None:
    manifest = json.loads((folder / MANIFEST_FILE).read_text())
    edit(manifest)
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest))


def _link_the_model(folder: Path) -> None:
    real = folder.parent / "elsewhere.pt"
    os.replace(folder / MODEL_FILE, real)
    (folder / MODEL_FILE).symlink_to(real)  # same bytes, same checksum: still refused


def _forge_the_state(folder: Path) -> None:
    """A train state whose checksum matches (the manifest rewritten with it) but whose content breaks the schema."""
    text = json.loads((folder / STATE_FILE).read_text())
    entry = write_durable(folder / STATE_FILE, json.dumps({**text, "step": -1}).encode())
    _edit_manifest(folder, lambda m: m["files"].__setitem__(STATE_FILE, entry))


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda f: _flip_last_byte(f / MODEL_FILE), "does not match its checksum (xxh3_128) in the manifest (corrupt)"),
        (lambda f: (f / OPTIM_FILE).write_bytes((f / OPTIM_FILE).read_bytes()[:-5]), "bytes, manifest says"),
        (lambda f: (f / MODEL_FILE).unlink(), "is missing model.pt"),
        (lambda f: (f / MANIFEST_FILE).unlink(), "has no manifest.json (incomplete save)"),
        (lambda f: (f / MANIFEST_FILE).write_text("{not json"), "is unreadable"),
        (lambda f: (f / MANIFEST_FILE).write_text("[]"), "no 'files' mapping"),
        (lambda f: _edit_manifest(f, lambda m: m["files"].pop(OPTIM_FILE)), "manifest does not list optim.pt"),
        (
            lambda f: _edit_manifest(f, lambda m: m["files"].__setitem__("../x", m["files"][MODEL_FILE])),
            "entry '../x' is not {size, checksum}",
        ),
        (lambda f: _edit_manifest(f, lambda m: m["files"][MODEL_FILE].pop("xxh3_128")), "is not {size, checksum}"),
        (lambda f: _edit_manifest(f, lambda m: m["files"][MODEL_FILE].__setitem__("size", True)), "not {size"),
        (_link_the_model, "is a symbolic link, not a file of the checkpoint"),
        (_forge_the_state, "'step' = -1 is negative"),
    ],
)
def test_a_damaged_checkpoint_is_a_checkpoint_error_naming_the_problem(ckpts: RunDir, damage, message):
    folder = ckpts.step_dir(8)
    damage(folder)
    with pytest.raises(CheckpointError) as info:
        verify(folder)
    assert message in str(info.value) and str(folder) in str(info.value)


def test_the_newest_valid_checkpoint_skips_broken_ones_with_a_warning(ckpts: RunDir, caplog):
    _flip_last_byte(ckpts.step_dir(8) / OPTIM_FILE)
    (ckpts.step_dir(12)).mkdir()  # an uncommitted folder: no manifest
    (ckpts.checkpoints / ".tmp-step-00000016-1").mkdir()  # a save in flight: not a step folder
    (ckpts.checkpoints / "step-00000020.invalid-20260101-000000-1").mkdir()  # set aside earlier
    with caplog.at_level(logging.WARNING, logger="workers.checkpoint"):
        assert find_latest_valid(ckpts.checkpoints) == ckpts.step_dir(4)
    skipped = [r.getMessage() for r in caplog.records]
    assert any("step-00000012" in m and "incomplete save" in m for m in skipped)
    assert any("step-00000008" in m and "checksum" in m for m in skipped)
    _flip_last_byte(ckpts.step_dir(4) / MODEL_FILE)
    assert find_latest_valid(ckpts.checkpoints, warn=False) is None
    assert find_latest_valid(ckpts.root / "nowhere") is None


def test_a_checkpoint_of_the_sha256_era_still_verifies(run_dir: RunDir):
    folder = _commit_by_hand(run_dir.step_dir(2), 2)

    def to_sha256(manifest):
        for name, entry in manifest["files"].items():
            entry.pop("xxh3_128")
            entry["sha256"] = hashlib.sha256((folder / name).read_bytes()).hexdigest()

    _edit_manifest(folder, to_sha256)
    verify(folder)
    _flip_last_byte(folder / MODEL_FILE)
    with pytest.raises(CheckpointError, match=r"checksum \(sha256\)"):
        verify(folder)


# ---------------------------------------------------------------- weights


def test_wrapper_prefixes_are_stripped_only_when_every_key_has_them():
    sd = {"a.weight": torch.ones(1), "b.bias": torch.zeros(1)}
    assert strip_wrapper_prefixes({f"module._orig_mod.{k}": v for k, v in sd.items()}).keys() == sd.keys()
    assert strip_wrapper_prefixes({f"_orig_mod.module.{k}": v for k, v in sd.items()}).keys() == sd.keys()
    mixed = {"module.weight": torch.ones(1), "head.weight": torch.ones(1)}  # a submodule really named `module`
    assert strip_wrapper_prefixes(mixed).keys() == mixed.keys()
    assert strip_wrapper_prefixes({}) == {}


class _Compiled(nn.Module):
    """What ``torch.compile`` wraps a model in, as far as unwrapping goes (its ``_orig_mod``), without importing
    dynamo (seconds)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self._orig_mod = inner


def test_unwrap_peels_dataparallel_and_compile_wrappers_in_any_nesting():
    model = _model()
    assert unwrap(nn.DataParallel(_Compiled(nn.DataParallel(model)))) is model
    assert unwrap(_Compiled(_Compiled(model))) is model and unwrap(model) is model
    assert set(nn.DataParallel(_Compiled(model)).state_dict()) == {f"module._orig_mod.{k}" for k in model.state_dict()}


@pytest.mark.parametrize("layout", ["plain", "model", "state_dict", "model_state_dict", "module.", "_orig_mod."])
def test_load_weights_reads_the_usual_layouts(tmp_path, layout):
    sd = _model(3).state_dict()
    obj = {f"{layout}{k}": v for k, v in sd.items()} if layout.endswith(".") else sd
    obj = obj if layout == "plain" or layout.endswith(".") else {layout: sd, "epoch": torch.tensor(3)}
    torch.save(obj, tmp_path / "w.pt")
    loaded = load_weights(tmp_path / "w.pt")
    assert loaded.keys() == sd.keys() and all(torch.equal(loaded[k], sd[k]) for k in sd)


def test_load_weights_of_a_run_dir_or_checkpoint_folder(ckpts: RunDir):
    expected = _model(8).state_dict()
    for where in (ckpts.root, ckpts.step_dir(8)):
        assert locate_weights(where) == ckpts.step_dir(8) / MODEL_FILE
        loaded = load_weights(where)
        assert all(torch.equal(loaded[k], expected[k]) for k in expected)
    _flip_last_byte(ckpts.step_dir(8) / MODEL_FILE)  # the newest is broken: the run dir's newest valid one
    assert locate_weights(ckpts.root) == ckpts.step_dir(4) / MODEL_FILE
    with pytest.raises(CheckpointError, match="checksum"):
        load_weights(ckpts.step_dir(8))  # a folder named directly is verified, never skipped
    empty = ckpts.root / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match=re.escape(f"'{empty}' is a folder, but neither a run dir")):
        load_weights(empty)  # a mistyped train.init_from: named as what it is, not as an incomplete save
    _flip_last_byte(ckpts.step_dir(4) / MODEL_FILE)
    with pytest.raises(CheckpointError, match=re.escape(f"'{ckpts.root}' holds no valid checkpoint")):
        load_weights(ckpts.root)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "does not exist"),
        (b"", "the file is empty or truncated"),
        (b"hello, not torch", "not a PyTorch weights file"),
        ([torch.ones(1)], "holds no model state_dict"),
        ({"model": {"w": 3}}, "holds no model state_dict"),
    ],
)
def test_a_file_that_is_no_weights_is_a_checkpoint_error(tmp_path, content, message):
    path = tmp_path / "w.pt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        torch.save(content, path)
    with pytest.raises(CheckpointError, match=message) as info:
        load_weights(path)
    assert not isinstance(info.value, UnsafeCheckpointError)


class _Payload:
    """Pickles as a call of ``os.mkdir`` (code that would run on unpickling)."""

    def __init__(self, target: Path) -> None:
        self.target = str(target)

    def __reduce__(self):
        return os.mkdir, (self.target,)


def test_safe_load_refuses_a_pickle_with_code_and_runs_none_of_it(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"weight": torch.ones(2), "extra": _Payload(marker)}, tmp_path / "evil.pt")
    with pytest.raises(UnsafeCheckpointError) as info:
        safe_load(tmp_path / "evil.pt")
    message = str(info.value)
    assert "refused: it holds pickled code, which is never run" in message and "mkdir" in message
    assert "weights_only=False" not in message  # torch's advice must never reach a user about such a file
    assert not marker.exists()
    with pytest.raises(UnsafeCheckpointError):
        load_weights(tmp_path / "evil.pt")
    assert not marker.exists()
    with pytest.raises(CheckpointError, match="is a folder, not a weights file"):
        safe_load(tmp_path)


def test_a_forged_newest_checkpoint_is_refused_never_passed_over_for_an_older_one(ckpts: RunDir):
    """A model.pt holding pickled code whose manifest matches (someone rewrote both): not the trace of a crash, so
    the run dir's weights are refused outright instead of quietly taken from the older checkpoint."""
    marker = ckpts.root / "pwned"
    folder = ckpts.step_dir(8)
    entry = save_torch_durable(folder / MODEL_FILE, {"weight": torch.ones(1), "x": _Payload(marker)})
    _edit_manifest(folder, lambda m: m["files"].__setitem__(MODEL_FILE, entry))
    with pytest.raises(UnsafeCheckpointError, match="refused: it holds pickled code"):
        load_weights(ckpts.root)
    assert not marker.exists()


def test_first_mismatch_names_the_first_key_or_shape_that_does_not_fit(tmp_path):
    model = _model()
    sd = model.state_dict()
    assert first_mismatch(model, sd) is None
    assert first_mismatch(model, {k: v for k, v in sd.items() if k != "1.bias"}) == (
        "the model's '1.bias' is missing from the weights"
    )
    assert first_mismatch(model, {**sd, "0.weight": torch.ones(5, 3)}) == (
        "'0.weight' has shape [5, 3] in the weights, [4, 3] in the model"
    )
    assert first_mismatch(model, {**sd, "extra": torch.ones(1)}) == "the weights have 'extra', which the model has not"
    check_model_fits(tmp_path, model, sd)
    with pytest.raises(IncompatibleCheckpointError, match=r"does not fit the model .*'0.weight' has shape \[5, 3\]"):
        check_model_fits(tmp_path, model, {**sd, "0.weight": torch.ones(5, 3)})


# ---------------------------------------------------------------- optimizer fit and state by name


def _trained(model: nn.Module, optimizer: torch.optim.Optimizer, steps: int = 2) -> None:
    for _ in range(steps):
        model(torch.randn(5, 3)).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()


def _two_groups(model: nn.Module, cls=torch.optim.AdamW) -> torch.optim.Optimizer:
    params = dict(model.named_parameters())
    decay = [params["0.weight"], params["2.weight"]]
    rest = [p for n, p in params.items() if n not in ("0.weight", "2.weight")]
    return cls([{"params": decay}, {"params": rest, "weight_decay": 0.0}], lr=0.01)


def test_the_optimizer_must_be_of_the_kind_saved(tmp_path):
    model = _model()
    adamw = _two_groups(model)
    saved = adamw.state_dict()
    check_optimizer_fits(tmp_path, _two_groups(_model()), saved, "AdamW")
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with pytest.raises(IncompatibleCheckpointError, match="holds AdamW state, this run builds SGD"):
        check_optimizer_fits(tmp_path, sgd, saved, "AdamW")
    with pytest.raises(IncompatibleCheckpointError, match=r"group 0 lacks dampening, momentum"):
        check_optimizer_fits(tmp_path, sgd, saved, None)  # an older checkpoint: judged by its groups' settings
    with pytest.raises(CheckpointError, match="holds no optimizer parameter groups"):
        check_optimizer_fits(tmp_path, adamw, {"param_groups": []}, "AdamW")
    with pytest.raises(CheckpointError, match="parameter group 0 is malformed"):
        check_optimizer_fits(tmp_path, adamw, {"param_groups": [{"lr": 1}]}, "AdamW")


def test_optimizer_state_by_name_round_trips_exactly():
    model = _model()
    optimizer = _two_groups(model)
    _trained(model, optimizer)
    named = to_named(model, optimizer)
    assert set(named["state"]) == {"0.weight", "0.bias", "1.weight", "1.bias", "2.weight", "2.bias"}
    assert [g["params"] for g in named["param_groups"]] == [
        ["0.weight", "2.weight"],
        ["0.bias", "1.weight", "1.bias", "2.bias"],
    ]
    fresh_model = _model(1)
    fresh = _two_groups(fresh_model)
    fresh.load_state_dict(from_named("ckpt", fresh_model, fresh, named))
    a, b = optimizer.state_dict(), fresh.state_dict()
    assert a["param_groups"] == b["param_groups"]
    for i in a["state"]:
        assert all(torch.equal(a["state"][i][k], b["state"][i][k]) for k in a["state"][i])
    body, tensors = split_tensors(named)  # a sharded checkpoint keeps the tensors apart
    assert "0.weight/exp_avg" in tensors and body["tensor_keys"]["0.weight"] == ["step", "exp_avg", "exp_avg_sq"]
    joined = join_tensors("ckpt", body, tensors)
    assert all(torch.equal(joined["state"]["2.bias"][k], named["state"]["2.bias"][k]) for k in ("exp_avg", "step"))
    with pytest.raises(CheckpointError, match=re.escape("the shards lack the optimizer's 'exp_avg' of '0.weight'")):
        join_tensors("ckpt", body, {k: v for k, v in tensors.items() if k != "0.weight/exp_avg"})


def test_a_layout_change_names_the_first_parameter_that_moved():
    model = _model()
    optimizer = _two_groups(model)
    _trained(model, optimizer, 1)
    named = to_named(model, optimizer)
    one_group = torch.optim.AdamW(model.parameters(), lr=0.01)
    moved = "'0.bias' is in group 1 in the checkpoint, group 0 now"
    with pytest.raises(IncompatibleCheckpointError, match=re.escape(moved)):
        from_named("ckpt", model, one_group, named)
    bigger = nn.Sequential(*_model(), nn.Linear(2, 2))
    with pytest.raises(IncompatibleCheckpointError, match=r"'3\.weight' .* has no state in the checkpoint"):
        from_named("ckpt", bigger, _two_groups(bigger), named)
    twice = {**named, "param_groups": [{**named["param_groups"][0], "params": ["0.weight", "0.weight"]}]}
    with pytest.raises(CheckpointError, match="must list each parameter once, by name"):
        from_named("ckpt", model, optimizer, twice)
    stray = {**named, "state": {**named["state"], "ghost": {}}}
    with pytest.raises(CheckpointError, match="keyed by parameters its groups do not list"):
        from_named("ckpt", model, optimizer, stray)


def test_first_format_positions_load_as_names():
    model = _model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)  # the built-in one of the first format: one group
    _trained(model, optimizer)
    positions = optimizer.state_dict()
    fresh = torch.optim.AdamW(model.parameters(), lr=0.01)
    fresh.load_state_dict(from_positions("ckpt", model, fresh, positions))
    assert torch.equal(fresh.state_dict()["state"][4]["exp_avg"], positions["state"][4]["exp_avg"])
    smaller = nn.Linear(3, 4)
    with pytest.raises(IncompatibleCheckpointError, match="holds optimizer state for 6 parameters, the model trains 2"):
        from_positions("ckpt", smaller, torch.optim.AdamW(smaller.parameters()), positions)


# ---------------------------------------------------------------- durable writes, snapshots, commit


def test_durable_writes_return_the_manifest_entry_of_what_is_on_disk(tmp_path):
    sd = _model().state_dict()
    entry = save_torch_durable(tmp_path / "m.pt", sd)
    assert entry == {"size": (tmp_path / "m.pt").stat().st_size, "xxh3_128": file_digest(tmp_path / "m.pt")}
    big = {"w": torch.arange(600_000, dtype=torch.float32)}  # > 1 MiB: hashed on another thread, chunk by chunk
    entries = save_torch_files(tmp_path, {"a.pt": big, "b.pt": sd})
    assert list(entries) == ["a.pt", "b.pt"]
    for name, e in entries.items():
        assert e == {"size": (tmp_path / name).stat().st_size, "xxh3_128": file_digest(tmp_path / name)}
    assert torch.equal(torch.load(tmp_path / "a.pt", weights_only=True)["w"], big["w"])


def test_a_snapshot_is_what_the_state_was_when_it_was_taken():
    model = _model()
    sd = model.state_dict()
    state = {"model": sd, "opt": {"state": {0: {"step": torch.tensor(3.0)}}, "groups": [{"lr": 0.1}]}, "t": (1, "x")}
    snap = snapshot(state)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    state["opt"]["state"][0]["step"] += 1
    assert not torch.equal(snap["model"]["0.weight"], model.state_dict()["0.weight"])
    assert torch.equal(snap["model"]["0.weight"] + 1.0, model.state_dict()["0.weight"])
    assert snap["opt"]["state"][0]["step"].item() == 3.0 and snap["t"] == (1, "x")
    assert snap["model"]._metadata == sd._metadata  # load_state_dict reads the per-module versions
    _model(5).load_state_dict(snap["model"])


@pytest.mark.parametrize(
    ("code", "said", "hint"),
    [
        (errno.ENOSPC, "the disk is full", "free space on run.dir's file system"),
        (errno.EROFS, "the file system is read-only", "make run.dir's file system writable"),
        (errno.EACCES, "Permission denied", "check free space and write permission"),
    ],
)
def test_a_failed_write_is_one_line_naming_the_disk_trouble(tmp_path, code, said, hint):
    error = write_error(tmp_path / "step-00000004", OSError(code, os.strerror(code)))
    assert isinstance(error, CheckpointError) and "\n" not in str(error)
    assert said in str(error) and hint in str(error) and "older checkpoints are intact" in str(error)


def test_a_broken_folder_is_set_aside_where_no_scan_takes_it_for_a_checkpoint(ckpts: RunDir):
    set_aside(ckpts.step_dir(8))
    assert [s for s, _ in ckpts.step_folders()] == [4]
    (aside,) = ckpts.set_aside_folders()
    assert aside.name.startswith("step-00000008.invalid-") and (aside / MANIFEST_FILE).is_file()
    assert find_latest_valid(ckpts.checkpoints) == ckpts.step_dir(4)


def _payload(step: int, plan: SavePlan | None = None) -> Payload:
    return Payload(step, _model(step).state_dict(), {"optimizer": {}}, _state(step), plan or SavePlan())


def test_the_commit_writes_a_verifiable_folder_moves_latest_and_applies_retention(run_dir: RunDir):
    committer = Committer(run_dir, keep=2, extra_files={"config.yaml": b"train: {}\n"})
    for step in (2, 4, 6):
        plan = SavePlan(keep_also=frozenset({2}), best_step=2)
        target = run_dir.step_dir(step)
        committer.commit(target, committer.fresh_tmp(target, "t"), _payload(step, plan), {})
        committer.after_commit(_payload(step, plan))
        assert run_dir.latest_name() == target.name
        assert set(verify(target)["files"]) == {MODEL_FILE, OPTIM_FILE, STATE_FILE, "config.yaml"}
    assert [s for s, _ in run_dir.committed_folders()] == [6, 4, 2]  # the newest 2, and the best
    assert run_dir.best_name() == "step-00000002"
    plan = SavePlan(keep_also=frozenset({8}), best_step=8)  # a new best: the old one is no longer protected
    committer.commit(run_dir.step_dir(8), committer.fresh_tmp(run_dir.step_dir(8), "t"), _payload(8, plan), {})
    committer.after_commit(_payload(8, plan))
    assert [s for s, _ in run_dir.committed_folders()] == [8, 6] and run_dir.best_name() == "step-00000008"
    assert not list(run_dir.checkpoints.glob(".tmp-*")) and not list(run_dir.checkpoints.glob(".trash-*"))
    assert read_train_state(run_dir.step_dir(6)) == _state(6)


def test_best_never_names_a_deleted_folder(run_dir: RunDir):
    """Retention deletes the folder ``best`` named when no plan protects it any more (a resume whose selection
    starts afresh: another eval.metric/mode, or eval off): ``best`` is unset with it."""
    committer = Committer(run_dir, keep=1, extra_files={})
    plans = [SavePlan(frozenset({2}), best_step=2), SavePlan(), SavePlan()]  # the resumed run selects nothing
    for step, plan in zip((2, 4, 6), plans, strict=True):
        target = run_dir.step_dir(step)
        committer.commit(target, committer.fresh_tmp(target, "t"), _payload(step, plan), {})
        committer.after_commit(_payload(step, plan))
    assert run_dir.best_name() is None and [s for s, _ in run_dir.committed_folders()] == [6]


def test_a_failed_commit_leaves_nothing_and_a_leftover_is_set_aside(run_dir: RunDir):
    committer = Committer(run_dir, keep=5, extra_files={})
    target = run_dir.step_dir(2)
    tmp = committer.fresh_tmp(target, "t")
    bad = Payload(2, {"w": lambda: None}, {}, _state(2), SavePlan())  # a lambda does not pickle
    with pytest.raises(Exception, match=r"pickle|lambda"):
        committer.commit(target, tmp, bad, {})
    assert not tmp.exists() and run_dir.step_folders() == [] and run_dir.latest_name() is None
    target.mkdir()  # an uncommitted leftover at this very step
    committer.commit(target, committer.fresh_tmp(target, "u"), _payload(2), {})
    verify(target)
    assert [p.name.split(".invalid-")[0] for p in run_dir.set_aside_folders()] == ["step-00000002"]
    (run_dir.checkpoints / ".tmp-step-00000009-x").mkdir()
    (run_dir.checkpoints / ".trash-step-00000001-3").mkdir()
    committer.clean_stale_temporaries()
    assert sorted(p.name for p in run_dir.checkpoints.iterdir() if p.name.startswith(".")) == []
