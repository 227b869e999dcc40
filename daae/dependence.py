"""A kernel measure of how much z depends on the class, for the independence
term (``loss.independence``): the normalised Hilbert-Schmidt independence
criterion (Gretton et al. 2005), i.e. the centred kernel alignment of
Kornblith et al. (2019), between z under Gaussian kernels and the class
probabilities under a linear kernel.

Why beside the adversary C: C is one network at one moment, and the encoder
can make it fail while z still carries the class in a form a freshly trained
classifier reads (Elazar & Goldberg 2018; the MLP probe here). HSIC with a
characteristic kernel on z is zero only when z and the class are independent,
and has no network for the encoder to outrun.
"""
from __future__ import annotations

import functools

import torch

# Gaussian kernels at these multiples of the batch's median squared distance:
# one scale alone misses dependence much finer or coarser than typical pairs.
BANDWIDTH_FACTORS = (0.25, 1.0, 4.0)


def _centred(kernel: torch.Tensor) -> torch.Tensor:
    return (kernel - kernel.mean(0, keepdim=True) - kernel.mean(1, keepdim=True)
            + kernel.mean())


def class_rows(targets: torch.Tensor, num_classes: int) -> torch.Tensor:
    """C's targets as rows of class probabilities: soft ones as they are,
    hard ones (class indices) one-hot (by scatter: one_hot reads the
    indices' range back to the host, which no CUDA graph can hold)."""
    if targets.dim() == 1:
        rows = torch.zeros(len(targets), num_classes, device=targets.device)
        return rows.scatter_(1, targets[:, None], 1.0)
    return targets.float()


@functools.lru_cache(maxsize=8)
def _off_diagonal_index(n: int, device: torch.device) -> torch.Tensor:
    k = torch.arange(n * (n - 1), device=device)
    rows, columns = k // (n - 1), k % (n - 1)
    columns = columns + (columns >= rows).long()  # skip the diagonal
    return rows * n + columns


def _off_diagonal(square: torch.Tensor) -> torch.Tensor:
    """The entries of an n x n matrix off its diagonal, row by row, gathered
    by computed indices (made once per size: a step is bound by its operator
    count on a GPU): a boolean mask would read its count back to the host."""
    return square.flatten()[_off_diagonal_index(len(square), square.device)]


def normalised_hsic(z: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """In [0, 1], higher when z tells more about the class; the gradient
    reaches ``z`` only (``classes``, rows of class probabilities, is held
    fixed). The kernels' bandwidths come from the batch itself, so the value
    does not change when z is rescaled, and the measure is a ratio, so the
    encoder cannot lower it by shrinking z. The gradient holds the bandwidth
    fixed (detached), so it still has a part along z that would shrink it
    (cosine about 0.1 with z on a random batch), for nothing: D_z's pull to
    N(0, I) meets it. Every reported run trained with this gradient; letting
    it through the median instead would remove that part (an untried change)."""
    z = z.float()
    squared_distances = (z[:, None, :] - z[None, :, :]).pow(2).sum(-1)
    median = _off_diagonal(squared_distances.detach()).median().clamp_min(1e-12)
    z_kernel = sum(torch.exp(-squared_distances / (factor * median))
                   for factor in BANDWIDTH_FACTORS) / len(BANDWIDTH_FACTORS)
    classes = classes.detach().float()
    z_centred, class_centred = _centred(z_kernel), _centred(classes @ classes.T)
    cross = (z_centred * class_centred).sum()
    norms = (z_centred.pow(2).sum() * class_centred.pow(2).sum()).sqrt()
    return cross / norms.clamp_min(1e-12)
