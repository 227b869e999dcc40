import json

import pytest
import torch

import daae.consistency
import daae.evaluate
from daae.cli import build_parser, main
from daae.config import EvalConfig
from daae.data import load_data
from daae.evaluate import evaluate, evaluate_run, fit_probes, fit_probes_on_codes
from daae.runs import build_networks
from daae.whitening import (CLASS_MAPS, ClassGaussianization, ClassWhitening, WhiteningError,
                            whiten_networks)

from conftest import SMOKE, tiny_config


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


def codes_whose_class_is_in_their_shape(n, seed):
    """Two classes of 2-d codes with equal means and covariances: class 0
    Gaussian, class 1 bimodal along its first axis."""
    generator = torch.Generator().manual_seed(seed)
    classes = torch.arange(n) % 2
    z = torch.randn(n, 2, generator=generator)
    sign = torch.randint(0, 2, (n,), generator=generator) * 2 - 1
    bimodal = 0.95 * sign + 0.31 * torch.randn(n, generator=generator)  # mean 0, variance 1
    z[classes == 1, 0] = bimodal[classes == 1]
    return z, classes


def test_gaussianized_codes_leave_no_class_in_their_shape_and_map_back():
    z, classes = codes_whose_class_is_in_their_shape(8000, seed=0)
    held_out, held_out_classes = codes_whose_class_is_in_their_shape(8000, seed=1)
    held_out = held_out * 4.0  # past the fitted quantiles as well: the tails extend
    gaussianization = ClassGaussianization.fit(z, classes, 2)
    white = ClassWhitening.fit(z, classes, 2).whiten(z, classes)
    mapped = gaussianization.whiten(z, classes)

    def near_zero(codes):  # N(0, 1) puts 38 % within 0.5; the bimodal class 7 %
        return [float((codes[classes == c, 0].abs() < 0.5).float().mean()) for c in (0, 1)]

    assert near_zero(white)[1] < 0.15 < 0.3 < near_zero(white)[0]
    for share in near_zero(mapped):
        assert 0.34 < share < 0.42
    mapped_held_out = gaussianization.whiten(held_out, held_out_classes)
    # Past the fitted quantiles the map goes on at a moderate slope.
    assert mapped_held_out.abs().max() < 4 * 8
    torch.testing.assert_close(gaussianization.unwhiten(mapped_held_out, held_out_classes), held_out,
                               atol=1e-4, rtol=1e-5)
    # No rounds: the whitening alone.
    torch.testing.assert_close(ClassGaussianization.fit(z, classes, 2, rounds=0).whiten(z, classes),
                               white.double())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gaussianization_fits_and_maps_back_on_cuda():
    z, classes = codes_whose_class_is_in_their_shape(4000, seed=0)
    z, classes = z.cuda(), classes.cuda()
    gaussianization = ClassGaussianization.fit(z, classes, 2)
    mapped = gaussianization.whiten(z, classes)
    assert mapped.device.type == "cuda"
    torch.testing.assert_close(gaussianization.unwhiten(mapped, classes), z, atol=1e-4, rtol=1e-5)
    cpu = ClassGaussianization.fit(z.cpu(), classes.cpu(), 2).whiten(z.cpu(), classes.cpu())
    torch.testing.assert_close(mapped.cpu(), cpu, atol=1e-4, rtol=1e-4)


def test_a_class_too_rare_to_fit_its_quantiles_is_named():
    z, classes = codes_whose_class_is_in_their_shape(600, seed=0)
    classes[classes == 1] = 0
    classes[:100] = 1
    with pytest.raises(WhiteningError, match="class 1 is predicted for 100 of 600 images, too few "
                                             "to fit its quantiles \\(needs 256\\)"):
        ClassGaussianization.fit(z, classes, 2)


def test_a_class_too_rare_to_estimate_its_covariance_is_named():
    z, classes = codes_whose_class_is_in_mean_and_spread(n=40)
    classes[classes == 3] = 0
    classes[0:2] = 3
    with pytest.raises(WhiteningError, match="class 3 is predicted for 2 of 40 images"):
        ClassWhitening.fit(z, classes, 4)


