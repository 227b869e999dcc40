"""Run folders: naming, the resolved config, metrics.json, and rebuilding a
trained model from a folder (for eval, sampling and resume)."""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from . import checkpoint
from .atomic import atomic_write
from .config import Config, ConfigError, from_dict, load_config, to_dict
from .data import SemiSupervisedData, load_data
from .models import Networks

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.json"
RESUMES_FILE = "resumes.yaml"
# Held (flock) by the process training the folder, for as long as it trains.
LOCK_FILE = ".daae.lock"

# What draws the labelled subset and the validation split: a resume that
# changed one would train on other labels, and an evaluation would validate on
# images the run trained on.
SPLIT_KEYS = ("seed", "data.name", "data.labels_per_class", "data.validation_size",
              "data.split_seed", "data.svhn_extra", "data.synthetic_train_size",
              "data.synthetic_test_size", "data.synthetic_image_size")


def build_networks(config: Config, image_shape: tuple[int, int, int], num_classes: int) -> Networks:
    model = config.model
    return Networks(model.kind, image_shape, num_classes, model.z_dim, model.scale,
                    model.adversary_hidden, model.correlation_classifiers,
                    model.correlation_standardised, model.class_conditional_prior,
                    model.class_whitening)


def new_run_dir(config: Config) -> Path:
    parent = Path(config.run.dir).expanduser()  # a YAML's '~/runs' is not expanded by a shell
    if config.run.name:
        return parent / config.run.name
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = f"{stamp}-{config.data.name}-{config.model.kind}-seed{config.seed}"
    candidate, suffix = parent / base, 1
    while candidate.exists():
        suffix += 1
        candidate = parent / f"{base}-{suffix}"
    return candidate


