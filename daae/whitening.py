"""z re-expressed within its predicted class: post-hoc class-conditional whitening.

What the probes still read of the class in a trained run's z can lie mostly in
each class's mean and covariance of the codes (P100 at 150 epochs; not at 40:
docs/results.md, *Whitened within the predicted class*). Subtracting the
predicted class's mean and applying the inverse of its covariance's Cholesky
factor gives every class the same first two moments; the decoder is given the
class, so it undoes the map exactly and reconstructions do not change. Nothing
is trained: the statistics come from the codes of the training images, and the
adversary C, trained on the raw codes, does not apply to these.
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


class WhitenedEncoder(nn.Module):
    def __init__(self, encoder: nn.Module, whitening: ClassWhitening):
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

    def __init__(self, decoder: nn.Module, whitening: ClassWhitening):
        super().__init__()
        self.decoder, self.whitening = decoder, whitening

    def forward(self, y, z):
        return self.decoder(y, self.whitening.unwhiten(z, y.argmax(1)).to(z.dtype))


def whiten_networks(nets: Networks, images: ImageSet, batch_size: int, device) -> ClassWhitening:
    """Fit the whitening on the codes of ``images`` and wrap ``nets``' encoder and
    decoder in place, so every reader of z (evaluation, probes, generation) sees
    the whitened codes. Returns the fitted whitening."""
    from .evaluate import encode  # evaluate imports this module for its whitened probes

    encoded = encode(nets, images.images, batch_size, device)
    whitening = ClassWhitening.fit(encoded.z, encoded.logits_y.argmax(1),
                                   encoded.logits_y.shape[1]).to(device)
    nets.encoder = WhitenedEncoder(nets.encoder, whitening)
    nets.decoder = WhitenedDecoder(nets.decoder, whitening)
    return whitening
