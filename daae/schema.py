"""Mappings checked against dataclass annotations, and ``dotted.key=value``
overrides: the machinery under the trainer's config (daae.config) and the
search files' (tune/). A key the dataclass does not declare, or a value of the
wrong type, raises naming the dotted key."""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A configuration problem; the message names the key and the fix."""


# --------------------------------------------------------------------------- types

def _field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


class OverrideText(str):
    """A command-line value: its text, and what YAML reads it as. A str key takes
    the text, so ``run.name=off`` is the name "off", not YAML 1.1's False."""

    def __new__(cls, text: str, parsed: Any):
        self = super().__new__(cls, text)
        self.parsed = parsed
        return self

    def __getnewargs__(self):  # copy and pickle (Ray ships configs between processes)
        return str(self), self.parsed


def command_line_value(value: Any, hint: Any = None) -> Any:
    """Resolve an :class:`OverrideText` for a key annotated ``hint``: a text key
    takes the text, any other key what YAML reads."""
    if not isinstance(value, OverrideText):
        return value
    wants_text = hint is str or (typing.get_origin(hint) in (typing.Union, types.UnionType)
                                 and str in typing.get_args(hint) and value.parsed is not None)
    # Quotes typed around a text value (data.name="mnist") are YAML's, not the name's.
    quoted = isinstance(value.parsed, str) and str(value)[:1] in "'\"" and str(value)[-1:] == str(value)[:1]
    return (value.parsed if quoted else str(value)) if wants_text else value.parsed


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``hint``; ints pass as floats."""
    value = command_line_value(value, hint)
    if hint is Any:
        return value
    if isinstance(value, NonDecimalInt):
        raise ConfigError(f"{key}: YAML 1.1 reads {value.text} as {int(value)} (not base 10): "
                          f"write the number in decimal, or quote it for a text")
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(value, inner, key)
    if origin is list:
        (inner,) = typing.get_args(hint)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            # YAML 1.1 reads 1e-3 (no dot) as a string; it is plainly a float here.
            try:
                number = float(value)
            except ValueError:
                pass
        if number is not None:
            if not math.isfinite(number):  # no setting means infinity or NaN here
                raise ConfigError(f"{key}: expected a finite number, got {value!r}")
            return number
    elif hint is str:
        if isinstance(value, str):
            return value
    name = getattr(hint, "__name__", str(hint))
    raise ConfigError(f"{key}: expected {name}, got {value!r} ({type(value).__name__}){_fix_for(value, hint)}")


def _fix_for(value: Any, hint: Any) -> str:
    """The fix for the wrong-type values people write most."""
    if hint is str and isinstance(value, bool):
        return ("; YAML reads an unquoted yes/no/on/off/true/false as a boolean: quote the text "
                "(for example 'no')")
    if isinstance(value, str) and value.strip().lower() in ("none", "null", "nil"):
        return "; write null (or ~) for none"
    if hint is int and isinstance(value, (str, float)):  # a bool is neither
        try:
            number = float(value)
        except ValueError:
            return ""
        if math.isfinite(number) and number == int(number):
            return f"; write it as a whole number: {int(number)}"
    return ""


def build_dataclass(cls, values: Any, prefix: str = ""):
    """``cls`` from a mapping, checking every key and type; an empty section
    (None) takes the defaults."""
    if values is None:
        return cls()
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping of its keys, got "
                          f"{values!r}")
    hints = _field_types(cls)
    kwargs = {}
    for key, value in values.items():
        dotted = f"{prefix}{key}"
        if key not in hints:
            known = ", ".join(f"{prefix}{k}" for k in hints)
            raise ConfigError(f"unknown key '{dotted}'; known keys here: {known}")
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = build_dataclass(hint, value, f"{dotted}.")
        else:
            kwargs[key] = _coerce(value, hint, dotted)
    return cls(**kwargs)


# ----------------------------------------------------------------------- overrides

def parse_override(text: str) -> tuple[str, Any]:
    """``a.b=value`` with the value read as a YAML scalar or flow list."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override '{text}': expected the form dotted.key=value")
    try:
        value = load_yaml_text(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"override '{text}': the value is not valid YAML ({exc})") from None
    if not isinstance(value, (dict, list)):
        value = OverrideText(raw.strip(), value)
    return key.strip(), value


def set_dotted(values: dict, key: str, value: Any) -> None:
    """Set ``key`` in the nested ``values``; a mapping given for a section
    (``train={lr: 0.1}``) is merged into it, so the section's other keys stay."""
    node = values
    parts = key.split(".")
    if not all(parts):
        raise ConfigError(f"override '{key}': expected a dotted key such as train.lr")
    for part in parts[:-1]:
        if node.get(part) is None:  # a YAML section with every key commented out reads as null
            node[part] = {}
        child = node[part]
        if not isinstance(child, dict):
            raise ConfigError(f"override '{key}': '{part}' is a value, not a section")
        node = child
    if isinstance(value, dict) and isinstance(node.get(parts[-1]), dict):
        for sub_key, sub_value in value.items():
            set_dotted(node[parts[-1]], str(sub_key), sub_value)
        return
    node[parts[-1]] = value


def apply_overrides(values: dict, overrides: list[str]) -> dict:
    for text in overrides:
        key, value = parse_override(text)
        set_dotted(values, key, value)
    return values


class NonDecimalInt(int):
    """An int YAML 1.1 read in another base (010 is 8, 0x10 16, 1:30 90): the
    checks refuse it where a number is meant, naming the text."""

    def __new__(cls, number: int, text: str):
        self = super().__new__(cls, number)
        self.text = text
        return self

    def __getnewargs__(self):
        return int(self), self.text


# A search writes the values it was given back to YAML (search.yaml).
yaml.SafeDumper.add_representer(NonDecimalInt, yaml.representer.SafeRepresenter.represent_int)

_MERGE_TAG = "tag:yaml.org,2002:merge"


class _ConfigLoader(yaml.SafeLoader):
    """yaml.safe_load, except that a key written twice in one mapping is an
    error (plain YAML keeps the last, and the first block's settings vanish),
    and an int written in another base than 10 is marked (``NonDecimalInt``)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == _MERGE_TAG:  # `<<: *anchor`: its keys may be overridden here
                continue
            key = self.construct_object(key_node, deep=deep)
            try:
                repeated = key in seen
            except TypeError:
                raise yaml.constructor.ConstructorError(
                    None, None, "a key must be a name, not a list or a mapping",
                    key_node.start_mark) from None
            if repeated:
                raise yaml.constructor.ConstructorError(
                    None, None, f"the key '{key}' appears twice in one mapping (keep one)",
                    key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)

    def construct_yaml_int(self, node):
        number = super().construct_yaml_int(node)
        digits = str(node.value).replace("_", "").lstrip("+-")
        if digits == "0" or (digits.isdigit() and not digits.startswith("0")):
            return number
        return NonDecimalInt(number, str(node.value))


_ConfigLoader.add_constructor("tag:yaml.org,2002:int", _ConfigLoader.construct_yaml_int)


def load_yaml_text(text: str, name: str | None = None) -> Any:
    loader = _ConfigLoader(text)
    if name is not None:
        loader.name = name  # YAML's messages then name the file, not "<unicode string>"
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"config file '{path}' is a folder: pass a YAML file in it")
    if not path.is_file():
        raise ConfigError(f"config file '{path}' does not exist")
    try:  # the text, so that YAML's messages quote the line
        values = load_yaml_text(path.read_text(), str(path))
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file '{path}' is not valid YAML: {exc}") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ConfigError(f"config file '{path}': the top level must be a mapping")
    return values
