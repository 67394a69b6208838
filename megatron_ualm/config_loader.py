"""Generic machinery behind `megatron_ualm.config`: nested dataclasses <-> plain dicts <-> YAML,
dotted `key=value` overrides, and type checking against the field annotations.

Nothing here knows about UALM; it works for any tree of dataclasses whose fields are
annotated with int, float, bool, str, Optional[...], Literal[...], list[...], dict[...] or
another dataclass. Every error is a `ConfigError` whose message is one line that starts with
the dotted key at fault, e.g. `model.num_layers: expected int, got 'abc'`.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import types
import typing
from typing import Any, Literal, Union

import yaml

from megatron_ualm.errors import UserError


class ConfigError(UserError, ValueError):
    """A configuration problem; the message is one line naming the key at fault."""


# --- dataclass <-> dict ---------------------------------------------------------------------

def to_dict(cfg) -> dict:
    """A dataclass tree as plain dicts/lists/scalars (what `save_config` writes)."""
    return dataclasses.asdict(cfg)


def from_dict(cls, data: dict | None, prefix: str = ""):
    """Build dataclass `cls` from a plain dict; absent keys take the dataclass defaults.

    Unknown keys, missing required keys and values of the wrong type raise ConfigError.
    `prefix` is the dotted location of `data`, used in error messages.
    """
    return _coerce({} if data is None else data, cls, prefix)


def _field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _join(prefix: str, key) -> str:
    if isinstance(key, int):
        return f"{prefix}[{key}]"
    return f"{prefix}.{key}" if prefix else str(key)


def _check_keys(cls, data: dict, prefix: str) -> None:
    allowed = list(_field_types(cls))
    for key in data:
        if key not in allowed:
            where = f"'{prefix}'" if prefix else "top level"
            close = difflib.get_close_matches(str(key), allowed, n=1, cutoff=0.6)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"{_join(prefix, key)}: unknown key; allowed keys at {where}: "
                              f"{', '.join(allowed)}{hint}")


def _build_dataclass(cls, data: dict, prefix: str):
    _check_keys(cls, data, prefix)
    types_ = _field_types(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        key = _join(prefix, f.name)
        if f.name in data:
            kwargs[f.name] = _coerce(data[f.name], types_[f.name], key)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{key}: missing required key; expected {describe_type(types_[f.name])}")
    return cls(**kwargs)


def describe_type(tp) -> str:
    """Human-readable form of an annotation, as used in error messages."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (Union, types.UnionType):
        parts = [describe_type(a) for a in args if a is not type(None)]
        return " or ".join(parts) + (" or null" if type(None) in args else "")
    if origin is list:
        return f"list of {describe_type(args[0])}" if args else "list"
    if origin is dict or tp is dict:
        return "mapping"
    if dataclasses.is_dataclass(tp):
        return f"mapping (section {tp.__name__})"
    return getattr(tp, "__name__", str(tp))


def _type_error(tp, value, key: str) -> ConfigError:
    return ConfigError(f"{key}: expected {describe_type(tp)}, got {value!r}")


def _coerce(value, tp, key: str):
    """Check `value` against annotation `tp` and convert where lossless (int -> float)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        members = [a for a in args if a is not type(None)]
        for member in members:
            try:
                return _coerce(value, member, key)
            except ConfigError:
                # A structured member (section, list) reports the exact item at fault.
                if len(members) == 1 and _is_structured(member):
                    raise
        raise _type_error(tp, value, key)
    if origin is Literal:
        # bool is an int in Python; never let True match a Literal[1].
        if any(type(value) is type(a) and value == a for a in args):
            return value
        raise _type_error(tp, value, key)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise _type_error(tp, value, key)
        return _build_dataclass(tp, value, key)
    if origin is list:
        if not isinstance(value, list):
            raise _type_error(tp, value, key)
        item = args[0] if args else Any
        return [_coerce(v, item, _join(key, i)) for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise _type_error(tp, value, key)
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _type_error(tp, value, key)
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _type_error(tp, value, key)
    if tp is float:
        return _to_float(value, tp, key)
    if tp is str:
        if isinstance(value, str):
            return value
        raise _type_error(tp, value, key)
    raise ConfigError(f"{key}: unsupported annotation {tp!r}")


def _is_structured(tp) -> bool:
    return dataclasses.is_dataclass(tp) or typing.get_origin(tp) in (list, dict)


def _to_float(value, tp, key: str) -> float:
    """A finite float from an int, a float, or a numeric string: PyYAML reads `3e-4` (no dot)
    as a string, and people write learning rates that way."""
    number = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            pass
    if number is None or not math.isfinite(number):
        raise ConfigError(f"{key}: expected a finite {describe_type(tp)}, got {value!r}")
    return number


# --- YAML files -----------------------------------------------------------------------------

def read_yaml(path: str, _seen: tuple[str, ...] = ()) -> dict:
    """Read a YAML mapping; a top-level `base: other.yaml` (relative to this file) is read
    first and this file is deep-merged over it (mappings merge, everything else replaces)."""
    path = os.path.abspath(path)
    if path in _seen:
        raise ConfigError(f"base: circular inheritance through {path}")
    if not os.path.isfile(path):
        raise ConfigError(f"{path}: config file not found")
    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}: line {mark.line + 1} column {mark.column + 1}" if mark else path
        problem = getattr(e, "problem", None) or str(e)
        raise ConfigError(f"{where}: not valid YAML ({problem}); fix the file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot be read ({e}); check the file") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top of the file, got {type(data).__name__}")
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ConfigError(f"base: expected a path to a YAML file, got {base!r} (in {path})")
    parent = read_yaml(os.path.join(os.path.dirname(path), base), _seen + (path,))
    return deep_merge(parent, data)


def deep_merge(base: dict, override: dict) -> dict:
    """A new dict: `override` over `base`, merging nested mappings key by key."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def format_yaml(data: dict, header: str = "") -> str:
    """`data` as YAML text (keys in their order), after an optional comment header."""
    return (header.rstrip("\n") + "\n" if header else "") + yaml.safe_dump(
        data, sort_keys=False, default_flow_style=False)


