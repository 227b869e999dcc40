"""Runs only where real MNIST is available (DAAE_DATA_DIR or ../shared/data/mnist)."""
from daae.config import load_config
from daae.data import load_data
from daae.train import train

from conftest import ROOT


def test_mnist_split_follows_the_protocol(mnist_dir):
    config = load_config(ROOT / "configs" / "mnist.yaml", [f"data.root={mnist_dir}"])
    data = load_data(config.data, seed=0)
    assert len(data.validation) == 10000 and len(data.test) == 10000
    assert len(data.labelled) == 100 and len(data.unlabelled) == 49900
    assert data.image_shape == (1, 28, 28)


def test_short_real_mnist_run_is_well_above_chance(mnist_dir, tmp_path):
    config = load_config(ROOT / "configs" / "mnist_mlp.yaml", [
        f"data.root={mnist_dir}", f"run.dir={tmp_path}", "run.progress_bar=false",
        "model.scale=0.25", "model.adversary_hidden=128", "train.max_steps=150",
        "train.step_mode=fused", "eval.final_test=true", "eval.probe_hidden=64",
        "eval.probe_epochs=1", "eval.probe_train_size=2000", "data.validation_size=2000"])
    # validation_size is smaller only to keep the test quick; the protocol test above checks 10k.
    result = train(config)
    assert result["test"]["accuracy"] > 0.4
