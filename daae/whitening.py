"""z re-expressed within its predicted class: post-hoc class-conditional whitening
and, beyond it, class-conditional Gaussianization.

What the probes still read of the class in a trained run's z can lie mostly in
each class's mean and covariance of the codes (P100 at 150 epochs; not at 40:
docs/results.md, *Whitened within the predicted class*). Subtracting the
predicted class's mean and applying the inverse of its covariance's Cholesky
factor gives every class the same first two moments; the decoder is given the
class, so it undoes the map exactly and reconstructions do not change. Nothing
is trained: the statistics come from the codes of the training images, and the
adversary C, trained on the raw codes, does not apply to these.

Where a class's codes differ in more than those two moments (the shipped P100
at 150 epochs: docs/results.md, *Gaussianized within the predicted class*),
``ClassGaussianization`` goes on from the whitened codes with rounds of
iterative Gaussianization (Chen & Gopinath, 2000), each a fixed rotation and then
every dimension through its class's quantiles to the normal quantiles: each
class's codes then come near N(0, I), and the map stays invertible (monotone
piecewise linear maps, extended past the outermost quantiles), as in
the conditional invertible networks of Esser et al. (2020), fitted rather
than trained.
"""
from __future__ import annotations

import torch
from torch import nn

from .config import ConfigError
from .data import ImageSet
from .models import Networks, unwhiten_within_class, whiten_within_class


class WhiteningError(ConfigError):
    """The codes cannot be whitened (a class too rare, or flat); ``daae`` exits 2 with it."""


