"""YAML configs validated into dataclasses, with `dotted.key=value` overrides from the command line."""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from .errors import ConfigError

# a float config field with dataclasses.field(metadata={FINITE: False}) may hold nan / inf; every other float must be
# finite (`train.lr=.nan` is accepted by every comparison in a __post_init__ and silently ruins a run)
FINITE = "finite"


class _AliasFound(Exception):
    """Raised by `_NoAliasLoader` at the first alias (`*name`) of a defined anchor; carries its line."""

    def __init__(self, line: int):
        super().__init__(line)
        self.line = line


class _NoAliasLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses aliases: 9 nested levels of 9 aliases (a few hundred bytes, "billion laughs")
    expand to 9**9 values when the data is copied or walked, and a recipe config never needs them."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent) and self.peek_event().anchor in self.anchors:
            raise _AliasFound(self.peek_event().start_mark.line + 1)
        return super().compose_node(parent, index)


def _parse_yaml(text: str):
    """yaml.safe_load, raising `_AliasFound` at an alias (and RecursionError for nesting deeper than Python's stack)."""
    loader = _NoAliasLoader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def load_yaml(path: str | Path) -> dict:
    """Read a YAML mapping from `path`; a missing or malformed file, or one with aliases, is a ConfigError."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = _parse_yaml(path.read_text())
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise ConfigError(f"config file {path} is not valid YAML{where}") from None
    except _AliasFound as alias:
        raise ConfigError(f"config file {path}: YAML aliases are not allowed in configs (line {alias.line}); "
                          "write the value out instead of *name") from None
    except RecursionError:
        raise ConfigError(f"config file {path} is nested too deeply") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path} is not UTF-8 text") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of keys, not {type(data).__name__}")
    return data


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Return a copy of `data` with each `a.b.c=value` applied; values are parsed as YAML scalars."""
    data = _deep_copy(data)
    for override in overrides:
        key, sep, raw = override.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {override!r} is not of the form dotted.key=value")
        try:
            value = _parse_yaml(raw) if raw.strip() else raw
        except yaml.YAMLError:  # e.g. "a: b" or "*x": kept as the text it is
            value = raw
        except _AliasFound:
            raise ConfigError(f"override {key!r}: YAML aliases are not allowed in overrides") from None
        except RecursionError:
            raise ConfigError(f"override {key!r}: the value is nested too deeply") from None
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {key!r}: {part!r} is not a section")
            node = child
        node[parts[-1]] = value
    return data


def _deep_copy(data: Any) -> Any:
    if isinstance(data, dict):
        return {key: _deep_copy(value) for key, value in data.items()}
    if isinstance(data, list):
        return [_deep_copy(value) for value in data]
    return data


def from_dict(cls: type, data: dict | None, prefix: str = ""):
    """Build dataclass `cls` from a mapping, checking every key and type; errors name the dotted key."""
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"config key {prefix.rstrip('.') or '<root>'!r} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {field.name: field for field in dataclasses.fields(cls) if field.init}
    unknown = [key for key in data if key not in fields]
    if unknown:
        known = ", ".join(sorted(fields))
        raise ConfigError(f"unknown config key {prefix + str(unknown[0])!r} (known keys here: {known})")
    values = {}
    for name, field in fields.items():
        key = prefix + name
        if name in data:
            values[name] = _convert(hints[name], data[name], key, field.metadata.get(FINITE, True))
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise ConfigError(f"config key {key!r} is required")
    try:
        return cls(**values)
    except ConfigError:
        raise
    except (ValueError, TypeError) as error:
        raise ConfigError(f"config section {prefix.rstrip('.') or '<root>'!r}: {error}") from None


def to_dict(config) -> dict:
    """Plain nested dict of a config dataclass (tuples become lists), ready for YAML or JSON."""
    def plain(value):
        if dataclasses.is_dataclass(value):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        return value

    return plain(config)


def _type_name(annotation) -> str:
    if typing.get_origin(annotation) is Literal:
        return " | ".join(repr(a) for a in typing.get_args(annotation))
    return getattr(annotation, "__name__", str(annotation))


def _convert(annotation, value, key: str, finite: bool = True):
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _convert(option, value, key, finite)
            except ConfigError as error:
                errors.append(error)
        raise errors[0]
    if origin is Literal:
        if isinstance(value, bool) and bool not in map(type, args):  # YAML 1.1 reads no / off as false, yes / on as true
            spelled = [word for word in (("no", "off", "false") if not value else ("yes", "on", "true")) if word in args]
            value = spelled[0] if spelled else value
        if value not in args:
            raise ConfigError(f"config key {key!r} must be one of {_type_name(annotation)}, got {value!r}")
        return value
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key {key!r} expects a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"config key {key!r} expects {len(args)} values, got {len(value)}")
            items = [_convert(a, v, f"{key}[{i}]", finite) for i, (a, v) in enumerate(zip(args, value))]
        else:
            item_type = args[0] if args else Any
            items = [_convert(item_type, v, f"{key}[{i}]", finite) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if dataclasses.is_dataclass(annotation):
        return from_dict(annotation, value, key + ".")
    if annotation is Any:
        return value
    if annotation is bool:
        if isinstance(value, bool):
            return value
    elif annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif annotation is float:
        number = _float_or_none(value)
        if number is not None:
            if not finite or math.isfinite(number):
                return number
            raise ConfigError(f"config key {key!r} must be a finite number, got {value!r}")
    elif annotation is str:
        if isinstance(value, str):
            return value
    elif annotation is dict or typing.get_origin(annotation) is dict:
        if isinstance(value, dict):
            return value
    raise ConfigError(f"config key {key!r} expects {_type_name(annotation)}, got {value!r}")


def _float_or_none(value) -> float | None:
    """`value` as a float when it is a number, or a string YAML left unparsed ("1e-3", "nan"); else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return None
    try:
        return float(value)
    except ValueError:
        return None
    except OverflowError:  # an integer too large for a float
        return math.inf