def dump_yaml(data: dict, path: str, header: str = "") -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write(format_yaml(data, header))


# --- dotted overrides -----------------------------------------------------------------------

_SEGMENT = re.compile(r"([^.\[\]]+)|\[(\d+)\]")


def split_key(dotted: str) -> list[str | int]:
    """`data.train[0].weight` or `data.train.0.weight` -> ['data', 'train', 0, 'weight']."""
    parts: list[str | int] = []
    pos = 0
    for match in _SEGMENT.finditer(dotted):
        gap = dotted[pos:match.start()]
        if gap not in ("", "."):
            raise ConfigError(f"{dotted}: malformed key")
        name, index = match.groups()
        parts.append(int(index) if index is not None else int(name) if name.isdigit() else name)
        pos = match.end()
    if not parts or dotted[pos:] or dotted.startswith(".") or ".." in dotted:
        raise ConfigError(f"{dotted!r}: malformed key; expected dotted names like model.num_layers")
    return parts


def parse_overrides(overrides: list[str], cls=None) -> list[tuple[list[str | int], Any]]:
    """Parse `key=value` strings into (key path, value) pairs; each value is read as YAML
    (`4` -> int, `null` -> None, `[a, b]` -> list). Given the root dataclass `cls`, a value
    bound for a str field keeps its literal text (so `checkpoint.experiment_dir=2024` is '2024')."""
    parsed = []
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"{item!r}: expected an override of the form key=value")
        path = split_key(key.strip())
        try:
            value = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"{key}: value {text!r} is not valid YAML ({str(e).splitlines()[0]})") from None
        if cls is not None and _expects_str(annotation_at(cls, path)) and value is not None \
                and not isinstance(value, (str, list, dict)):
            value = text
        parsed.append((path, value))
    return parsed


def annotation_at(cls, path: list[str | int]):
    """The annotation a key path leads to inside dataclass `cls`, or None if it leads nowhere."""
    tp = cls
    for part in path:
        tp = _strip_optional(tp)
        if isinstance(part, int):
            if typing.get_origin(tp) is not list:
                return None
            tp = typing.get_args(tp)[0] if typing.get_args(tp) else Any
        elif dataclasses.is_dataclass(tp) and part in _field_types(tp):
            tp = _field_types(tp)[part]
        else:
            return None
    return tp


def _strip_optional(tp):
    if typing.get_origin(tp) in (Union, types.UnionType):
        members = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(members) == 1:
            return members[0]
    return tp


def _expects_str(tp) -> bool:
    return _strip_optional(tp) is str


def apply_overrides(data: dict, overrides: list[tuple[list[str | int], Any]]) -> dict:
    """A copy of the raw dict `data` with each (key path, value) set; missing sections are
    created, list items are addressed by index. Type checks happen later, in `from_dict`."""
    data = _deep_copy(data)
    for path, value in overrides:
        node = data
        for i, part in enumerate(path[:-1]):
            here = _format_path(path[:i + 1])
            if isinstance(part, int):
                if not isinstance(node, list) or not -len(node) <= part < len(node):
                    raise ConfigError(f"{here}: no such list item")
                node = node[part]
                continue
            if not isinstance(node, dict):
                raise ConfigError(f"{here}: {_format_path(path[:i])} is not a section")
            if node.get(part) is None:
                node[part] = [] if isinstance(path[i + 1], int) else {}
            node = node[part]
        last = path[-1]
        if isinstance(last, int):
            if not isinstance(node, list) or not -len(node) <= last < len(node):
                raise ConfigError(f"{_format_path(path)}: no such list item")
        elif not isinstance(node, dict):
            raise ConfigError(f"{_format_path(path)}: {_format_path(path[:-1])} is not a section")
        node[last] = value
    return data


def _format_path(path: list[str | int]) -> str:
    out = ""
    for part in path:
        out = _join(out, part)
    return out


def _deep_copy(value):
    if isinstance(value, dict):
        return {k: _deep_copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_deep_copy(v) for v in value]
    return value
