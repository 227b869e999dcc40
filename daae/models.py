"""The networks of DESIGN.md section 1. No training code lives here."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .dependence import class_rows

CONV_CHANNELS = (16, 16, 32, 32, 64, 64, 128)
DENSE_UNITS = 1000


def _dense(n_in: int, n_out: int) -> list[nn.Module]:
    """A hidden layer: batch norm makes the bias redundant."""
    return [nn.Linear(n_in, n_out, bias=False), nn.BatchNorm1d(n_out), nn.ReLU(inplace=True)]


def _conv_sizes(size: int, count: int) -> list[int]:
    """Spatial sizes after each stride-2, padding-1, 3x3 convolution."""
    sizes = [size]
    for _ in range(count):
        sizes.append((sizes[-1] - 1) // 2 + 1)
    return sizes


def whiten_within_class(z: torch.Tensor, means: torch.Tensor, factors: torch.Tensor,
                        classes: torch.Tensor) -> torch.Tensor:
    """``L_c^-1 (z - mean_c)`` row by row, ``c`` each row's class and ``L_c`` its
    lower Cholesky factor; ``unwhiten_within_class`` is the inverse."""
    centred = (z - means[classes]).unsqueeze(-1)
    return torch.linalg.solve_triangular(factors[classes], centred, upper=False).squeeze(-1)


def unwhiten_within_class(z: torch.Tensor, means: torch.Tensor, factors: torch.Tensor,
                          classes: torch.Tensor) -> torch.Tensor:
    return (factors[classes] @ z.unsqueeze(-1)).squeeze(-1) + means[classes]


class RunningClassWhitening(nn.Module):
    """z re-expressed within its predicted class, as a layer: class ``c``'s codes
    map to ``L_c^-1 (z - mean_c)``, with ``L_c`` the Cholesky factor of the
    class's covariance, both running averages (buffers: gradients pass through
    z only). Every reader of z (C, D_z, the decoder, the probes) sees the map's
    output; the codes its statistics follow leave it with matched first two
    moments per class (up to ``eps``, which floors each variance: at an SD of
    0.01 the whitened SD is 0.95), other codes only as far as they resemble
    those.

    The forward never moves the statistics: the training step hands
    ``track`` the codes they should describe, C's rows encoded as evaluation
    encodes them, as the probes read z. Statistics of every row of the
    training forward (shifted, labelled, perturbed) left a class-wise offset in
    the unaltered images' codes, and those of the training forward's codes of
    the unaltered images (batch statistics) one in their evaluation codes,
    each amplified by the whitening and read by the probes (docs/results.md,
    *Whitened in training*)."""

    def __init__(self, num_classes: int, z_dim: int, momentum: float = 0.01, eps: float = 1e-5):
        super().__init__()
        # A slow average: a batch holds about a tenth of its rows per class.
        self.momentum, self.eps = momentum, eps
        self.register_buffer("running_mean", torch.zeros(num_classes, z_dim))
        self.register_buffer("running_cov", torch.eye(z_dim).repeat(num_classes, 1, 1))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    def factors(self) -> torch.Tensor:
        eye = torch.eye(self.running_cov.shape[1], device=self.running_cov.device)
        # cholesky_ex: no host sync for its error check (a running average of
        # covariances plus eps is positive definite).
        return torch.linalg.cholesky_ex(self.running_cov + self.eps * eye).L

    def forward(self, z: torch.Tensor, logits_y: torch.Tensor) -> torch.Tensor:
        classes = logits_y.detach().argmax(1)
        # fp32 under autocast: a mean rounded to bf16 is a class-wise offset
        # that the inverse factor, large for a narrow class, magnifies.
        with torch.autocast(z.device.type, enabled=False):
            whitened = whiten_within_class(z.float(), self.running_mean, self.factors(), classes)
        return whitened.to(z.dtype)

    @torch.no_grad()
    def track(self, whitened: torch.Tensor, logits_y: torch.Tensor) -> None:
        """Move the statistics toward those of a batch of this layer's outputs
        (unwhitened first, by the statistics that whitened them). No
        data-dependent branch or host sync, so compiled and CUDA-graphed steps
        can hold it; fp32 under autocast. A class with under two rows keeps
        its statistics."""
        classes = logits_y.detach().argmax(1)
        with torch.autocast(whitened.device.type, enabled=False):
            z = unwhiten_within_class(whitened.detach().float(), self.running_mean, self.factors(),
                                      classes)
            rows = class_rows(classes, self.running_mean.shape[0])
            counts = rows.sum(0)
            means = (rows.T @ z) / counts.clamp(min=1)[:, None]
            centred = z - means[classes]
            scatter = torch.einsum("bk,bi,bj->kij", rows, centred, centred)
            covs = scatter / (counts - 1).clamp(min=1)[:, None, None]
            rate = self.momentum * (counts >= 2).float()
            self.running_mean.add_(rate[:, None] * (means - self.running_mean))
            self.running_cov.add_(rate[:, None, None] * (covs - self.running_cov))
            self.num_batches_tracked.add_(1)


class Encoder(nn.Module):
    """x -> (logits of q(y|x), z). ``trunk`` is shared; the two heads are separate
    so that phases can update trunk + one head. ``class_whitening`` puts a
    RunningClassWhitening after the z head."""

    def __init__(self, trunk: nn.Module, features: int, num_classes: int, z_dim: int,
                 class_whitening: bool = False):
        super().__init__()
        self.trunk = trunk
        self.y_head = nn.Linear(features, num_classes)
        # Batch norm on z keeps its scale near the N(0, I) prior from the start.
        self.z_head = nn.Sequential(nn.Linear(features, z_dim, bias=False), nn.BatchNorm1d(z_dim))
        # None, not Identity: its forward takes the class as well.
        self.z_whitening = RunningClassWhitening(num_classes, z_dim) if class_whitening else None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.trunk(x)
        logits_y, z = self.y_head(h), self.z_head(h)
        if self.z_whitening is not None:
            z = self.z_whitening(z, logits_y)
        return logits_y, z

    def y_branch_parameters(self):
        return [*self.trunk.parameters(), *self.y_head.parameters()]

    def z_branch_parameters(self):
        return [*self.trunk.parameters(), *self.z_head.parameters()]


class Decoder(nn.Module):
    """[q(y|x), z] -> x_hat in [0, 1]."""

    def __init__(self, body: nn.Module):
        super().__init__()
        self.body = body

    def forward(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.body(torch.cat([y, z], dim=1)))


class MLPEncoderTrunk(nn.Module):
    def __init__(self, image_shape: tuple[int, int, int], hidden: int):
        super().__init__()
        pixels = image_shape[0] * image_shape[1] * image_shape[2]
        self.net = nn.Sequential(*_dense(pixels, hidden), *_dense(hidden, hidden))

    def forward(self, x):
        return self.net(x.flatten(1))


class MLPDecoderBody(nn.Module):
    def __init__(self, code: int, hidden: int, image_shape: tuple[int, int, int]):
        super().__init__()
        self.image_shape = image_shape
        pixels = image_shape[0] * image_shape[1] * image_shape[2]
        self.net = nn.Sequential(*_dense(code, hidden), *_dense(hidden, hidden),
                                 nn.Linear(hidden, pixels))

    def forward(self, code):
        return self.net(code).view(-1, *self.image_shape)


class CentreTapConv2d(nn.Conv2d):
    """A stride-2, padding-1, 3x3 convolution of a 1x1 map: every tap but the
    centre reads padding, so it is a matrix multiply by the centre tap. The
    full convolution computes (and differentiates) nine taps to use one; the
    weight keeps its 3x3 shape, so state dicts and the other taps' zero
    gradients are those of the plain layer."""

    def forward(self, x):
        return F.linear(x.flatten(1), self.weight[:, :, 1, 1], self.bias)[:, :, None, None]


class CentreTapConvTranspose2d(nn.ConvTranspose2d):
    """The transposed twin of CentreTapConv2d: 1x1 in, 1x1 out (no output padding)."""

    def forward(self, x, output_size=None):
        return F.linear(x.flatten(1), self.weight[:, :, 1, 1].t(), self.bias)[:, :, None, None]


def _conv_block(n_in: int, n_out: int, size_in: int, transposed: bool = False,
                output_padding: int = 0):
    """A stride-2 3x3 (transposed) convolution, batch norm and ReLU; ``size_in``
    is the side of the input map, so layers on a 1x1 map use the centre tap."""
    pointwise = size_in == 1 and output_padding == 0
    if transposed:
        kind = CentreTapConvTranspose2d if pointwise else nn.ConvTranspose2d
        conv = kind(n_in, n_out, 3, 2, 1, output_padding=output_padding, bias=False)
    else:
        conv = (CentreTapConv2d if pointwise else nn.Conv2d)(n_in, n_out, 3, 2, 1, bias=False)
    return [conv, nn.BatchNorm2d(n_out), nn.ReLU(inplace=True)]


class ConvEncoderTrunk(nn.Module):
    def __init__(self, image_shape: tuple[int, int, int], scale: float):
        super().__init__()
        channels = [image_shape[0]] + [max(1, round(c * scale)) for c in CONV_CHANNELS]
        sizes = _conv_sizes(image_shape[1], len(CONV_CHANNELS))
        layers = []
        for n_in, n_out, size_in in zip(channels[:-1], channels[1:], sizes):
            layers += _conv_block(n_in, n_out, size_in)
        final = sizes[-1]
        self.convs = nn.Sequential(*layers)
        self.dense = nn.Sequential(*_dense(channels[-1] * final * final, DENSE_UNITS))

    def forward(self, x):
        return self.dense(self.convs(x).flatten(1))


class ConvDecoderBody(nn.Module):
    """Mirror of the conv encoder; output paddings restore the encoder's sizes exactly."""

    def __init__(self, code: int, image_shape: tuple[int, int, int], scale: float):
        super().__init__()
        channels = [image_shape[0]] + [max(1, round(c * scale)) for c in CONV_CHANNELS]
        sizes = _conv_sizes(image_shape[1], len(CONV_CHANNELS))
        self.start = (channels[-1], sizes[-1], sizes[-1])
        self.dense = nn.Sequential(*_dense(code, DENSE_UNITS),
                                   *_dense(DENSE_UNITS, channels[-1] * sizes[-1] ** 2))
        layers = []
        for i in range(len(CONV_CHANNELS), 0, -1):
            output_padding = sizes[i - 1] - (2 * sizes[i] - 1)
            if i > 1:
                layers += _conv_block(channels[i], channels[i - 1], sizes[i], True, output_padding)
            else:  # the image layer: no norm, no activation (the decoder applies sigmoid)
                layers.append(nn.ConvTranspose2d(channels[1], channels[0], 3, 2, 1,
                                                 output_padding=output_padding))
        self.deconvs = nn.Sequential(*layers)

    def forward(self, code):
        return self.deconvs(self.dense(code).view(-1, *self.start))


