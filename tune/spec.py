"""The search YAML: parsed into dataclasses and checked against the trainer's
own config schema before any trial starts. An example (the defaults are the
dataclasses' below: no arms, one sample, no scheduler, no retries):

    name: weights                 # experiment folder: storage_path/name
    base: ../mnist.yaml           # trainer config: a path (relative to this file) or a mapping
    overrides: {train.max_steps: 3000}   # dotted trainer keys (or a list of "key=value")
    space:                        # dotted trainer key -> distribution (tune/space.py)
      loss.decorrelation: {loguniform: [0.05, 2.0]}
    arms:                         # optional named variants, each a set of dotted overrides
      off: {loss.decorrelation: 0.0}
    num_samples: 8                # random samples; grids multiply (Ray Tune semantics)
    seed: 0                       # of the random sampler
    seeds: [0, 1, 2]              # optional: train every sampled config once per trainer seed
    metric: accuracy              # validation metric the objective ranks on
    mode: max
    target: {tolerance: 0.05, metrics: [adversary_accuracy, probe_accuracy], chance: null}
    scheduler: {kind: asha, grace_period: 500, reduction_factor: 3, max_t: null, brackets: 1}
    resources: {cpu: 1, gpu: 0, workers: null}
    max_failures: 1
    max_concurrent_trials: null
    storage_path: ray_results    # local folder (shared file system on a cluster) or s3://...
    keep_checkpoints: 2
    fault_injection: {crash_once_at_step: null, interrupt_after_trials: null}   # tests only
"""
from __future__ import annotations

import copy
import dataclasses
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from daae.config import Config, from_dict, to_dict
from daae.schema import ConfigError, parse_override, read_yaml, set_dotted

from .objective import Objective, Target
from .space import KINDS, Distribution, SearchError, plain
from .typed import build, command_line_value

# The trial owns these: where it writes, and that it never looks at test data.
RESERVED_KEYS = ("eval.final_test", "run.dir", "run.name", "run.progress_bar")
ARM_KEY = "arm"
# With `seeds`: the sampled configuration a trial trains ({"index": i, "values": {...}}).
SAMPLE_KEY = "sample"
SEED_KEY = "seed"
SEARCH_FILE = "search.yaml"


@dataclass
class Scheduler:
    kind: str = "none"  # asha | none
    grace_period: int = 1  # steps
    reduction_factor: float = 3.0
    # None: train.max_steps of the trial config.
    max_t: Optional[int] = None
    brackets: int = 1


@dataclass
class Resources:
    cpu: float = 1.0
    gpu: float = 0.0
    # Distributed workers per trial (TorchTrainer + Accelerate); None: one per
    # GPU when gpu > 1, else a single process.
    workers: Optional[int] = None

    @property
    def num_workers(self) -> int:
        if self.workers is not None:
            return self.workers
        return int(self.gpu) if self.gpu > 1 else 1


@dataclass
class FaultInjection:
    """Test-only faults, off by default."""
    crash_once_at_step: Optional[int] = None  # raise once, right after the first checkpoint at or past it
    interrupt_after_trials: Optional[int] = None  # SIGINT the driver once this many trials finished


@dataclass
class SearchFile:
    """The YAML's schema (types checked by daae.schema's builder)."""
    name: Optional[str] = None
    base: Any = None
    overrides: Any = None
    space: Any = None
    arms: Any = None
    num_samples: int = 1
    seed: Optional[int] = None
    # Trainer seeds (labelled subsets) each sampled configuration is trained
    # with, so a configuration is ranked on all of them rather than on one draw.
    seeds: Optional[list[int]] = None
    metric: str = "accuracy"
    mode: str = "max"
    target: Target = field(default_factory=Target)
    scheduler: Scheduler = field(default_factory=Scheduler)
    resources: Resources = field(default_factory=Resources)
    max_failures: int = 0
    max_concurrent_trials: Optional[int] = None
    storage_path: str = "ray_results"
    keep_checkpoints: int = 2
    fault_injection: FaultInjection = field(default_factory=FaultInjection)


