"""The recipe's dict codec: frozen dataclasses <-> plain data (dicts, lists, str, numbers) and YAML.

Generic over any dataclass, read through its type hints, so the schema (:mod:`orthoquant.config`)
imports it and not the other way round. Unknown keys, wrong types and YAML syntax errors are one-line
:class:`~orthoquant.errors.ConfigError` s naming the field; ranges and names are the dataclasses' own
checks, run when they are built.
"""
from __future__ import annotations

import dataclasses
import enum
import re
import types
import typing
from typing import Any, Sequence

import yaml

from .choices import require
from .errors import ConfigError


class _RecipeLoader(yaml.SafeLoader):
    """PyYAML's safe loader reading YAML 1.2 floats too: YAML 1.1 needs a dot, so ``1e-30`` would be
    the string '1e-30' (and ``solver.damp=1e-30`` a type error). Resolvers added here come after the
    1.1 ones, so only a scalar that 1.1 leaves a string and that is an exponent number changes."""


_RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:[0-9][0-9_]*\.?[0-9_]*|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+.0123456789"))


def parse_yaml(text: str, where: str) -> Any:
    """``text`` as YAML (with :class:`_RecipeLoader`); a syntax error is a one-line :class:`ConfigError`
    naming ``where`` and the line and column."""
    try:
        return yaml.load(text, Loader=_RecipeLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{where} is not valid YAML{at}: {problem}") from None


def to_plain(obj: Any) -> Any:
    """``obj`` as new plain data: dataclasses as dicts in field order, tuples as lists, choices as strings."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {k: to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return [to_plain(v) for v in obj]
    if isinstance(obj, enum.Enum):  # yaml.safe_dump knows str, not its subclasses
        return obj.value
    return obj


def from_plain(cls: type, data: Any, where: str) -> Any:
    """The dataclass ``cls`` built from the mapping ``data``; ``where`` names it in errors."""
    require(isinstance(data, dict), f"{where} must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    require(not unknown, f"unknown key(s) {unknown} in {where}; allowed: {names}")
    kwargs = {k: _convert(hints[k], v, f"{where}.{k}" if where != "recipe" else k) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ConfigError(f"{where}: {e}") from None
    except ConfigError as e:
        if where == "recipe" or str(e).startswith(where):
            raise
        raise ConfigError(f"{where}: {e}") from None


def _convert(tp: Any, value: Any, where: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            require(type(None) in args, f"{where} may not be empty")
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _convert(inner, value, where)
    if origin is tuple:
        require(isinstance(value, (list, tuple)), f"{where} must be a list")
        return tuple(_convert(args[0], v, f"{where}[{i}]") for i, v in enumerate(value))
    if dataclasses.is_dataclass(tp):
        return from_plain(tp, value, where)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        tp = str  # a name: the dataclass checks it against its choices, naming the field and the choices
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    ok = isinstance(value, tp) and not (tp is int and isinstance(value, bool))
    require(ok, f"{where}={value!r} must be of type {tp.__name__}")
    return value


def merge_overrides(data: dict[str, Any]) -> dict[str, Any]:
    """Override specs in YAML may be partial: fill them in from the recipe's own weights/activations."""
    if not isinstance(data, dict) or not data.get("overrides"):
        return data
    data = dict(data)
    merged = []
    for o in data["overrides"]:
        o = dict(o) if isinstance(o, dict) else o
        for key in ("weights", "activations"):
            if isinstance(o, dict) and isinstance(o.get(key), dict) and isinstance(data.get(key), dict):
                o[key] = {**data[key], **o[key]}
        merged.append(o)
    data["overrides"] = merged
    return data


def with_assignments(data: dict[str, Any], assignments: Sequence[str]) -> dict[str, Any]:
    """A copy of ``data`` with ``key.path=value`` assignments applied (values parsed as YAML scalars)."""
    data = to_plain(data)  # a deep copy: the caller's dict stays as it was
    for item in assignments:
        key, sep, raw = item.partition("=")
        require(bool(sep) and bool(key), f"--set {item!r}: expected key.path=value")
        _set_path(data, key.strip().split("."), parse_yaml(raw, f"--set {item!r}: the value"))
    return data


def _set_path(data: dict[str, Any], path: list[str], value: Any) -> None:
    for key in path[:-1]:
        if data.get(key) is None:
            data[key] = {}
        require(isinstance(data[key], dict), f"--set {'.'.join(path)}: '{key}' is not a section")
        data = data[key]
    data[path[-1]] = value
