"""Checkpoints: written atomically, read with weights_only=True."""
from __future__ import annotations

from pathlib import Path

import torch

from .atomic import atomic_write

FORMAT_VERSION = 1
LAST = "last.pt"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable or does not fit the model."""


def checkpoint_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints" / LAST


def save_atomic(state: dict, path: str | Path) -> None:
    atomic_write(path, lambda handle: torch.save(state, handle))


def load(path: str | Path) -> dict:
    """A checkpoint file, or a run folder holding ``checkpoints/last.pt``."""
    path = Path(path)
    if path.is_dir():
        path = checkpoint_path(path)
    if not path.is_file():
        # A run stopped before its first checkpoint has only its config to go on with.
        config = path.parent.parent / "config.yaml"
        restart = (f" {config.parent} stopped before its first checkpoint: start it again with "
                   f"daae train --config {config}" if config.is_file() else "")
        raise CheckpointError(f"no checkpoint at {path}: pass a run folder that holds "
                              f"checkpoints/{LAST} (written every run.checkpoint_every steps).{restart}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a damaged file
        raise CheckpointError(f"{path} cannot be read ({type(exc).__name__}: {exc}); it is damaged "
                              f"or not a daae checkpoint.") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"{path} is not a daae checkpoint of format {FORMAT_VERSION}.")
    return state