@dataclass
class SearchSpec:
    file: SearchFile
    base: dict  # the trainer config with `overrides` applied, as a plain mapping
    space: dict[str, Distribution]
    arms: dict[str, dict[str, Any]]
    source: Optional[str] = None

    @property
    def objective(self) -> Objective:
        return Objective(self.file.metric, self.file.mode, self.file.target)

    @property
    def name(self) -> str:
        return self.file.name

    @property
    def experiment_path(self) -> str:
        return f"{self.file.storage_path.rstrip('/')}/{self.file.name}"

    def trainer_config(self, params: dict, *, for_trial: bool = True) -> Config:
        """The trainer config of one trial: base, then its arm, then its sampled
        values. ``for_trial`` pins what a trial must not change (no test split)."""
        values = copy.deepcopy(self.base)
        params = dict(params)
        arm = params.pop(ARM_KEY, None)
        if arm is not None and arm not in self.arms:
            raise SearchError(f"arm '{arm}' is not in arms ({', '.join(self.arms) or 'none'}): the "
                              f"search's arms changed since its trials began; start a new search")
        for key, value in [*(self.arms[arm] if arm is not None else {}).items(), *params.items()]:
            set_dotted(values, key, value)
        if for_trial:
            set_dotted(values, "eval.final_test", False)
            set_dotted(values, "run.progress_bar", False)
        return from_dict(values)

    def sampled_configs(self) -> list[dict]:
        """With ``seeds``: the search's configurations, drawn up front in the
        driver so that every seed of one trains the same values. Tune's own
        variant generator draws them, with its semantics: ``num_samples`` draws,
        each crossed with every grid point (each grid point with its own draw)."""
        import numpy as np
        from ray.tune.search.variant_generator import generate_variants

        domains = {key: dist.to_tune() for key, dist in self.space.items()}
        random_state = np.random.RandomState(self.file.seed)
        return [{path[0]: plain(value) for path, value in resolved.items()}
                for _ in range(self.file.num_samples)
                for resolved, _ in generate_variants(domains, random_state=random_state)]

    def asha_max_t(self) -> Optional[int]:
        """ASHA's last rung: ``scheduler.max_t``, else the base's ``train.max_steps``
        (which validation keeps out of ``space`` and ``arms`` in that case)."""
        max_t = self.file.scheduler.max_t
        return max_t if max_t is not None else self.trainer_config({}).train.max_steps

    def to_yaml(self) -> str:
        """Self-contained: the base is inlined, so resuming needs no other file."""
        data = dataclasses.asdict(self.file)
        data.update(base=self.base, overrides={},
                    space={k: d.to_yaml() for k, d in self.space.items()}, arms=self.arms or None)
        header = f"# resolved from {self.source}\n" if self.source else ""
        return header + yaml.safe_dump(data, sort_keys=False)


def trial_params(config: dict) -> tuple[dict, Optional[int]]:
    """A trial's Tune config as the trainer keys it sets (its arm and, with
    ``seeds``, its seed included), and the index of its sampled configuration
    (None without ``seeds``)."""
    params = {key: plain(value) for key, value in config.items() if key != SAMPLE_KEY}
    sample = config.get(SAMPLE_KEY)
    if sample is None:
        return params, None
    return {**{k: plain(v) for k, v in sample["values"].items()}, **params}, int(sample["index"])


# ------------------------------------------------------------------------- parsing

