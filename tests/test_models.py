"""The conv model's speed levers change how it computes, never what; C's
standardised input reads codes as the probes do; the encoder's class
whitening gives every predicted class the same first two moments."""
import copy

import pytest
import torch
from torch import nn

import daae.models
from daae import phases
from daae.data import load_data
from daae.models import CentreTapConv2d, CentreTapConvTranspose2d, Networks, RunningClassWhitening
from daae.prepare import make_accelerator, prepare_training

from conftest import first_gradients_and_losses, gradients, tiny_config


def _with_plain_convolutions(nets: Networks) -> Networks:
    """A copy whose centre-tap layers are the plain convolutions they stand for."""
    plain = copy.deepcopy(nets)
    for module in plain.modules():
        if isinstance(module, CentreTapConvTranspose2d):
            module.__class__ = nn.ConvTranspose2d
        elif isinstance(module, CentreTapConv2d):
            module.__class__ = nn.Conv2d
    return plain


@pytest.mark.parametrize("image_shape", [(1, 28, 28), (3, 32, 32)])
def test_centre_tap_layers_compute_what_the_plain_convolutions_do(image_shape):
    torch.manual_seed(0)
    nets = Networks("conv", image_shape, 10, 4, 0.5, 16).double()
    kinds = {type(m) for m in nets.modules()}
    assert {CentreTapConv2d, CentreTapConvTranspose2d} <= kinds  # the 1x1 maps use them
    plain = _with_plain_convolutions(nets)
    assert not {CentreTapConv2d, CentreTapConvTranspose2d} & {type(m) for m in plain.modules()}

    x = torch.rand(6, *image_shape, dtype=torch.float64)
    results = []
    for model in (nets, plain):
        logits, z = model.encoder(x)
        x_hat = model.decoder(torch.softmax(logits, 1), z)
        (x_hat.square().mean() + logits.square().mean() + z.square().mean()).backward()
        results.append((x_hat, {name: p.grad for name, p in model.named_parameters()}))
    torch.testing.assert_close(results[0][0], results[1][0])
    for name, grad in results[1][1].items():
        torch.testing.assert_close(results[0][1][name], grad, msg=lambda m: f"{name}: {m}")
    # The taps that read padding get exactly the zero gradient the plain layer gives them.
    for name, module in nets.named_modules():
        if isinstance(module, (CentreTapConv2d, CentreTapConvTranspose2d)):
            off_centre = module.weight.grad.clone()
            off_centre[:, :, 1, 1] = 0
            assert torch.count_nonzero(off_centre) == 0, name


def test_conv_state_dicts_load_into_plain_and_centre_tap_models_alike(monkeypatch):
    # A model built with the plain layers throughout, as checkpoints from
    # before the centre taps were: each model loads the other's state, strictly.
    torch.manual_seed(0)
    with monkeypatch.context() as patch:
        patch.setattr(daae.models, "CentreTapConv2d", nn.Conv2d)
        patch.setattr(daae.models, "CentreTapConvTranspose2d", nn.ConvTranspose2d)
        plain = Networks("conv", (1, 28, 28), 10, 4, 0.5, 16)
    assert not any(isinstance(m, (CentreTapConv2d, CentreTapConvTranspose2d)) for m in plain.modules())
    centre_tap = Networks("conv", (1, 28, 28), 10, 4, 0.5, 16)
    assert any(isinstance(m, CentreTapConv2d) for m in centre_tap.modules())
    for source, target in ((plain, centre_tap), (centre_tap, Networks("conv", (1, 28, 28), 10, 4, 0.5, 16))):
        target.load_state_dict(source.state_dict())
        for name, tensor in source.state_dict().items():
            assert torch.equal(target.state_dict()[name], tensor), name


