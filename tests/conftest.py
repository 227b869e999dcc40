import os
from pathlib import Path

import pytest
import torch

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


def gradients(nets):
    """Each parameter's gradient, by name, for the parameters that have one."""
    return {name: p.grad.clone() for name, p in nets.named_parameters() if p.grad is not None}


def first_gradients_and_losses(config, data, steps):
    """Train ``steps`` iterations from scratch: the gradients left by the first
    (each network's last phase), every iteration's losses, and the setup."""
    from daae.prepare import make_accelerator, prepare_training
    from daae.iteration import training_iteration

    torch._dynamo.reset()  # compile afresh: no compiled code from earlier tests
    setup = prepare_training(config, make_accelerator("no"), data)
    history, first = [], None
    for step in range(steps):
        losses = training_iteration(setup.ctx, setup.optimizers, setup.batches, 1, step, config)
        history.append({name: float(value) for name, value in losses.items()})
        if step == 0:
            first = gradients(setup.nets)
    return first, history, setup


def around_iteration(monkeypatch, number: int, around):
    """``daae.train``'s training iteration, with its ``number``-th call (from 1)
    made as ``around(run)``, ``run()`` being the real call: to crash, signal or
    poison a known step."""
    import daae.train

    make_iteration = daae.train.make_iteration

    def patched(*args):
        iteration, calls = make_iteration(*args), []

        def run(*step_args):
            calls.append(None)
            if len(calls) == number:
                return around(lambda: iteration(*step_args))
            return iteration(*step_args)
        return run

    monkeypatch.setattr(daae.train, "make_iteration", patched)

