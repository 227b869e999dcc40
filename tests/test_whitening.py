import json

import pytest
import torch

from daae.cli import main
from daae.config import EvalConfig
from daae.evaluate import fit_probes_on_codes
from daae.whitening import ClassWhitening, WhiteningError

from conftest import SMOKE


def codes_whose_class_is_in_mean_and_spread(n=3000, num_classes=4, seed=0):
    generator = torch.Generator().manual_seed(seed)
    classes = torch.arange(n) % num_classes
    spread = torch.tensor([[1.0, 0.2], [0.3, 2.0], [0.5, 0.5], [3.0, 1.0]])
    z = torch.randn(n, 2, generator=generator) * spread[classes] + 5.0 * classes[:, None]
    return z, classes


def test_whitened_codes_have_each_class_centred_and_unit_covariance_and_map_back():
    z, classes = codes_whose_class_is_in_mean_and_spread()
    whitening = ClassWhitening.fit(z, classes, 4)
    white = whitening.whiten(z, classes)
    for c in range(4):
        torch.testing.assert_close(white[classes == c].mean(0), torch.zeros(2), atol=1e-5, rtol=0)
        torch.testing.assert_close(torch.cov(white[classes == c].T), torch.eye(2), atol=1e-4, rtol=0)
    torch.testing.assert_close(whitening.unwhiten(white, classes), z, atol=1e-5, rtol=1e-5)


def test_a_probe_no_longer_reads_a_class_held_in_means_and_covariances():
    z, classes = codes_whose_class_is_in_mean_and_spread()
    config = EvalConfig(probe_epochs=40, probe_holdout=0.0, probe_patience=0, probe_hidden=64,
                        probe_lr=1e-2)
    raw = fit_probes_on_codes(z, classes, 4, config, 0).accuracies(z, classes, 4)
    white_z = ClassWhitening.fit(z, classes, 4).whiten(z, classes)
    white = fit_probes_on_codes(white_z, classes, 4, config, 0).accuracies(white_z, classes, 4)
    assert raw["linear_probe_accuracy"] > 0.7 and raw["probe_accuracy"] > 0.7
    # Gaussian codes: with the first two moments equal, nothing is left to read.
    assert white["linear_probe_accuracy"] < 0.35 and white["probe_accuracy"] < 0.35


def test_a_class_too_rare_to_estimate_its_covariance_is_named():
    z, classes = codes_whose_class_is_in_mean_and_spread(n=40)
    classes[classes == 3] = 0
    classes[0:2] = 3
    with pytest.raises(WhiteningError, match="class 3 is predicted for 2 of 40 images"):
        ClassWhitening.fit(z, classes, 4)


def test_class_whitened_eval_reconstructs_as_before_without_the_adversary(tmp_path, capsys,
                                                                          monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert main(["train", "--config", str(SMOKE), f"run.dir={tmp_path}", "run.name=r",
                 "train.max_steps=40", "run.progress_bar=false", "eval.final_test=false",
                 "eval.probe_epochs=1"]) == 0
    capsys.readouterr()
    reads = {}
    for flags in ([], ["--class-whitened"]):
        assert main(["eval", "--checkpoint", str(tmp_path / "r"), "--json", *flags,
                     "eval.probe_epochs=1"]) == 0
        reads[bool(flags)] = json.loads(capsys.readouterr().out)
    raw, white = reads[False], reads[True]
    assert white["class_whitened"] is True and "adversary_accuracy" not in white
    assert "class_whitened" not in raw and "adversary_accuracy" in raw
    assert white["recon_mse"] == pytest.approx(raw["recon_mse"], rel=1e-5)
    assert white["test_accuracy"] == raw["test_accuracy"]
    for key in ("probe_accuracy", "linear_probe_accuracy", "generation_consistency"):
        assert 0.0 <= white[key] <= 1.0, key
    # A style becomes a place within each class's spread of codes: other grids.
    grids = {}
    for flags in ([], ["--class-whitened"]):
        out = tmp_path / f"random{len(flags)}.png"
        assert main(["sample", "--checkpoint", str(tmp_path / "r"), "--kind", "random", "--n", "3",
                     "--out", str(out), *flags]) == 0
        grids[bool(flags)] = out.read_bytes()
    assert grids[True] != grids[False]
