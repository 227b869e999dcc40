import os
from pathlib import Path

import pytest

from daae.config import load_config

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "smoke.yaml"


def tiny_config(tmp_path, *overrides):
    """configs/smoke.yaml (synthetic data, tiny MLP) writing into tmp_path."""
    return load_config(SMOKE, [f"run.dir={tmp_path}", "run.progress_bar=false", *overrides])


def find_mnist():
    for candidate in (os.environ.get("DAAE_DATA_DIR"), ROOT.parent / "shared" / "data" / "mnist"):
        if candidate and (Path(candidate) / "train-images-idx3-ubyte.gz").is_file():
            return Path(candidate)
    return None


@pytest.fixture
def mnist_dir():
    path = find_mnist()
    if path is None:
        pytest.skip("real MNIST not found (set DAAE_DATA_DIR or provide ../shared/data/mnist)")
    return path