def test_class_whitened_eval_reconstructs_as_before_without_the_adversary(tmp_path, capsys,
                                                                          monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    # The generation checker only has to exist here: a small one, not 20,000 images' worth.
    train_checker = daae.consistency.train_checker
    monkeypatch.setattr(daae.consistency, "train_checker",
                        lambda train, test, num_classes, device, epochs: train_checker(
                            train.subset(torch.arange(500)), test, num_classes, device, 1))
    # Enough training images that every class is predicted for the quantiles
    # the Gaussianization fits (ClassGaussianization.MIN_CODES).
    assert main(["train", "--config", str(SMOKE), f"run.dir={tmp_path}", "run.name=r",
                 "train.max_steps=40", "run.progress_bar=false", "eval.final_test=false",
                 "eval.probe_epochs=1", "data.synthetic_train_size=20000"]) == 0
    capsys.readouterr()
    reads = {}
    for flag in ("", "--class-whitened", "--class-gaussianized"):
        assert main(["eval", "--checkpoint", str(tmp_path / "r"), "--json", *filter(None, [flag]),
                     "eval.probe_epochs=1"]) == 0
        reads[flag] = json.loads(capsys.readouterr().out)
    raw = reads[""]
    assert "class_whitened" not in raw and "adversary_accuracy" in raw
    for flag, key in (("--class-whitened", "class_whitened"), ("--class-gaussianized", "class_gaussianized")):
        mapped = reads[flag]
        assert mapped[key] is True and "adversary_accuracy" not in mapped, flag
        # The decoder undoes the map: the same reconstructions and classes.
        assert mapped["recon_mse"] == pytest.approx(raw["recon_mse"], rel=1e-5), flag
        assert mapped["test_accuracy"] == raw["test_accuracy"], flag
        for metric in ("probe_accuracy", "linear_probe_accuracy", "generation_consistency"):
            assert 0.0 <= mapped[metric] <= 1.0, (flag, metric)
    # A style becomes a place within each class's spread of codes: other grids.
    grids = {}
    for flag in ("", "--class-whitened", "--class-gaussianized"):
        out = tmp_path / f"random{len(flag)}.png"
        assert main(["sample", "--checkpoint", str(tmp_path / "r"), "--kind", "random", "--n", "3",
                     "--out", str(out), *filter(None, [flag])]) == 0
        grids[flag] = out.read_bytes()
    assert len(set(grids.values())) == 3
    with pytest.raises(SystemExit) as refused:
        main(["eval", "--checkpoint", str(tmp_path / "r"), "--class-whitened", "--class-gaussianized"])
    assert refused.value.code == 2


def test_training_reports_class_whitened_probes_as_daae_eval_reads_them(tmp_path, capsys):
    # Every training image in the probes' fit, as `daae eval --class-whitened` fits its whitening.
    assert main(["train", "--config", str(SMOKE), f"run.dir={tmp_path}", "run.name=r",
                 "train.max_steps=60", "run.eval_every=30", "run.checkpoint_every=30",
                 "run.progress_bar=false", "eval.probe_epochs=1", "eval.probe_train_size=100000",
                 "eval.probes_during_training=true", "eval.class_whitened_probes=true"]) == 0
    capsys.readouterr()
    metrics = json.loads((tmp_path / "r" / "metrics.json").read_text())
    for split in ("validation", "test"):
        for key in ("class_whitened_probe_accuracy", "class_whitened_linear_probe_accuracy"):
            assert 0.0 <= metrics[split][key] <= 1.0, (split, key)
    from daae.curves import read_scalars
    scalars = next(iter(read_scalars(tmp_path / "r", ["decorrelation/val/class_whitened_probe_accuracy"])
                        .values()))
    assert [step for step, _ in scalars["decorrelation/val/class_whitened_probe_accuracy"]] == [30, 60]

    raw, white = (evaluate_run(tmp_path / "r", "test", generation=False, class_map=class_map)
                  for class_map in (None, "whitened"))
    assert raw["probe_accuracy"] == metrics["test"]["probe_accuracy"]
    assert raw["class_whitened_probe_accuracy"] == metrics["test"]["class_whitened_probe_accuracy"]
    # The same whitening and probes as the post-hoc route, up to float sums.
    for key in ("probe_accuracy", "linear_probe_accuracy"):
        assert raw[f"class_whitened_{key}"] == pytest.approx(white[key], abs=0.01), key
    assert not any(key.startswith("class_whitened_") for key in white)


def test_without_every_class_predicted_the_whitened_probes_are_left_out_and_named(tmp_path):
    config = tiny_config(tmp_path, "eval.probe_epochs=1", "eval.class_whitened_probes=true")
    data = load_data(config.data, config.seed)
    nets = build_networks(config, data.image_shape, data.num_classes)
    with torch.no_grad():
        nets.encoder.y_head.bias[7] = 1e3  # q(y|x) answers 7 for every image
    probes = fit_probes(nets, data.train_images(), config.eval, data.num_classes, "cpu", config.seed)
    assert "class 0 is predicted for 0 of" in probes.map_errors["whitened"]
    metrics = evaluate(nets, data.validation, data.labelled, config.eval, data.num_classes, "cpu", probes)
    assert "probe_accuracy" in metrics and "class_whitened_probe_accuracy" not in metrics


def test_too_few_codes_to_whiten_leave_training_without_the_pair_and_stop_daae_eval(tmp_path, caplog,
                                                                                    monkeypatch):
    # Five probe codes cannot give ten classes a covariance each.
    assert main(["train", "--config", str(SMOKE), f"run.dir={tmp_path}", "run.name=r",
                 "train.max_steps=20", "run.progress_bar=false", "eval.final_test=false",
                 "eval.probe_epochs=1", "eval.probe_train_size=5", "eval.class_whitened_probes=true"]) == 0
    metrics = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert "probe_accuracy" in metrics["validation"]
    assert "class_whitened_probe_accuracy" not in metrics["validation"]
    assert "of 5 images, too few" in metrics["class_whitened_error"]
    assert "no class-whitened probes (eval.class_whitened_probes)" in caplog.text
    # daae eval stops before the probe fits, which on MNIST take minutes.
    fitted = []
    monkeypatch.setattr(daae.evaluate, "fit_probes_on_codes", lambda *a, **k: fitted.append(1))
    assert main(["eval", "--checkpoint", str(tmp_path / "r"), "--json"]) == 2
    assert "or set eval.class_whitened_probes=false" in caplog.text
    assert not fitted


def test_training_reports_class_gaussianized_probes_as_daae_eval_reads_them(tmp_path, capsys):
    # Enough images for 256 codes of every predicted class, all in the probes' fit.
    assert main(["train", "--config", str(SMOKE), f"run.dir={tmp_path}", "run.name=r",
                 "train.max_steps=40", "run.progress_bar=false", "eval.probe_epochs=1",
                 "data.synthetic_train_size=20000", "eval.probe_train_size=100000",
                 "eval.class_whitened_probes=true", "eval.class_gaussianized_probes=true"]) == 0
    metrics = json.loads((tmp_path / "r" / "metrics.json").read_text())
    for split in ("validation", "test"):
        for key in ("class_whitened_probe_accuracy", "class_gaussianized_probe_accuracy",
                    "class_gaussianized_linear_probe_accuracy"):
            assert 0.0 <= metrics[split][key] <= 1.0, (split, key)
    gaussianized = evaluate_run(tmp_path / "r", "test", generation=False, class_map="gaussianized")
    # The same map and probes as the post-hoc route, up to float sums.
    for key in ("probe_accuracy", "linear_probe_accuracy"):
        assert metrics["test"][f"class_gaussianized_{key}"] == pytest.approx(gaussianized[key], abs=0.01), key
    assert not any(key.startswith("class_") and key.endswith("_accuracy") for key in gaussianized)
    capsys.readouterr()
    assert main(["summary", str(tmp_path / "r")]) == 0
    header = capsys.readouterr().out.splitlines()[0]
    assert "| class-Gaussianized probe % |" in header and "| class-whitened probe % |" in header


def test_too_few_codes_to_gaussianize_leave_the_pair_out_and_stop_a_strict_fit(tmp_path):
    config = tiny_config(tmp_path, "eval.probe_epochs=1", "eval.probe_train_size=500",
                         "eval.class_gaussianized_probes=true")
    data = load_data(config.data, config.seed)
    nets = build_networks(config, data.image_shape, data.num_classes)
    probes = fit_probes(nets, data.train_images(), config.eval, data.num_classes, "cpu", config.seed)
    assert "too few to fit its quantiles (needs 256)" in probes.map_errors["gaussianized"]
    assert "--class-whitened" not in probes.map_errors["gaussianized"]  # a daae eval flag: not here
    metrics = evaluate(nets, data.validation, data.labelled, config.eval, data.num_classes, "cpu", probes)
    assert "probe_accuracy" in metrics and not any(key.startswith("class_") for key in metrics)
    with pytest.raises(WhiteningError, match="eval.class_gaussianized_probes: class .* or set "
                                             "eval.class_gaussianized_probes=false"):
        fit_probes(nets, data.train_images(), config.eval, data.num_classes, "cpu", config.seed,
                   strict=True)
    # `daae eval --class-gaussianized` and `daae sample --class-gaussianized` name the other map.
    with pytest.raises(WhiteningError, match="too few to fit its quantiles .* or use --class-whitened"):
        whiten_networks(nets, data.train_images().subset(torch.arange(500)), 500, "cpu", "gaussianized")


def test_every_class_map_has_its_flag_and_names_a_fallback_that_exists():
    # whiten_networks' hint names the fallback as --class-<key>: that flag must parse to it.
    parser = build_parser()
    for key, map_class in CLASS_MAPS.items():
        for command in (["eval", "--checkpoint", "RUN"],
                        ["sample", "--checkpoint", "RUN", "--kind", "style", "--out", "x.png"]):
            assert parser.parse_args(command + [f"--class-{key}"]).class_map == key
        assert map_class.FALLBACK is None or map_class.FALLBACK in CLASS_MAPS