def build_autoencoder(kind: str, image_shape: tuple[int, int, int], num_classes: int,
                      z_dim: int, scale: float,
                      class_whitening: bool = False) -> tuple[Encoder, Decoder]:
    if kind == "mlp":
        hidden = max(1, round(1000 * scale))
        trunk, features = MLPEncoderTrunk(image_shape, hidden), hidden
        body = MLPDecoderBody(num_classes + z_dim, hidden, image_shape)
    elif kind == "conv":
        if image_shape[1] != image_shape[2] or image_shape[1] not in (28, 32):
            raise ValueError(f"the conv model takes 28x28 or 32x32 images, got {image_shape}")
        trunk, features = ConvEncoderTrunk(image_shape, scale), DENSE_UNITS
        body = ConvDecoderBody(num_classes + z_dim, image_shape, scale)
    else:
        raise ValueError(f"model kind must be 'mlp' or 'conv', got {kind!r}")
    return Encoder(trunk, features, num_classes, z_dim, class_whitening), Decoder(body)


class Critic(nn.Module):
    """An MLP with two hidden layers: D_z and D_y (one logit) and the correlation
    classifier C (K logits) are all of this shape. No batch norm: the
    discriminators see real and fake batches separately, and batch statistics
    would let them tell the two apart by the batch rather than the sample.

    ``standardise_input`` (C only, which sees one batch): each input feature
    moved to zero mean and unit variance by batch statistics (running ones in
    eval mode), as the post-hoc probes standardise the codes they read. The
    decorrelation's gradient then passes through the statistics, so the
    encoder cannot hide the class by shrinking z."""

    def __init__(self, in_features: int, out_features: int, hidden: int, standardise_input: bool = False):
        super().__init__()
        # Identity holds no state: a Critic without it loads the state dicts
        # of runs from before the option.
        self.input_norm = (nn.BatchNorm1d(in_features, affine=False) if standardise_input
                           else nn.Identity())
        self.net = nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(inplace=True),
                                 nn.Linear(hidden, hidden), nn.ReLU(inplace=True),
                                 nn.Linear(hidden, out_features))

    def forward(self, x):
        return self.net(self.input_norm(x))


