"""``orchestrator ckpt inspect PATH`` and ``orchestrator ckpt export SRC DEST``."""

from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path
from typing import Any

import torch

from workers.checkpoint import dcp_io, find_latest_valid, load_weights, read_train_state, verify
from workers.checkpoint.dcp_io import DCP_DIR
from workers.contract import EXIT_OK, EXIT_USAGE
from workers.errors import CheckpointError
from workers.fsutil import atomic_write
from workers.rundir import MODEL_FILE, RunDir


def _weights_summary(state_dict: dict[str, torch.Tensor]) -> dict[str, Any]:
    return {
        "tensors": len(state_dict),
        "parameters": sum(t.numel() for t in state_dict.values()),
        "bytes": sum(t.numel() * t.element_size() for t in state_dict.values()),
    }


def _describe_folder(folder: Path) -> dict[str, Any]:
    info: dict[str, Any] = {"path": str(folder)}
    manifest: dict[str, Any] = {}
    try:
        manifest = verify(folder)
        info["complete"], info["problem"] = True, None
    except CheckpointError as exc:
        info["complete"], info["problem"] = False, str(exc)
        if isinstance(exc, dcp_io.UnsafeCheckpointError):  # e.g. a pickle payload in DCP's metadata: never read
            info["safe"] = False
    state = None
    try:
        state = read_train_state(folder)
        info.update(
            step=state.step,
            samples_seen=state.samples_seen,
            world_size=state.world_size,
            global_batch_size=state.global_batch_size,
        )
    except CheckpointError:
        pass
    if manifest.get("parallel") == "fsdp":  # sharded: its layout, read from the (verified, restricted) metadata
        mode = state.parallel if state is not None and state.parallel == "hsdp" else "fsdp"  # the same format
        info.update(parallel=mode, saved_world_size=manifest.get("world_size"), **dcp_io.layout(folder / DCP_DIR))
        info["shard_files"] = [f"{DCP_DIR}/{f}" for f in info["shard_files"]]
    elif manifest:
        info["parallel"] = "ddp"
    if (folder / MODEL_FILE).is_file() and info["complete"]:
        try:
            info.update(_weights_summary(load_weights(folder / MODEL_FILE)), safe=True)
        except CheckpointError as exc:  # e.g. a pickled callable: refused by weights_only, never run
            info.update(safe=False, problem=str(exc))
    return info


def inspect(path: Path) -> dict[str, Any]:
    """Describe a run dir (its newest valid checkpoint, plus all of them), a checkpoint folder or a .pt file."""
    run = RunDir(path)
    if run.checkpoints.is_dir():
        folders = [_describe_folder(f) for _, f in run.step_folders()]
        try:
            latest = find_latest_valid(run.checkpoints, warn=False)
        except CheckpointError:  # an unsafe one: it is listed below as such, the newest valid is not named
            latest = None
        return dict(run_dir=str(path), latest_valid=str(latest) if latest else None, checkpoints=folders)
    if path.is_dir():
        return _describe_folder(path)
    if path.is_file():
        sd = load_weights(path)
        return {"path": str(path), "kind": "weights file", "complete": True, **_weights_summary(sd)}
    raise CheckpointError(f"'{path}' does not exist")


def _print_folder(info: dict[str, Any], indent: str = "") -> None:
    status = "yes (manifest verified)" if info["complete"] else f"NO — {info['problem']}"
    print(f"{indent}checkpoint: {info['path']}")
    print(f"{indent}  complete: {status}")
    if info.get("safe") is False:
        print(f"{indent}  safe: NO (UNSAFE: refused, not loaded) — {info['problem']}")
    for key, label in (
        ("step", "step"),
        ("samples_seen", "samples seen"),
        ("world_size", "world size at save"),
        ("global_batch_size", "global batch size"),
    ):
        if info.get(key) is not None:
            print(f"{indent}  {label}: {info[key]}")
    if info.get("parallel"):
        print(f"{indent}  parallel: {info['parallel']}" + (" (sharded)" if info["parallel"] != "ddp" else ""))
    if "shard_files" in info:
        files = ", ".join(info["shard_files"])
        print(f"{indent}  shards: {len(info['shard_files'])} files, {info['shard_bytes']:,} bytes ({files})")
        exported = (Path(info["path"]) / MODEL_FILE).is_file()
        print(f"{indent}  model.pt: {'yes' if exported else 'no (ckpt export gathers the shards into one file)'}")
    if "parameters" in info:
        print(f"{indent}  parameters: {info['parameters']:,} in {info['tensors']} tensors ({info['bytes']:,} bytes)")


def _print_run(run_dir: str, latest_valid: str | None, checkpoints: list[dict[str, Any]]) -> None:
    print(f"run dir: {run_dir}")
    print(f"latest valid: {latest_valid or 'none'}")
    for folder in checkpoints:
        _print_folder(folder, "  ")


def _print_inspect(info: dict[str, Any]) -> None:
    if "run_dir" in info:
        _print_run(**info)
    elif info.get("kind") == "weights file":
        print(f"weights file: {info['path']}")
        print(f"  parameters: {info['parameters']:,} in {info['tensors']} tensors ({info['bytes']:,} bytes)")
    else:
        _print_folder(info)


def export(src: Path, dest: Path, force: bool) -> dict[str, Any]:
    """Write SRC's model weights to DEST as a plain, prefix-free state_dict (atomically)."""
    if dest.is_dir():
        raise CheckpointError(f"'{dest}' is a folder; DEST must be a file. HINT: e.g. {dest / 'model.pt'}")
    if dest.exists() and not force:
        raise CheckpointError(f"'{dest}' exists; not overwriting it. HINT: pass --force or pick another DEST")
    state_dict = load_weights(src)
    dest.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    torch.save(state_dict, buf)
    atomic_write(dest, buf.getvalue())
    return {"dest": str(dest), **_weights_summary(state_dict)}


def run(args: argparse.Namespace) -> int:
    try:
        if args.ckpt_command == "inspect":
            info = inspect(Path(args.path))
            print(json.dumps(info, indent=1)) if args.json else _print_inspect(info)
        else:
            done = export(Path(args.src), Path(args.dest), args.force)
            print(f"wrote {done['dest']}: {done['tensors']} tensors, {done['parameters']:,} parameters")
    except CheckpointError as exc:
        print(f"orchestrator: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    return EXIT_OK
