"""Distribution specs of a search space (``{loguniform: [1e-4, 1e-3]}``) and
their Ray Tune domains.

Specs are plain YAML data, checked here before Ray sees them, so a typo fails
with the key's name instead of deep inside Tune's variant generator.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from daae.config import ConfigError

KINDS = ("choice", "grid", "uniform", "loguniform", "randint")
SPEC_HELP = ("{choice: [a, b, ...]}, {grid: [a, b, ...]}, {uniform: [low, high]}, "
             "{loguniform: [low, high]}, {randint: [low, high]} (high exclusive)")


class SearchError(ConfigError):
    """A search YAML problem; the message names the key."""


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class Distribution:
    kind: str
    args: tuple

    @classmethod
    def parse(cls, key: str, spec: Any) -> "Distribution":
        where = f"space '{key}'"
        if not isinstance(spec, dict) or len(spec) != 1:
            raise SearchError(f"{where}: expected one distribution, one of {SPEC_HELP}; got {spec!r}")
        ((kind, args),) = spec.items()
        if kind not in KINDS:
            raise SearchError(f"{where}: unknown distribution '{kind}'; expected one of {SPEC_HELP}")
        if not isinstance(args, list) or not args:
            raise SearchError(f"{where}: {kind} needs a non-empty list, got {args!r}")
        if kind in ("choice", "grid"):
            return cls(kind, tuple(args))
        if len(args) != 2 or not all(_is_number(a) for a in args):
            raise SearchError(f"{where}: {kind} needs [low, high] as two numbers, got {args!r}")
        low, high = args
        if not low < high:
            raise SearchError(f"{where}: {kind} needs low < high, got {args!r}")
        if kind == "loguniform" and low <= 0:
            raise SearchError(f"{where}: loguniform needs low > 0, got {args!r}")
        if kind == "randint" and not all(isinstance(a, int) for a in args):
            raise SearchError(f"{where}: randint needs integer bounds, got {args!r}")
        return cls(kind, (low, high))

    def to_yaml(self) -> dict:
        return {self.kind: list(self.args)}

    def candidates(self) -> list:
        """Values that represent the range when checking it against the trainer
        config: every listed value, or both ends of a range."""
        if self.kind in ("choice", "grid"):
            return list(self.args)
        low, high = self.args
        if self.kind == "randint":
            return [low, high - 1]
        return [float(low), float(high)]

    def to_tune(self):
        from ray import tune

        if self.kind == "grid":
            return tune.grid_search(list(self.args))
        if self.kind == "choice":
            return tune.choice(list(self.args))
        return getattr(tune, self.kind)(*self.args)


def plain(value: Any) -> Any:
    """Numpy scalars (what Tune samples) as Python values, so the trainer's
    strict type checks accept them."""
    item = getattr(value, "item", None)
    if callable(item) and type(value).__module__ == "numpy":
        return item()
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value