def test_a_standardising_c_reads_codes_alike_at_any_scale_and_offset():
    """With random shifts the unaltered images' codes fill a small region off
    the origin; a C standardising its input reads them as it would at the
    prior's scale, and the encoder cannot hide the class by shrinking z."""
    torch.manual_seed(0)
    spread, offset = torch.tensor([0.3, 0.05, 0.1]), torch.tensor([-0.6, 1.3, 1.1])
    z = torch.randn(64, 3) * spread + offset
    standardising = Networks("mlp", (1, 28, 28), 10, 3, 0.05, 16, correlation_standardised=True)
    plain = Networks("mlp", (1, 28, 28), 10, 3, 0.05, 16)
    # (up to batch norm's epsilon against the smallest variance, 0.05 ** 2)
    torch.testing.assert_close(standardising.correlation(z), standardising.correlation(10 * z - 5),
                               rtol=0, atol=5e-3)
    assert not torch.allclose(plain.correlation(z), plain.correlation(10 * z - 5), rtol=0, atol=0.1)
    # Evaluation: the training codes' running statistics, so a code reads the
    # same alone as in any batch, and as training read a batch like it.
    with torch.no_grad():
        for _ in range(200):
            standardising.correlation(torch.randn(256, 3) * spread + offset)
        batch = torch.randn(4096, 3) * spread + offset
        training_read = standardising.correlation(batch)
        standardising.eval()
        evaluation_read = standardising.correlation(batch)
    torch.testing.assert_close(standardising.correlation(batch[:1]), evaluation_read[:1])
    torch.testing.assert_close(evaluation_read, training_read, rtol=0.05, atol=0.02)
    # Without the option nothing is added, so runs from before it still load.
    assert not any("input_norm" in name for name in plain.state_dict())


def _first_reference_phase_gradients(config, data):
    setup = prepare_training(config, make_accelerator("no"), data)
    x = setup.batches.unlabelled_batch(1, 0)
    phases.reconstruction_phase(setup.ctx, setup.optimizers["reconstruction"], x, 1.0)
    return gradients(setup.nets)


@pytest.mark.parametrize("step_mode", ["fused", "reference"])
def test_channels_last_layout_trains_like_the_default_one(tmp_path, step_mode):
    conv = ["model.kind=conv", "model.scale=0.25", f"train.step_mode={step_mode}"]
    nchw_config = tiny_config(tmp_path, *conv, "train.channels_last=false")
    nhwc_config = tiny_config(tmp_path, *conv, "train.channels_last=true")
    data = load_data(nchw_config.data, nchw_config.seed)

    nchw_grads, nchw_losses, nchw = first_gradients_and_losses(nchw_config, data, 3)
    nhwc_grads, nhwc_losses, nhwc = first_gradients_and_losses(nhwc_config, data, 3)

    first_conv = nhwc.nets.encoder.trunk.convs[0].weight
    assert first_conv.is_contiguous(memory_format=torch.channels_last) and first_conv.stride()[1] == 1
    assert nchw.nets.encoder.trunk.convs[3].weight.is_contiguous()
    if step_mode == "reference":
        # Each reference phase steps Adam before the next computes its gradients,
        # and Adam's first step moves a weight by about lr whatever its gradient's
        # size: rounding-sized gradients (biases before batch norm) become
        # lr-sized weight differences, amplified by the later phases (seen with
        # one thread). So compare the first phase, which starts from equal weights.
        nchw_grads, nhwc_grads = (_first_reference_phase_gradients(config, data)
                                  for config in (nchw_config, nhwc_config))
    assert nhwc_grads.keys() == nchw_grads.keys() and len(nchw_grads) > 0
    for name, expected in nchw_grads.items():
        # Another summation order: float rounding, nothing more (judged against
        # the tensor's largest entry: a weight gradient sums thousands of terms).
        torch.testing.assert_close(nhwc_grads[name], expected, rtol=1e-3,
                                   atol=1e-5 + 2e-3 * float(expected.abs().max()),
                                   msg=lambda message: f"{name}: {message}")
    # The same drift moves the reference order's later losses by up to a few
    # tenths of a percent (0.18 % for the supervised loss at step 3, one thread).
    tolerance = 1e-2 if step_mode == "reference" else 1e-3
    for nchw_step, nhwc_step in zip(nchw_losses, nhwc_losses):
        for name in nchw_step:
            assert nhwc_step[name] == pytest.approx(nchw_step[name], rel=tolerance), name


