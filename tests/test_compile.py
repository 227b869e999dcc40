"""train.compile: the compiled networks must train as the eager ones do."""
import pytest
import torch

from daae.data import load_data

from conftest import first_gradients_and_losses, tiny_config


@pytest.mark.parametrize("step_mode", ["fused", "reference"])
def test_compiled_step_trains_like_the_eager_one(tmp_path, step_mode):
    eager_config = tiny_config(tmp_path, f"train.step_mode={step_mode}", "train.compile=no")
    compiled_config = tiny_config(tmp_path, f"train.step_mode={step_mode}", "train.compile=default")
    data = load_data(eager_config.data, eager_config.seed)

    eager_grads, eager_losses, _ = first_gradients_and_losses(eager_config, data, 3)
    compiled_grads, compiled_losses, compiled = first_gradients_and_losses(compiled_config, data, 3)

    assert type(compiled.ctx.wrapped["encoder"]).__name__ == "OptimizedModule"
    assert compiled_grads.keys() == eager_grads.keys() and len(eager_grads) > 0
    for name, expected in eager_grads.items():
        torch.testing.assert_close(compiled_grads[name], expected, rtol=1e-4, atol=1e-6,
                                   msg=lambda message: f"{name}: {message}")
    # Later steps drift by more than rounding: Adam's first updates are about
    # lr * sign(gradient), so a near-zero gradient that flips sign moves a weight by 2 lr.
    for eager_step, compiled_step in zip(eager_losses, compiled_losses):
        assert compiled_step.keys() == eager_step.keys()
        for name in eager_step:
            assert compiled_step[name] == pytest.approx(eager_step[name], rel=1e-3), name
