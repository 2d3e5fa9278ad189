"""Which keys differ between two configs: what a resume tells when the config it was given is not the one its
checkpoint was saved with (an fsdp run relaunched without ``train.parallel=fsdp`` would otherwise go on as ddp
without a word)."""

from __future__ import annotations

from typing import Any

from workers.config.schema import Config

# Keys that say where or how many, not what is trained: a difference there is expected, never worth a note.
_WHERE = ("run.dir", "launch.nproc")


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value and key != "args":  # task.args is one value: the factory's arguments
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def config_changes(saved: Config, now: Config) -> list[str]:
    """``key: saved -> now`` for every key whose value differs (where and how many workers aside), sorted."""
    before, after = _flat(saved.to_dict()), _flat(now.to_dict())
    return [
        f"{key}: {before.get(key)!r} -> {after.get(key)!r}"
        for key in sorted(before.keys() | after.keys())
        if key not in _WHERE and before.get(key) != after.get(key)
    ]