def test_class_whitening_gives_each_predicted_class_zero_mean_and_unit_covariance():
    generator = torch.Generator().manual_seed(0)
    classes = torch.arange(3).repeat_interleave(400)
    mixing = torch.randn(3, 2, 2, generator=generator)
    z = (torch.einsum("kij,bj->bi", mixing[classes], torch.randn(1200, 2, generator=generator))
         + 5 * torch.randn(3, 2, generator=generator)[classes]).requires_grad_()
    logits = torch.nn.functional.one_hot(classes, 3).float()
    whitening = RunningClassWhitening(3, 2, momentum=1.0)  # one batch sets the statistics
    whitening.running_mean.fill_(0.3)
    whitening.running_cov.mul_(2.0)

    # The forward leaves the statistics; track reads its outputs, unwhitens them
    # by the statistics that whitened them, and moves the statistics to theirs.
    state = copy.deepcopy(whitening.state_dict())
    before = whitening(z, logits)
    for name, value in whitening.state_dict().items():
        assert torch.equal(value, state[name]), name
    whitening.track(before, logits)
    whitened = whitening(z, logits)
    for c in range(3):
        rows = whitened[classes == c].detach()
        torch.testing.assert_close(rows.mean(0), torch.zeros(2), atol=1e-4, rtol=0)
        torch.testing.assert_close(torch.cov(rows.T), torch.eye(2), atol=1e-3, rtol=0)
    # Gradients reach z through the class's fixed linear map, not the statistics.
    (grad,) = torch.autograd.grad(whitened[0].sum(), z)
    torch.testing.assert_close(grad[0], torch.linalg.inv(whitening.factors()[0]).sum(0))
    assert grad[1:].abs().sum() == 0


def test_class_whitening_tracks_a_moving_average_and_keeps_a_class_it_sees_too_rarely():
    generator = torch.Generator().manual_seed(1)
    whitening = RunningClassWhitening(4, 2, momentum=0.25)
    whitening.running_mean.copy_(torch.randn(4, 2, generator=generator))
    spread = torch.randn(4, 2, 2, generator=generator)
    whitening.running_cov.copy_(spread @ spread.transpose(1, 2) + torch.eye(2))
    before = copy.deepcopy(whitening)
    classes = torch.tensor([0, 0, 0, 0, 0, 1, 1, 1, 2])  # class 2 once, class 3 never
    z = torch.randn(9, 2, generator=generator) + 3
    logits = torch.nn.functional.one_hot(classes, 4).float()

    whitening.track(whitening(z, logits), logits)

    for c in (0, 1):
        rows = z[classes == c]
        torch.testing.assert_close(whitening.running_mean[c],
                                   0.75 * before.running_mean[c] + 0.25 * rows.mean(0))
        torch.testing.assert_close(whitening.running_cov[c],
                                   0.75 * before.running_cov[c] + 0.25 * torch.cov(rows.T))
    for c in (2, 3):
        assert torch.equal(whitening.running_mean[c], before.running_mean[c])
        assert torch.equal(whitening.running_cov[c], before.running_cov[c])


def test_class_whitening_under_bf16_autocast_keeps_narrow_classes_centred():
    # A mean rounded to bf16 would be an offset of a few hundredths of an SD
    # for a class of SD 0.02, magnified by its inverse factor.
    generator = torch.Generator().manual_seed(3)
    classes = torch.arange(2).repeat_interleave(500)
    z = (0.02 * torch.randn(1000, 2, generator=generator)
         + torch.tensor([[0.7, -0.4], [0.3, 0.9]])[classes]).bfloat16().float()
    logits = torch.nn.functional.one_hot(classes, 2).float()
    whitening = RunningClassWhitening(2, 2, momentum=1.0)
    whitening.track(whitening(z, logits), logits)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        whitened = whitening(z.bfloat16(), logits.bfloat16())
    for c in range(2):
        assert whitened[classes == c].float().mean(0).abs().max() < 0.01
