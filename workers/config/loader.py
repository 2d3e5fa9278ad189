"""Loading the config: YAML files, dotted ``key=value`` overrides, type checks, did-you-mean for unknown keys.

The schema and its per-field checks are workers.config.schema; this module turns user text into that tree.
Torch-free: a bad command answers before torch is imported.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from workers.config.schema import CONTROL_CHARS, Config, fail, plain
from workers.errors import ConfigError

INT64_MAX = 2**63 - 1  # every int key fits torch's int64 (a seed, a step count)


class _DuplicateKey(Exception):
    def __init__(self, key: Any, first_line: int, second_line: int) -> None:
        super().__init__(key)
        self.key, self.first_line, self.second_line = key, first_line, second_line


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader with two fixes for configs: floats in the notation every ML user types (``3e-4``,
    ``1e6``: YAML 1.1 reads them as strings, YAML 1.2 as floats), and a key given twice in one mapping is an
    error instead of silently replacing the first."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor` may repeat; PyYAML flattens it
                continue
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                if key in seen:
                    raise _DuplicateKey(key, seen[key], line)
            except TypeError:  # `? [a]`: a list as a key
                raise yaml.constructor.ConstructorError(
                    None, None, "a key must be a plain value", key_node.start_mark
                ) from None
            seen[key] = line
            glued = _GLUED.match(key) if isinstance(key, str) else None
            if glued and value_node.tag == "tag:yaml.org,2002:null" and not value_node.value:
                name, value = glued.groups()  # `{n:200}`: YAML reads one key "n:200" with no value
                raise yaml.constructor.ConstructorError(
                    None, None, f"'{key}' is one key with no value: YAML needs a space after ':' (write "
                    f"'{name}: {value}')", key_node.start_mark,
                )  # fmt: skip
        return super().construct_mapping(node, deep=deep)


_GLUED = re.compile(r"^([A-Za-z_][\w.]*):(\S.*)$")


class _Dumper(yaml.SafeDumper):
    """Writes what :class:`_Loader` reads back unchanged: a string such as ``"3e-4"`` gets quotes."""


_FLOAT_12 = re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$")
for _cls in (_Loader, _Dumper):
    _cls.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT_12, list("-+0123456789."))


def _yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)


def parse_value(text: str) -> Any:
    """A value as the config reads it (YAML 1.2 numbers: ``3e-4`` is a float). Raises yaml.YAMLError."""
    return _yaml(text)


def _all_keys(cls: type, prefix: str = "") -> list[str]:
    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        keys.append(key)
        if dataclasses.is_dataclass(hints[f.name]):
            keys.extend(_all_keys(hints[f.name], key + "."))
    return keys


def _first_leaf(key: str, value: Any) -> str:
    """``trian`` with value ``{max_steps: 3}`` → ``trian.max_steps``: suggestions then match the whole path."""
    while isinstance(value, dict) and value:
        first = next(iter(value))
        key, value = f"{key}.{first}", value[first]
    return key


def _unknown_key(key: str, value: Any = None) -> typing.NoReturn:
    key = _first_leaf(key, value)
    valid = _all_keys(Config)
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    if not close:  # a misspelled leaf under a right section: compare leaf names too
        leaf = key.rsplit(".", 1)[-1]
        by_leaf = {k.rsplit(".", 1)[-1]: k for k in valid}
        close = [by_leaf[m] for m in difflib.get_close_matches(leaf, list(by_leaf), n=1, cutoff=0.6)]
    hint = (
        f"did you mean '{close[0]}'?"
        if close
        else "valid sections: " + ", ".join(f.name for f in dataclasses.fields(Config))
    )
    raise ConfigError(f"unknown config key '{key}'. HINT: {hint}")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check ``value`` against the annotation ``tp``; return it in the field's canonical form."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        real = [a for a in args if a is not type(None)]
        if len(real) == 1:  # Optional[X]: X's own message says what is wrong
            return _coerce(key, value, real[0])
        for arg in real:
            try:
                return _coerce(key, value, arg)
            except ConfigError:
                continue
        fail(key, value, f"expected {' or '.join(_type_name(a) for a in args)}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            fail(key, value, "expected a mapping (a section)")
        return _build(tp, value, key + ".")
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            fail(key, value, f"expected a list, got {type(value).__name__}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(f"{key}[{i}]", v, args[0]) for i, v in enumerate(value))
        if len(value) != len(args):
            fail(key, value, f"expected a list of {len(args)} items")
        return tuple(_coerce(f"{key}[{i}]", v, a) for i, (v, a) in enumerate(zip(value, args, strict=True)))
    if origin is dict:
        if not isinstance(value, dict):
            fail(key, value, f"expected a mapping, got {type(value).__name__}")
        return dict(value)
    if tp in (int, float) and isinstance(value, (int, float)) and not isinstance(value, bool):
        return _number(key, value, tp)
    if tp is Any or (isinstance(value, tp) and not (tp is int and isinstance(value, bool))):
        return value
    if value is None:  # `run.dir=~`: YAML reads a bare ~ (or null, or nothing after a colon) as no value
        fail(key, value, f"expected {_type_name(tp)}, got no value", "YAML reads ~ and null as no value: quote it")
    fail(key, value, f"expected {_type_name(tp)}, got {type(value).__name__}")


def _number(key: str, value: int | float, tp: type) -> int | float:
    """Every number is finite and fits int64; an int key takes a float that is a whole number (``1e5``)."""
    if (isinstance(value, float) and not math.isfinite(value)) or abs(value) > 1e300:
        fail(key, value, "must be a finite number" if isinstance(value, float) else "out of range")
    if tp is int:
        if isinstance(value, float) and not value.is_integer():
            fail(key, value, "expected int, got a fraction")
        if abs(value) > INT64_MAX:
            fail(key, value, f"out of range (at most {INT64_MAX})")
        return int(value)
    return float(value)


def _build(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key, value in data.items():
        if key not in names:
            _unknown_key(f"{prefix}{key}", value)
    kwargs = {k: _coerce(f"{prefix}{k}", v, hints[k]) for k, v in data.items()}
    return cls(**kwargs)


def _parse_override(item: str) -> tuple[list[str], Any]:
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override '{item}' is not key=value. HINT: e.g. train.max_steps=200")
    try:
        value = _yaml(raw) if raw.strip() else ""
    except _DuplicateKey as exc:
        raise ConfigError(f"override '{item}': key {exc.key!r} is given twice") from None
    except yaml.constructor.ConstructorError as exc:
        if "YAML needs a space after ':'" in str(exc.problem):
            raise ConfigError(f"override '{item}': {exc.problem}") from None
        value = raw
    except yaml.YAMLError:
        value = raw  # not YAML: keep the literal string
    if isinstance(value, str) and CONTROL_CHARS.search(raw):  # YAML turns a raw line break into a space, silently
        fail(key.strip(), raw, "holds a line break or another control character", "type the value on one line")
    return key.strip().split("."), value


def _apply_override(data: dict[str, Any], path: list[str], value: Any) -> None:
    node = data
    for i, part in enumerate(path[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            fail(".".join(path[: i + 1]), child, "is not a section, cannot set a sub-key")
        node = child
    node[path[-1]] = value


def _nest_dotted_keys(data: dict[str, Any]) -> dict[str, Any]:
    """``train.max_steps: 5`` at the top of a YAML file means ``train: {max_steps: 5}``; sections given both ways
    are merged key by key. A key set both ways (``train.max_steps`` and ``max_steps`` in ``train``) is a
    ConfigError: whichever came second would silently replace the other (:func:`load_config` names both lines)."""
    nested: dict[str, Any] = {}
    for key, value in data.items():
        path = key.split(".") if isinstance(key, str) else [key]
        section = value
        for part in reversed(path[1:]):
            section = {part: section}
        _merge(nested, {path[0]: section}, "")
    return nested


def _merge(into: dict[str, Any], new: dict[str, Any], prefix: str) -> None:
    """Add ``new`` to ``into`` key by key, recursing where both hold a non-empty mapping (in place). A key both give
    otherwise is a ConfigError naming it (an empty mapping counts as a value, as :func:`_leaves` has it)."""
    for key, value in new.items():
        both_sections = isinstance(into.get(key), dict) and isinstance(value, dict) and into[key] and value
        if both_sections:
            _merge(into[key], value, f"{prefix}{key}.")
        elif key in into:
            raise ConfigError(
                f"config key '{prefix}{key}' is given twice (as a dotted key and inside its section); one would "
                "silently replace the other. HINT: keep one of them"
            )
        else:
            into[key] = value


_MERGE_TAG = "tag:yaml.org,2002:merge"


def _leaves(path: tuple[str, ...], line: int, node: yaml.Node) -> typing.Iterator[tuple[tuple[str, ...], int]]:
    """Every key path a YAML node sets below ``path`` (a scalar, a list or an empty mapping ends one), with the line
    of its last key."""
    if not (isinstance(node, yaml.MappingNode) and node.value):
        yield path, line
        return
    for key_node, value_node in node.value:
        if isinstance(key_node, yaml.ScalarNode) and key_node.tag != _MERGE_TAG:
            yield from _leaves((*path, key_node.value), key_node.start_mark.line + 1, value_node)


def _check_dotted_and_nested(path: Path, text: str) -> None:
    """ConfigError naming both lines when one key is set twice in a file, once through a dotted top-level key and
    once inside its section (or through two dotted keys, one inside the other). Only the composed YAML nodes know
    the lines; :func:`_nest_dotted_keys` refuses the same without them."""
    root = yaml.compose(text, Loader=_Loader)
    if not isinstance(root, yaml.MappingNode):
        return
    leaves: dict[tuple[str, ...], int] = {}  # each key path set so far -> its line
    inner: dict[tuple[str, ...], int] = {}  # each section above one -> that path's line
    for key_node, value_node in root.value:
        if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == _MERGE_TAG:
            continue
        top = tuple(key_node.value.split("."))
        for keys, line in _leaves(top, key_node.start_mark.line + 1, value_node):
            clash = next((keys[:i] for i in range(1, len(keys) + 1) if keys[:i] in leaves), None)
            first = leaves[clash] if clash else inner.get(keys)
            if first is not None:
                shown = ".".join(clash or keys)
                raise ConfigError(
                    f"config file '{path}': '{shown}' is given twice (lines {min(first, line)} and "
                    f"{max(first, line)}: a dotted key and a section both set it); one would silently replace the "
                    "other. HINT: keep one of them"
                )
            leaves[keys] = line
            for i in range(1, len(keys)):
                inner.setdefault(keys[:i], line)


def config_from_dict(data: dict[str, Any] | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Build and validate the config tree from a nested dict plus dotted overrides."""
    data = plain(data or {})
    if not isinstance(data, dict):
        raise ConfigError(f"the config must be a YAML mapping, got {type(data).__name__}")
    data = _nest_dotted_keys(data)
    for item in overrides:
        path, value = _parse_override(item)
        _apply_override(data, path, value)
    return _build(Config, data)


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML config file and apply overrides. Raises ConfigError on any problem."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"config file '{path}' is a directory. HINT: name a YAML file, e.g. configs/quickstart.yaml")
    if not path.is_file():
        raise ConfigError(f"config file '{path}' not found. HINT: e.g. configs/quickstart.yaml")
    try:
        text = path.read_text()
        data = _yaml(text)
    except _DuplicateKey as exc:
        raise ConfigError(
            f"config file '{path}': key {exc.key!r} is given twice (lines {exc.first_line} and {exc.second_line}); "
            "the second would silently replace the first. HINT: merge them into one"
        ) from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"config file '{path}' is not valid YAML{where}: {exc.problem or exc.context}") from None
    except (OSError, yaml.YAMLError, UnicodeDecodeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"config file '{path}' is not valid YAML: {first}") from None
    _check_dotted_and_nested(path, text)
    return config_from_dict(data, overrides)


def dump_config(cfg: Config) -> str:
    """The resolved config as YAML (what the run dir's config file holds)."""
    return yaml.dump(cfg.to_dict(), Dumper=_Dumper, sort_keys=False)