def _dotted_mapping(where: str, value: Any, leaves_are_specs: bool = False) -> dict[str, Any]:
    """A mapping of dotted trainer keys, from a mapping (dotted or nested) or a
    list of ``key=value`` strings. With ``leaves_are_specs`` (the space), a
    mapping is a section only when all its values are mappings, so a
    misspelt distribution is reported as one rather than as an unknown key."""
    if value is None:
        return {}
    if isinstance(value, list):
        out = {}
        for item in value:
            if not isinstance(item, str):
                raise SearchError(f"{where}: expected 'dotted.key=value' strings, got {item!r}")
            key, parsed = parse_override(item)
            out[key] = parsed
        return out
    if not isinstance(value, dict):
        raise SearchError(f"{where}: expected a mapping of dotted trainer keys, got {value!r}")
    out = {}
    for key, item in value.items():
        if not isinstance(key, str):
            raise SearchError(f"{where}: keys must be strings, got {key!r}")
        section = isinstance(item, dict) and bool(item) and (
            all(isinstance(v, dict) for v in item.values()) if leaves_are_specs
            else not set(item) <= set(KINDS))
        if section:
            for sub, sub_value in _dotted_mapping(f"{where}.{key}", item, leaves_are_specs).items():
                out[f"{key}.{sub}"] = sub_value
        else:
            out[key] = item
    return out


WHOLE_MAPPINGS = {"overrides": "overrides.KEY=VALUE", "space": "space.KEY={choice: [...]}",
                  "arms": "arms.NAME.KEY=VALUE"}


def _apply_cli(values: dict, overrides: list[str]) -> None:
    """``key=value`` on the search YAML's own keys. ``overrides.``, ``space.``
    and ``arms.NAME.`` prefixes reach into the trainer-key mappings."""
    for text in overrides:
        key, value = parse_override(text)
        if key in WHOLE_MAPPINGS:
            # Replacing the whole mapping would drop the YAML's entries unseen (or,
            # with null or {}, keep them all); entries are set one by one.
            raise SearchError(f"override '{text}': the command line sets entries of '{key}', not "
                              f"the whole mapping; write {WHOLE_MAPPINGS[key]}, or edit the "
                              f"search YAML")
        if key.startswith(("overrides.", "space.")):
            section, rest = key.split(".", 1)
            values[section][rest] = value
        elif key.startswith("arms."):
            parts = key.split(".", 2)
            if len(parts) != 3:
                raise SearchError(f"override '{text}': expected arms.NAME.dotted.key=value")
            values["arms"].setdefault(parts[1], {})[parts[2]] = value
        elif (key.split(".")[0] in {f.name for f in dataclasses.fields(Config)}
              and key.split(".")[0] not in {f.name for f in dataclasses.fields(SearchFile)}):
            # `seed` is both: the search file's (the sampler's) wins, as documented.
            raise SearchError(f"override '{text}': '{key}' is a trainer key; the command line sets "
                              f"the search YAML's keys, so write overrides.{key}={value}")
        else:
            try:
                set_dotted(values, key, value)
            except ConfigError as exc:
                raise SearchError(str(exc)) from None


def _trainer_hint(dotted: str) -> Any:
    """The declared type of a dotted trainer key, or None if there is no such key
    (validation names it later)."""
    cls = Config
    for part in dotted.split("."):
        if not dataclasses.is_dataclass(cls):
            return None
        hint = typing.get_type_hints(cls).get(part)
        if hint is None:
            return None
        cls = hint
    return cls


def _refuse_section_resets(where: str, mapping: dict) -> None:
    """A null for a whole section would put all of it back to the trainer's
    defaults, what a YAML section with every key commented out (``train:``)
    reads as; a null leaf (``train.max_steps: null``) is a value."""
    for key, value in mapping.items():
        if value is None and dataclasses.is_dataclass(_trainer_hint(key)):
            raise SearchError(f"{where}: '{key}' is null, which would reset the whole '{key}' "
                              f"section to the trainer's defaults (a section whose keys are all "
                              f"commented out reads so); give its keys ({key}.KEY: VALUE) or "
                              f"remove it")


def _plain_values(values: dict) -> None:
    """Command-line values as plain data, read by the type of their trainer key."""
    values["overrides"] = {k: command_line_value(v, _trainer_hint(k))
                           for k, v in values["overrides"].items()}
    values["space"] = {k: command_line_value(v) for k, v in values["space"].items()}
    values["arms"] = {name: {k: command_line_value(v, _trainer_hint(k)) for k, v in arm.items()}
                      for name, arm in values["arms"].items()}


