"""Reading a typed config tree: a YAML file plus dotted ``key=value`` overrides, converted into
nested dataclasses by their type hints. Every problem is a ``ConfigError`` that names the key,
the file and what was expected. The trees themselves are in ``vlbert.config`` (pretraining) and
``vlbert.tasks.config`` (fine-tuning).
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from pathlib import Path
from typing import Any, Union

import yaml


class ConfigError(ValueError):
    """A config that cannot be used; the message names the key and the file."""


def read_raw_config(path: str | os.PathLike | None, overrides: list[str] = ()) -> tuple[dict[str, Any], str]:
    """The YAML file at ``path`` (none: empty) as a mapping with ``key=value`` overrides applied,
    and the name to give it in messages. Any config tree is then built from it."""
    source = str(path) if path is not None else "<defaults>"
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            text = Path(path).read_text()
        except FileNotFoundError:
            raise ConfigError(f"{source}: config file not found") from None
        try:
            raw = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{source}: not valid YAML: {e}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{source}: expected a mapping at the top level, got {type(raw).__name__}")
    for item in overrides:
        apply_override(raw, item)
    return raw, source


def apply_override(raw: dict[str, Any], item: str) -> None:
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"command line: override {item!r} is not of the form key=value")
    try:
        parsed = yaml.safe_load(value) if value != "" else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"command line: value of {key} is not valid YAML: {e}") from None
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"command line: {key}: {part} is not a section")
        node = child
    node[parts[-1]] = parsed


def type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def convert(tp: Any, value: Any, key: str, source: str) -> Any:
    """Convert a YAML value to ``tp`` or raise ConfigError naming ``key``."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return convert(arg, value, key, source)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{source}: {key}: no type matched")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: {key}: expected a section (mapping), got {value!r}")
        return build(tp, value, prefix=key + ".", source=source)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{source}: {key}: expected a list of {type_name(item_tp)}, got {value!r}")
        return [convert(item_tp, v, f"{key}[{i}]", source) for i, v in enumerate(value)]
    if origin is dict:
        key_tp, val_tp = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: {key}: expected a mapping, got {value!r}")
        return {str(k): convert(val_tp, v, f"{key}.{k}", source) for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads "1e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
    else:  # pragma: no cover - schema uses only the types above
        raise ConfigError(f"{source}: {key}: unsupported schema type {tp}")
    raise ConfigError(f"{source}: {key}: expected {type_name(tp)}, got {value!r} ({type(value).__name__})")


# Keys that moved: an old config gets a message saying where, not just "unknown key".
MOVED_KEYS = {"tracking.log_every": "runtime.log_every (one cadence for the log line and MLflow)"}


def build(cls: type, raw: dict[str, Any], prefix: str, source: str) -> Any:
    """The dataclass ``cls`` from the mapping ``raw`` (keys under ``prefix``); unknown keys are errors."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    moved = [f"{prefix}{k}" for k in unknown if f"{prefix}{k}" in MOVED_KEYS]
    if moved:
        raise ConfigError(f"{source}: {moved[0]} is now {MOVED_KEYS[moved[0]]}")
    if unknown:
        where = prefix.rstrip(".") or "top level"
        raise ConfigError(
            f"{source}: unknown key {prefix}{unknown[0]} (in {where}; known keys: {', '.join(sorted(names))})"
        )
    kwargs = {name: convert(hints[name], raw[name], prefix + name, source) for name in raw}
    return cls(**kwargs)


def require(cond: bool, source: str, key: str, expected: str) -> None:
    """A ConfigError "<source>: <key>: <expected>" unless ``cond``."""
    if not cond:
        raise ConfigError(f"{source}: {key}: {expected}")
