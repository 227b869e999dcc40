"""Typed mappings -> dataclasses for the search YAML, with the trainer config's
own checker (daae.schema): unknown keys and wrong types raise naming the
dotted key, here as SearchError."""
from __future__ import annotations

from typing import Any

from daae.schema import ConfigError, build_dataclass, command_line_value

from .space import SearchError

__all__ = ["build", "command_line_value"]


def build(cls, values: Any, prefix: str = ""):
    try:
        return build_dataclass(cls, values, prefix)
    except SearchError:
        raise
    except ConfigError as exc:
        raise SearchError(str(exc)) from None
