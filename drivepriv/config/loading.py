"""Strict conversion of plain data (YAML, ``--set key=value``) into the run configuration (see
:mod:`drivepriv.config`)."""

from __future__ import annotations

import copy
import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml

from drivepriv.config.schema import RunConfig
from drivepriv.errors import ConfigError, did_you_mean


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (list, dict):
        return getattr(tp, "__name__", str(tp)).replace("typing.", "")
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and return it (ints promoted to floats)."""
    origin = get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping of {tp.__name__} settings, got {type(value).__name__} {value!r}")
        return _build(tp, value, where)
    if tp is Any:
        return copy.deepcopy(value)
    if origin is Literal:
        if value not in get_args(tp):
            choices = [str(a) for a in get_args(tp)]
            hint = did_you_mean(str(value), choices)
            raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}.{hint}")
        return value
    if origin in (Union, types.UnionType):
        errors = []
        for arg in get_args(tp):
            if arg is type(None) and value is None:
                return None
            try:
                return _convert(value, arg, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0])
    if origin is list:
        (item,) = get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__} {value!r}")
        return [_convert(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        kt, vt = get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__} {value!r}")
        return {_convert(k, kt, f"{where} key"): _convert(v, vt, f"{where}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {type(value).__name__} {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {type(value).__name__} {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {type(value).__name__} {value!r}")
        return value
    raise TypeError(f"unsupported annotation {tp!r} at {where}")


def _build(cls: type, data: dict[str, Any], where: str, base: Any = None) -> Any:
    """Build dataclass ``cls`` from ``data`` on top of ``base`` (or the defaults), strictly."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    obj = copy.deepcopy(base) if base is not None else cls()
    for key, value in data.items():
        if key not in names:
            raise ConfigError(
                f"{where}: unknown key '{key}'.{did_you_mean(str(key), names)} Known keys: {', '.join(names)}."
            )
        tp = hints[key]
        sub = f"{where}.{key}" if where else key
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise ConfigError(f"{sub}: expected a mapping of {tp.__name__} settings, got {type(value).__name__} {value!r}")
            object.__setattr__(obj, key, _build(tp, value, sub, getattr(obj, key)))  # frozen: built here only
        else:
            new = _convert(value, tp, sub)
            old = getattr(obj, key)
            if isinstance(new, dict) and isinstance(old, dict):
                new = {**old, **new}  # merge mappings key by key, never drop a default silently
            object.__setattr__(obj, key, new)
    return obj


def load_yaml(path: Path) -> dict[str, Any]:
    """Read a YAML mapping, with errors that name the file."""
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise ConfigError(f"cannot read {path}: {e.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of settings at the top level, got {type(data).__name__}")
    return data


def config_from_dict(data: dict[str, Any], source: str = "config", base: RunConfig | None = None) -> RunConfig:
    """Strictly build a validated :class:`RunConfig`; errors are prefixed with ``source``."""
    try:
        cfg = _build(RunConfig, data, "", base)
        cfg.validate("")
    except ConfigError as e:
        msg = str(e)
        msg = msg[1:] if msg.startswith(".") else msg
        raise ConfigError(f"{source}: {msg}") from None
    return cfg


def parse_override(item: str) -> tuple[list[str], Any]:
    """Parse ``a.b.c=value``; the value is read as YAML (so ``3``, ``0.5``, ``[1, 2]``, ``true`` work)."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected key=value, for example --set federation.clients=8")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"--set {item!r}: the key is empty")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(cfg: RunConfig, overrides: list[tuple[list[str], Any]], source: str = "--set") -> RunConfig:
    """Apply dotted-key overrides strictly (unknown keys and wrong types fail), then validate."""
    nested: dict[str, Any] = {}
    for keys, value in overrides:
        node = nested
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{source}: '{'.'.join(keys)}' conflicts with another override")
        node[keys[-1]] = value
    return config_from_dict(nested, source, base=cfg)


def dump_yaml(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
