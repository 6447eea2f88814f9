"""Configs from YAML files and mappings, with dotted command-line overrides, checked field by field."""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from lorachain.config.base import ConfigError, check
from lorachain.config.run import RunConfig


def _convert(tp: Any, value: Any, where: str) -> Any:
    """Check `value` against the annotation `tp`, building nested dataclasses."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _convert(arg, value, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0])
    if dataclasses.is_dataclass(tp):
        check(isinstance(value, dict), f"{where}: expected a mapping, got {value!r}")
        return from_dict(tp, value, where)
    if origin is list:
        check(isinstance(value, list), f"{where}: expected a list, got {value!r}")
        (item,) = typing.get_args(tp)
        return [_convert(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        check(isinstance(value, dict), f"{where}: expected a mapping, got {value!r}")
        _, vt = typing.get_args(tp)
        return {str(k): v if vt is Any else _convert(vt, v, f"{where}.{k}") for k, v in value.items()}
    if tp is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        check(ok, f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
        check(ok, f"{where}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        check(isinstance(value, bool), f"{where}: expected true or false, got {value!r}")
        return value
    if tp is str:
        ok = isinstance(value, str | int | float) and not isinstance(value, bool)
        check(ok, f"{where}: expected text, got {value!r}")
        return str(value)
    raise ConfigError(f"{where}: unsupported type {tp}")


def as_current(cls, raw: dict) -> dict:
    """`raw` (a config as an older lorachain wrote it) read as `cls` and dumped again, so fields
    added since take their defaults; `raw` itself if it no longer reads."""
    try:
        return json.loads(from_dict(cls, raw).to_json())
    except (ConfigError, TypeError, ValueError):
        return raw


def from_dict(cls: type, data: dict[str, Any], where: str = "") -> Any:
    """Build dataclass `cls` from a plain mapping; unknown keys and bad types raise ConfigError."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    data = {k: v for k, v in data.items() if k != "lorachain_version"}
    unknown = sorted(set(data) - names)
    prefix = f"{where}." if where else ""
    check(
        not unknown, f"{prefix}{unknown[0] if unknown else ''}: unknown key; expected one of {sorted(names)}"
    )
    kwargs = {k: _convert(hints[k], v, f"{prefix}{k}") for k, v in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as e:  # a required field is missing
        missing = [f.name for f in dataclasses.fields(cls) if f.name not in kwargs]
        raise ConfigError(f"{prefix}{missing[0] if missing else ''}: required ({e})") from None


def set_dotted(data: dict[str, Any], override: str) -> None:
    """Apply one `a.b.c=value` override (value parsed as YAML) to a nested mapping."""
    key, sep, raw = override.partition("=")
    check(bool(sep) and bool(key), f"override {override!r}: expected key.path=value")
    node = data
    parts = key.split(".")
    for part in parts[:-1]:
        if isinstance(node, list):
            check(part.isdigit() and int(part) < len(node), f"override {key}: no list item {part}")
            node = node[int(part)]
            continue
        node = node.setdefault(part, {})
        check(isinstance(node, dict | list), f"override {key}: {part} is not a mapping")
    last = parts[-1]
    try:
        value = yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError:
        value = raw
    if isinstance(value, dict) and not raw.lstrip().startswith("{"):
        value = raw  # "a: {b}" is text, not a mapping
    if isinstance(node, list):
        check(last.isdigit() and int(last) < len(node), f"override {key}: no list item {last}")
        node[int(last)] = value
    else:
        node[last] = value


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    base: dict[str, Any] | None = None,
    cls: type = RunConfig,
) -> Any:
    """Load a RunConfig (or `cls`) from a YAML file (or a mapping) plus dotted overrides."""
    data: dict[str, Any] = dict(base or {})
    if path is not None:
        p = Path(path)
        check(p.is_file(), f"{p}: config file not found")
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML ({str(e).splitlines()[0]})") from None
        check(isinstance(loaded, dict), f"{p}: expected a mapping at the top level")
        data.update(loaded)
    for ov in overrides or []:
        set_dotted(data, ov)
    return from_dict(cls, data)
