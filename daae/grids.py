"""Image grids for TensorBoard and PNG files (no torchvision)."""
from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F

from .atomic import atomic_write
from .schema import ConfigError


def make_grid(images: torch.Tensor, rows: int, padding: int = 2) -> torch.Tensor:
    """N x C x H x W in [0, 1] -> one C x H' x W' image, filled row by row."""
    n, c, h, w = images.shape
    cols = -(-n // rows)
    if n < rows * cols:
        images = torch.cat([images, images.new_zeros(rows * cols - n, c, h, w)])
    images = F.pad(images, (padding, 0, padding, 0), value=1.0)
    grid = images.view(rows, cols, c, h + padding, w + padding).permute(2, 0, 3, 1, 4)
    grid = grid.reshape(c, rows * (h + padding), cols * (w + padding))
    return F.pad(grid, (0, padding, 0, padding), value=1.0)


def save_png(grid: torch.Tensor, path: str | Path) -> None:
    """Write a C x H x W grid in [0, 1] as PNG, atomically."""
    from PIL import Image

    pixels = (grid.clamp(0, 1) * 255).round().to(torch.uint8).cpu()
    array = pixels[0].numpy() if pixels.shape[0] == 1 else pixels.permute(1, 2, 0).numpy()
    atomic_write(path, lambda handle: Image.fromarray(array).save(handle, format="PNG"))


@torch.no_grad()
def decode_classes(decoder, z: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Each row of ``z`` decoded as every class 0..K-1: (rows*K) x C x H x W."""
    rows = len(z)
    y = torch.eye(num_classes, device=z.device).repeat(rows, 1)
    return decoder(y, z.repeat_interleave(num_classes, dim=0)).float()


@torch.no_grad()
def reconstruction_grid(nets, images: torch.Tensor) -> torch.Tensor:
    """Originals above their reconstructions, in eval mode."""
    was_training = nets.training
    nets.eval()
    logits_y, z = nets.encoder(images)
    reconstructions = nets.decoder(logits_y.softmax(1), z).float()
    nets.train(was_training)
    return make_grid(torch.cat([images.float(), reconstructions]), rows=2)


def check_png_out(out: str | Path, error: type[ConfigError] = ConfigError) -> Path:
    """A command's ``--out FILE.png``, checked before the command does its work,
    so that a path it cannot write costs a message, not the work. Missing
    folders are made when the file is written."""
    out = Path(out)
    if out.suffix.lower() != ".png":
        raise error(f"--out {out} must name a .png file")
    if out.is_dir():
        raise error(f"--out {out} is a folder; name a .png file inside it")
    folder = next(parent for parent in out.parents if parent.exists())
    if not folder.is_dir():
        raise error(f"--out {out}: {folder} is a file, not a folder; name a .png file in a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise error(f"--out {out}: {folder} is not writable; name a .png file in a folder you "
                    f"can write to")
    return out