def _dotted(values: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in values.items():
        if isinstance(value, dict):
            out |= _dotted(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


# Where the run folder is: a resume goes on in the folder it is given (a copy
# elsewhere included) and writes that folder's place into config.yaml.
FOLDER_KEYS = ("run.dir", "run.name")


def config_changes(before: dict, after: Config) -> dict[str, tuple[Any, Any]]:
    """Dotted key -> (value before, value after) for every key a resume changed.
    ``before`` is the config a checkpoint was written with; a key it lacks
    (added to daae since) had its default, which keeps the behaviour of before."""
    defaults = _dotted(to_dict(from_dict({})))
    old = defaults | _dotted(before)
    return {key: (old.get(key), value) for key, value in _dotted(to_dict(after)).items()
            if old.get(key) != value and key not in FOLDER_KEYS}


def refuse_split_changes(changes: dict[str, tuple[Any, Any]], problem: str, fix: str) -> None:
    """``CheckpointError`` when ``changes`` (``config_changes``) touch a ``SPLIT_KEYS`` key."""
    fixed = {key: changes[key] for key in SPLIT_KEYS if key in changes}
    if fixed:
        raise checkpoint.CheckpointError(
            f"{problem}: {describe_changes(fixed)}. These draw the labelled subset and the "
            f"validation split, {fix}")


def model_changes(changes: dict[str, tuple[Any, Any]]) -> dict[str, tuple[Any, Any]]:
    """The ``model.`` keys among ``changes``: what to name when a checkpoint's
    weights do not fit (a key the checkpoint predates included: it had its default)."""
    return {key: values for key, values in changes.items() if key.startswith("model.")}


def describe_changes(changes: dict[str, tuple[Any, Any]]) -> str:
    """``config_changes`` for a message: "key is NOW here, BEFORE in the
    checkpoint; ...", each value as an override would spell it (JSON: false, not False)."""
    return "; ".join(f"{key} is {json.dumps(now)} here, {json.dumps(before)} in the checkpoint"
                     for key, (before, now) in changes.items())


def is_training(run_dir: str | Path) -> bool:
    """Whether a live process holds the run folder's lock (it is training it).
    Probed with a shared lock taken without waiting and dropped at once, so the
    trainer is not disturbed; a folder without the lock file, or on a file
    system without locks, counts as not training."""
    import fcntl

    try:
        handle = open(Path(run_dir) / LOCK_FILE, "rb")  # never created here
    except OSError:
        return False
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        except OSError:
            return False
        fcntl.flock(handle, fcntl.LOCK_UN)
        return False


def read_resumes(run_dir: Path, fix: str) -> list[dict]:
    """The entries of the run's resumes.yaml ([] without one), each a mapping
    with an integer ``step``; a file that is not so is a ``ConfigError``
    naming it, ending with ``fix`` (what the caller's command can do about it)."""
    path = Path(run_dir) / RESUMES_FILE
    problem = f"{path} should be a list of resumes (step, changed), as daae writes it"
    try:
        entries = (yaml.safe_load(path.read_text()) if path.is_file() else None) or []
    except yaml.YAMLError as exc:
        raise ConfigError(f"{problem}, but it is not valid YAML ({exc}); {fix}") from None
    if not isinstance(entries, list):
        raise ConfigError(f"{problem}; {fix}")
    for entry in entries:
        if not (isinstance(entry, dict) and isinstance(entry.get("step"), int)
                and not isinstance(entry["step"], bool)):
            raise ConfigError(f"{problem}, but it holds {entry!r}, which is not a resume with its step; "
                              f"{fix}")
    return entries


def record_resume(run_dir: Path, step: int, changes: dict[str, tuple[Any, Any]]) -> int:
    """Append this resume to the run's resumes.yaml. config.yaml holds only the
    config the run goes on with, so this is where a setting changed mid-run, and
    the step it changed at, stays on record. Returns how many resumes it now lists."""
    path = Path(run_dir) / RESUMES_FILE
    entries = read_resumes(run_dir, "move it aside to resume this run")
    entries.append({"step": step, "changed": {
        key: {"from": before, "to": after} for key, (before, after) in changes.items()}})
    atomic_write(path, lambda handle: handle.write(yaml.safe_dump(entries, sort_keys=False)), binary=False)
    return len(entries)


def write_json(data: dict, path: Path) -> None:
    atomic_write(path, lambda handle: handle.write(json.dumps(data, indent=2, sort_keys=True) + "\n"),
                 binary=False)


def load_run_config(run_dir: str | Path, overrides: list[str] = ()) -> Config:
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise ConfigError(f"{run_dir} is not a daae run folder: it has no {CONFIG_FILE}. "
                          f"Pass the folder that `daae train` wrote (run.dir/run.name).")
    return load_config(path, overrides)


@dataclass
class TrainedRun:
    config: Config
    data: SemiSupervisedData
    nets: Networks
    state: dict


def resolve_device(device: str | None):
    """``--device``: the name given, or the GPU when there is one, else the CPU."""
    import torch

    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"--device {device}: not a device name; use cpu, cuda or cuda:N") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: this PyTorch sees no CUDA GPU; use --device cpu")
    return resolved


def load_trained_run(run_dir: str | Path, device="cpu", overrides: list[str] = ()) -> TrainedRun:
    """The networks of a run folder's last checkpoint, in eval mode, and its data
    (the splits it trained with: an override of a ``SPLIT_KEYS`` key is refused)."""
    config = load_run_config(run_dir, overrides)
    # Here, not in checkpoint.load: a resume loads its checkpoint holding this lock itself.
    if not checkpoint.checkpoint_path(run_dir).is_file() and is_training(run_dir):
        raise checkpoint.CheckpointError(
            f"no checkpoint in {run_dir} yet: it is still training (a live daae process holds its "
            f"{LOCK_FILE}) and writes its first checkpoint after run.checkpoint_every steps "
            f"({config.run.checkpoint_every} here): wait for it")
    state = checkpoint.load(run_dir)
    changes = config_changes(state.get("config", {}), config)
    refuse_split_changes(changes, f"the checkpoint in {run_dir} was trained on other splits",
                         "so its figures would be read on images it trained on: leave them as the run "
                         "had them")
    data = load_data(config.data, config.seed)
    nets = build_networks(config, data.image_shape, data.num_classes)
    try:
        nets.load_state_dict(state["networks"])
    except RuntimeError as exc:
        changed = model_changes(changes)
        if changed:  # an override (or an edited config.yaml) names another model
            raise checkpoint.CheckpointError(
                f"the checkpoint in {run_dir} does not fit: {describe_changes(changed)}. Read it "
                f"with the model it was trained with") from None
        raise checkpoint.CheckpointError(
            f"the checkpoint in {run_dir} does not fit the model its {CONFIG_FILE} describes "
            f"(model.kind={config.model.kind}, model.scale={config.model.scale}): {exc}") from None
    return TrainedRun(config, data, nets.to(device).eval(), state)