class CriticEnsemble(nn.Module):
    """Critics of one shape, each its own initialisation, on the same input:
    their outputs stacked, ``(members, batch, out_features)``."""

    def __init__(self, members: int, in_features: int, out_features: int, hidden: int,
                 standardise_input: bool = False):
        super().__init__()
        self.members = nn.ModuleList(Critic(in_features, out_features, hidden, standardise_input)
                                     for _ in range(members))

    def forward(self, x):
        return torch.stack([member(x) for member in self.members])


class Networks(nn.Module):
    """All five networks under one module, for state dicts and parameter counts.
    ``correlation_classifiers`` above 1 makes C a CriticEnsemble; one C stays a
    plain Critic, so the state dicts of runs from before ensembles still load.
    ``class_conditional_prior`` widens D_z's input by one column per class;
    ``class_whitening`` ends the encoder with a RunningClassWhitening."""

    def __init__(self, kind: str, image_shape: tuple[int, int, int], num_classes: int,
                 z_dim: int, scale: float, adversary_hidden: int, correlation_classifiers: int = 1,
                 correlation_standardised: bool = False, class_conditional_prior: bool = False,
                 class_whitening: bool = False):
        super().__init__()
        self.encoder, self.decoder = build_autoencoder(kind, image_shape, num_classes, z_dim, scale,
                                                       class_whitening)
        self.d_z = Critic(z_dim + (num_classes if class_conditional_prior else 0), 1, adversary_hidden)
        self.d_y = Critic(num_classes, 1, adversary_hidden)
        self.correlation = (Critic(z_dim, num_classes, adversary_hidden, correlation_standardised)
                            if correlation_classifiers == 1
                            else CriticEnsemble(correlation_classifiers, z_dim, num_classes,
                                                adversary_hidden, correlation_standardised))
