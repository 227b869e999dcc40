"""A picture of the style space: a 2-D projection of z coloured by true class.

If decorrelation works, z carries no class, so the colours mix; if it does
not, they form clusters. Drawn with PIL so that no plotting library is needed.
"""
from __future__ import annotations

import torch

# Matplotlib's "tab10": ten colours that stay distinguishable as small dots.
PALETTE = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
           (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207))
BACKGROUND = (255, 255, 255)
FRAME = (90, 90, 90)


def class_colour(cls: int) -> tuple[int, int, int]:
    if cls < len(PALETTE):
        return PALETTE[cls]
    # More classes than the palette holds: spread further colours on a hue circle.
    import colorsys

    r, g, b = colorsys.hsv_to_rgb((cls * 0.618034) % 1.0, 0.75, 0.85)
    return round(r * 255), round(g * 255), round(b * 255)


def pca_2d(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N x 2 coordinates on the two leading principal axes, the share of the
    variance each explains). Signs are fixed (largest loading positive), so the
    same codes always give the same picture rather than a mirrored one."""
    z = z.double()
    centred = z - z.mean(0)
    if z.shape[1] == 1:  # a 1-D style: the second axis is empty
        coords = torch.cat([centred, torch.zeros_like(centred)], 1)
        return coords.float(), torch.tensor([1.0, 0.0])
    _, singular, v = torch.linalg.svd(centred, full_matrices=False)
    axes = v[:2].T.clone()  # d x 2
    for k in range(2):
        if axes[axes[:, k].abs().argmax(), k] < 0:
            axes[:, k] = -axes[:, k]
    variance = singular ** 2
    share = variance[:2] / variance.sum().clamp_min(1e-12)
    return (centred @ axes).float(), share.float()


def draw_latent_map(coords: torch.Tensor, labels: torch.Tensor, num_classes: int,
                    title: str = "", size: int = 360, radius: int = 2,
                    seed: int = 0) -> torch.Tensor:
    """A scatter plot of ``coords`` (N x 2) coloured by ``labels`` as a
    3 x H x W image in [0, 1], with a class legend on the right."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    margin, legend_width, title_height = 14, 44, 18 if title else 0
    width, height = size + 2 * margin + legend_width, size + 2 * margin + title_height
    image = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(image)
    top = margin + title_height
    if title:
        draw.text((margin, 3), title, fill=FRAME, font=font)
    draw.rectangle([margin - 1, top - 1, margin + size, top + size], outline=FRAME)

    coords = coords.double().cpu()
    low, high = coords.min(0).values, coords.max(0).values
    # One scale for both axes, so distances in the picture are distances in z.
    span = float((high - low).max().clamp_min(1e-12))
    centre = (low + high) / 2
    inner = size - 2 * radius - 2
    pixels = (coords - centre) / span * inner + size / 2
    pixels[:, 1] = size - pixels[:, 1]  # image rows grow downwards, the y axis upwards
    # A random drawing order: drawn class by class, the last class would hide the rest.
    order = torch.randperm(len(coords), generator=torch.Generator().manual_seed(seed))
    for i in order.tolist():
        x, y = margin + float(pixels[i, 0]), top + float(pixels[i, 1])
        draw.ellipse([x - radius, y - radius, x + radius, y + radius],
                     fill=class_colour(int(labels[i])))

    legend_x = margin + size + 12
    for cls in range(num_classes):
        y = top + 4 + cls * 16
        draw.rectangle([legend_x, y, legend_x + 9, y + 9], fill=class_colour(cls))
        draw.text((legend_x + 14, y - 1), str(cls), fill=FRAME, font=font)
    pixels_uint8 = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
    return pixels_uint8.view(height, width, 3).permute(2, 0, 1).float().div(255.0)


def latent_map(z: torch.Tensor, labels: torch.Tensor, num_classes: int,
               title: str = "", seed: int = 0) -> torch.Tensor:
    """PCA of ``z`` drawn as :func:`draw_latent_map`; the title gets the
    variance the two axes explain, so a flat-looking map is not misread."""
    coords, share = pca_2d(z)
    note = f"PC1 {share[0]:.0%}, PC2 {share[1]:.0%} of var"
    return draw_latent_map(coords, labels, num_classes, f"{title}  {note}".strip(), seed=seed)
