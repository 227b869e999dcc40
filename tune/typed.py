"""Typed mappings -> dataclasses for the search YAML: unknown keys and wrong
types raise naming the dotted key (the trainer config does the same for its
own keys in daae.config)."""
from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any

from .space import SearchError


_UNSET = object()


def _wants_text(hint: Any) -> bool:
    if hint is str:
        return True
    return (typing.get_origin(hint) in (typing.Union, types.UnionType)
            and str in typing.get_args(hint))


def command_line_value(value: Any, hint: Any = None) -> Any:
    """A value from daae.config.parse_override: on the command line a scalar
    keeps its text beside what YAML reads it as (``name=off`` is the name
    "off", not YAML 1.1's False); a text key takes the text."""
    parsed = getattr(value, "parsed", _UNSET)
    if not isinstance(value, str) or parsed is _UNSET:
        return value
    return str(value) if _wants_text(hint) and parsed is not None else parsed


def _check(value: Any, hint: Any, key: str) -> Any:
    value = command_line_value(value, hint)
    origin = typing.get_origin(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _check(value, inner, key)
    if origin is list:
        (inner,) = typing.get_args(hint)
        if isinstance(value, (list, tuple)):
            return [_check(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    elif dataclasses.is_dataclass(hint):
        return build(hint, value, f"{key}.")
    elif hint is bool and isinstance(value, bool):
        return value
    elif hint is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    elif hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    elif hint is str and isinstance(value, str):
        return value
    name = getattr(hint, "__name__", str(hint))
    raise SearchError(f"{key}: expected {name}, got {value!r}")


def build(cls, values: Any, prefix: str = ""):
    if values is None:
        return cls()
    if not isinstance(values, dict):
        raise SearchError(f"{prefix.rstrip('.') or 'search'}: expected a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        if key not in names:
            known = ", ".join(f"{prefix}{n}" for n in names)
            raise SearchError(f"unknown key '{prefix}{key}'; known keys here: {known}")
        kwargs[key] = _check(value, hints[key], f"{prefix}{key}")
    return cls(**kwargs)