class ClassWhitening(nn.Module):
    """Per-class mean and Cholesky factor of the codes; class ``c``'s codes map
    to ``L_c^-1 (z - mean_c)`` and back."""

    # The map ``whiten_networks`` suggests when this one cannot be fitted: none
    # needs fewer codes than this.
    FALLBACK: str | None = None

    def __init__(self, mean: torch.Tensor, cholesky: torch.Tensor):
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("cholesky", cholesky)

    @classmethod
    def fit(cls, z: torch.Tensor, classes: torch.Tensor, num_classes: int) -> "ClassWhitening":
        z = z.double()
        z_dim = z.shape[1]
        means, factors = [], []
        for c in range(num_classes):
            codes = z[classes == c]
            if len(codes) <= z_dim:
                raise WhiteningError(
                    f"class {c} is predicted for {len(codes)} of {len(z)} images, too few to estimate "
                    f"a {z_dim}-dimensional covariance (needs more than {z_dim}): whiten a run whose "
                    f"y head predicts every class, on more images")
            means.append(codes.mean(0))
            factor, info = torch.linalg.cholesky_ex(torch.cov(codes.T).reshape(z_dim, z_dim))
            if info:
                raise WhiteningError(f"the codes predicted as class {c} have a singular covariance "
                                     f"(they span fewer than {z_dim} dimensions), so they cannot be "
                                     f"whitened")
            factors.append(factor)
        return cls(torch.stack(means).float(), torch.stack(factors).float())

    # Each row takes its class's z_dim x z_dim factor: rows in chunks keep
    # that copy small for 50,000 codes of a wide z.
    CHUNK = 10_000

    def whiten(self, z: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        return torch.cat([whiten_within_class(rows.float(), self.mean, self.cholesky, chunk)
                          for rows, chunk in zip(z.split(self.CHUNK), classes.split(self.CHUNK))])

    def unwhiten(self, z: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        return torch.cat([unwhiten_within_class(rows.float(), self.mean, self.cholesky, chunk)
                          for rows, chunk in zip(z.split(self.CHUNK), classes.split(self.CHUNK))])


def _piecewise_linear(x: torch.Tensor, knots_x: torch.Tensor, knots_y: torch.Tensor) -> torch.Tensor:
    """The monotone map through the increasing ``knots_x`` -> ``knots_y``, so that
    swapping the knots inverts it. Past the outermost knots it goes on with the
    slope of the whole span: the end segments' own slopes, set by two codes of
    a sparse tail, can be steep enough that codes beyond them, compounded over
    the rounds, grow without bound."""
    upper = torch.searchsorted(knots_x, x.contiguous()).clamp(1, len(knots_x) - 1)
    x0, x1, y0, y1 = knots_x[upper - 1], knots_x[upper], knots_y[upper - 1], knots_y[upper]
    inside = y0 + (y1 - y0) / (x1 - x0) * (x - x0)
    span_slope = (knots_y[-1] - knots_y[0]) / (knots_x[-1] - knots_x[0])
    below = knots_y[0] + span_slope * (x - knots_x[0])
    above = knots_y[-1] + span_slope * (x - knots_x[-1])
    return torch.where(x < knots_x[0], below, torch.where(x > knots_x[-1], above, inside))


def _map_marginals(codes: torch.Tensor, rows_by_class: list[tuple[int, torch.Tensor]],
                   knots_x: torch.Tensor, knots_y: torch.Tensor, inverse: bool) -> torch.Tensor:
    """Each dimension of each class's rows through its knots (``knots_x``: classes
    x z_dim x knots) to the normal quantiles ``knots_y``, or back."""
    out = codes.clone()
    for c, rows in rows_by_class:
        for d in range(codes.shape[1]):
            source, target = (knots_y, knots_x[c, d]) if inverse else (knots_x[c, d], knots_y)
            out[rows, d] = _piecewise_linear(codes[rows, d], source, target)
    return out


class ClassGaussianization(nn.Module):
    """``ClassWhitening`` followed by ``rounds`` of (rotation, per-class marginal
    Gaussianization) fitted on training codes; ``whiten`` maps codes to the
    class-free ones and ``unwhiten`` back (to float rounding)."""

    # Quantiles per class, round and dimension: enough to follow a class's
    # shape from its ~5,000 MNIST training codes, few enough to smooth it.
    KNOTS = 256
    # Rounds after the whitening. On the shipped P100 at 150 epochs (z_dim 3),
    # fitted on half the training codes and probed on the other half, the
    # validation MLP probe's mean over 3 seeds fell from 12.3 % at 4 rounds to
    # 11.3 % at 16 (the floor 11.7 %); 8 to 32 read alike within the probe's
    # noise of about a point (docs/results.md, *Gaussianized within the
    # predicted class*).
    ROUNDS = 16
    # Fewer codes than quantiles give a map that sends the class's other codes
    # far from N(0, I) (held-out SD 1.4-2.4 from 50 codes, 1.05 from 500).
    MIN_CODES = KNOTS
    # Needs only more codes than z_dim in each class.
    FALLBACK: str | None = "whitened"

    def __init__(self, whitening: ClassWhitening, rotations: torch.Tensor, knots_x: torch.Tensor,
                 knots_y: torch.Tensor):
        super().__init__()
        self.whitening = whitening
        self.register_buffer("rotations", rotations)  # rounds x z_dim x z_dim
        self.register_buffer("knots_x", knots_x)      # rounds x classes x z_dim x KNOTS
        self.register_buffer("knots_y", knots_y)      # KNOTS: the normal quantiles

    @classmethod
    def fit(cls, z: torch.Tensor, classes: torch.Tensor, num_classes: int, rounds: int = ROUNDS,
            knots: int = KNOTS, seed: int = 0) -> "ClassGaussianization":
        counts = torch.bincount(classes, minlength=num_classes)
        rarest = int(counts.argmin())
        if counts[rarest] < cls.MIN_CODES:
            raise WhiteningError(
                f"class {rarest} is predicted for {int(counts[rarest])} of {len(z)} images, too few "
                f"to fit its quantiles (needs {cls.MIN_CODES})")
        whitening = ClassWhitening.fit(z, classes, num_classes)
        codes = whitening.whiten(z, classes).double()
        z_dim = codes.shape[1]
        levels = (torch.arange(knots, dtype=torch.float64, device=codes.device) + 0.5) / knots
        knots_y = torch.special.ndtri(levels)
        generator = torch.Generator().manual_seed(seed)
        rotations = torch.empty(rounds, z_dim, z_dim, dtype=torch.float64, device=codes.device)
        all_knots_x = torch.empty(rounds, num_classes, z_dim, knots, dtype=torch.float64,
                                  device=codes.device)
        rows_by_class = cls._rows_by_class(classes)
        for round_ in range(rounds):
            rotation, _ = torch.linalg.qr(torch.randn(z_dim, z_dim, generator=generator,
                                                      dtype=torch.float64))
            rotations[round_] = rotation
            codes = codes @ rotations[round_]
            for c, rows in rows_by_class:
                quantiles = torch.quantile(codes[rows], levels, dim=0).T  # z_dim x knots
                # Tied codes would give a flat stretch that cannot be inverted:
                # nudge every knot above the one before.
                quantiles = quantiles.cummax(1).values
                all_knots_x[round_, c] = quantiles + 1e-9 * torch.arange(knots, device=codes.device)
            codes = _map_marginals(codes, rows_by_class, all_knots_x[round_], knots_y, inverse=False)
        # Kept in float64: the nudged knots would tie again in float32.
        return cls(whitening, rotations, all_knots_x, knots_y)

    @staticmethod
    def _rows_by_class(classes: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
        # Once a call, not once a round: each unique() is a host sync on a GPU.
        return [(c, classes == c) for c in classes.unique().tolist()]

    def whiten(self, z: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        """The mapped codes in float64 (the buffers' dtype; the module stays
        float64): where a class's codes are sparse the inverse stretches, and
        float32 rounding, stretched over the rounds, reached 0.02 on a small
        run's test codes (float64: 3e-10). Cast them before a float32 module
        reads them, as ``daae.evaluate.encode`` does; ``WhitenedDecoder``
        unwhitens them first."""
        rows_by_class = self._rows_by_class(classes)
        codes = self.whitening.whiten(z, classes).double()
        for round_, rotation in enumerate(self.rotations):
            codes = _map_marginals(codes @ rotation, rows_by_class, self.knots_x[round_],
                                   self.knots_y, inverse=False)
        return codes

    def unwhiten(self, z: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        rows_by_class = self._rows_by_class(classes)
        codes = z.double()
        for round_ in reversed(range(len(self.rotations))):
            codes = _map_marginals(codes, rows_by_class, self.knots_x[round_], self.knots_y,
                                   inverse=True) @ self.rotations[round_].T
        return self.whitening.unwhiten(codes.float(), classes)


ClassMap = ClassWhitening | ClassGaussianization


class WhitenedEncoder(nn.Module):
    """The encoder with z mapped within its predicted class; z comes out in the
    map's dtype (float64 for ``ClassGaussianization``), the logits as before."""

    def __init__(self, encoder: nn.Module, whitening: ClassMap):
        super().__init__()
        self.encoder, self.whitening = encoder, whitening

    def forward(self, x):
        logits_y, z = self.encoder(x)
        return logits_y, self.whitening.whiten(z, logits_y.argmax(1))

    def __getattr__(self, name):
        # Readers that look inside the encoder (the sample grids size z from
        # its z head) see the wrapped one's parts.
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.encoder, name)


class WhitenedDecoder(nn.Module):
    """The decoder on whitened codes; the class to unwhiten with is y's argmax,
    the encoder's prediction when y is q(y|x), the class asked for when one-hot."""

    def __init__(self, decoder: nn.Module, whitening: ClassMap):
        super().__init__()
        self.decoder, self.whitening = decoder, whitening

    def forward(self, y, z):
        # y has the decoder's dtype; z may be ClassGaussianization's float64.
        return self.decoder(y, self.whitening.unwhiten(z, y.argmax(1)).to(y.dtype))


CLASS_MAPS = {"whitened": ClassWhitening, "gaussianized": ClassGaussianization}


def whiten_networks(nets: Networks, images: ImageSet, batch_size: int, device,
                    class_map: str = "whitened") -> ClassMap:
    """Fit the ``class_map`` (a key of ``CLASS_MAPS``) on the codes of ``images``
    and wrap ``nets``' encoder and decoder in place, so every reader of z
    (evaluation, probes, generation) sees the mapped codes. Returns the fitted map."""
    from .evaluate import encode  # evaluate imports this module for its whitened probes

    if class_map not in CLASS_MAPS:
        raise ValueError(f"class_map {class_map!r} is not one of {sorted(CLASS_MAPS)}")
    map_class = CLASS_MAPS[class_map]
    encoded = encode(nets, images.images, batch_size, device)
    try:
        whitening = map_class.fit(encoded.z, encoded.logits_y.argmax(1),
                                  encoded.logits_y.shape[1]).to(device)
    except WhiteningError as exc:
        if map_class.FALLBACK is None:
            raise
        # The callers are `daae eval` and `daae sample`, whose flag for each
        # map is --class-<its CLASS_MAPS key>.
        raise WhiteningError(f"{exc}: map a run whose y head predicts every class more often, "
                             f"or use --class-{map_class.FALLBACK}") from None
    nets.encoder = WhitenedEncoder(nets.encoder, whitening)
    nets.decoder = WhitenedDecoder(nets.decoder, whitening)
    return whitening