def _load_base(base: Any, folder: Path) -> dict:
    if isinstance(base, dict):
        return copy.deepcopy(base)
    if isinstance(base, str):
        path = Path(base)
        if not path.is_absolute():
            path = folder / path if (folder / path).exists() else Path.cwd() / path
        return read_yaml(path)
    raise SearchError(f"base: expected a trainer config path or mapping, got {base!r}")


def parse_search(values: dict, *, folder: Path = Path("."), cli: list[str] = (),
                 source: Optional[str] = None) -> SearchSpec:
    values = copy.deepcopy(values or {})
    if not isinstance(values, dict):
        raise SearchError("a search YAML must be a mapping at the top level")
    values["overrides"] = _dotted_mapping("overrides", values.get("overrides"))
    values["space"] = _dotted_mapping("space", values.get("space"), leaves_are_specs=True)
    arms = values.get("arms") or {}
    if not isinstance(arms, dict):
        raise SearchError(f"arms: expected a mapping of arm name -> dotted overrides, got {arms!r}")
    for name in arms:
        if not isinstance(name, str):
            # YAML 1.1 reads an unquoted on/off/yes/no as a boolean: `off:` would be an arm
            # 'False', and arms.off.KEY=V on the command line a new arm beside it.
            raise SearchError(f"arms: the arm name {name!r} is not text: YAML reads an unquoted "
                              f"on, yes or true as True, off, no or false as False, and digits "
                              f"as a number; quote the name in the YAML ('off': ...)")
    values["arms"] = {name: _dotted_mapping(f"arms.{name}", arm) for name, arm in arms.items()}
    _apply_cli(values, list(cli))
    _plain_values(values)
    # Again: `overrides.eval={final_test: true}` on the command line is a section too.
    values["overrides"] = _dotted_mapping("overrides", values["overrides"])
    _refuse_section_resets("overrides", values["overrides"])
    for name, arm in values["arms"].items():
        _refuse_section_resets(f"arms '{name}'", arm)
    search = build(SearchFile, values)
    if search.base is None:
        raise SearchError("base: a search needs a trainer config (a path or a mapping)")
    if search.name is None:
        search.name = Path(source).stem if source else "search"
    base = _load_base(search.base, folder)
    try:
        for key, value in search.overrides.items():
            if key in RESERVED_KEYS:
                # The trial would overwrite it, so the user's value would be dropped unseen.
                raise SearchError(f"overrides '{key}': each trial sets it (its folder under "
                                  f"storage_path/name; no test split; no progress bar); remove it, "
                                  f"and move the search with storage_path=DIR")
            set_dotted(base, key, value)
        # The full config, defaults included, so the saved search reproduces
        # even if a default changes later.
        base = to_dict(from_dict(base))
    except ConfigError as exc:
        raise SearchError(f"base/overrides: {exc}") from None
    space = {key: Distribution.parse(key, spec) for key, spec in search.space.items()}
    spec = SearchSpec(search, base, space, values["arms"], source)
    _absolute_paths(spec)
    from .validate import validate  # it reads SearchSpec's trainer configs, so it imports this module

    validate(spec)
    return spec


def load_search(path: str | Path, cli: list[str] = ()) -> SearchSpec:
    path = Path(path)
    return parse_search(read_yaml(path), folder=path.parent, cli=cli, source=str(path))


def _absolute_paths(spec: SearchSpec) -> None:
    # Trials run with their own working directory, so relative paths are
    # pinned to where the search was started; DAAE_DATA_DIR too, because a
    # worker on another node does not share the driver's environment.
    data = spec.base.setdefault("data", {})
    root = data.get("root") or os.environ.get("DAAE_DATA_DIR")
    if root:
        data["root"] = str(Path(root).expanduser().resolve())
    if "://" not in spec.file.storage_path:
        spec.file.storage_path = str(Path(spec.file.storage_path).expanduser().resolve())
