"""What a trained model generates: style capture, random styles, style
interpolation (``daae sample``), and the same grids plus a map of the style
space for TensorBoard during training.

Every grid has one row per style and one column per class 0..K-1 (the style
grid has the real image in front), so reading across a row shows one style
written as every class, and reading down a column shows one class in many styles.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from .checkpoint import CheckpointError
from .config import ConfigError
from .data import ImageSet, SemiSupervisedData, to_float
from .grids import check_png_out, decode_classes, make_grid, save_png
from .latent_map import latent_map

log = logging.getLogger(__name__)

KINDS = ("style", "random", "interpolate")
MAX_ROWS = 100


class SampleError(ConfigError):
    """A bad ``daae sample`` request (kind, row count, output path)."""


def _device_of(module: torch.nn.Module) -> torch.device:
    return next(module.parameters()).device


def _normal(rows: int, z_dim: int, generator: torch.Generator, device) -> torch.Tensor:
    # Drawn on the CPU so that a seed gives the same styles on every device.
    return torch.randn(rows, z_dim, generator=generator).to(device)


def pick_images(images: ImageSet, n: int, generator: torch.Generator) -> ImageSet:
    """``n`` distinct images of a split, chosen with ``generator``."""
    if n > len(images):
        raise SampleError(f"asked for {n} real images but the split holds only {len(images)}")
    return images.subset(torch.randperm(len(images), generator=generator)[:n])


def interpolation_styles(n: int, z_dim: int, generator: torch.Generator,
                         device="cpu") -> torch.Tensor:
    """``n`` styles evenly spaced on the segment between two random styles."""
    ends = _normal(2, z_dim, generator, device)
    if n == 1:
        return ends[:1]
    t = torch.linspace(0.0, 1.0, n, device=device)[:, None]
    return (1 - t) * ends[0] + t * ends[1]


@torch.no_grad()
def sample_images(nets, data: SemiSupervisedData, kind: str, n: int, seed: int,
                  split: str = "test") -> tuple[torch.Tensor, int]:
    """The cells of one grid, row by row, and the number of columns.

    style: each row is a real image of ``split`` followed by its z decoded as
    every class; random: z ~ N(0, I); interpolate: z on a straight line
    between two random styles. The networks are used in eval mode.
    """
    check_request(kind, n, seed)
    device = _device_of(nets)
    generator = torch.Generator().manual_seed(seed)
    num_classes = data.num_classes
    was_training = nets.training
    nets.eval()
    try:
        if kind == "style":
            chosen = pick_images(getattr(data, split), n, generator)
            real = to_float(chosen.images.to(device))
            _, z = nets.encoder(real)
            decoded = decode_classes(nets.decoder, z, num_classes)
            decoded = decoded.view(n, num_classes, *real.shape[1:])
            cells = torch.cat([real[:, None].float(), decoded], dim=1).flatten(0, 1)
            return cells, num_classes + 1
        z_dim = nets.encoder.z_head[0].out_features
        z = (_normal(n, z_dim, generator, device) if kind == "random"
             else interpolation_styles(n, z_dim, generator, device))
        return decode_classes(nets.decoder, z, num_classes), num_classes
    finally:
        nets.train(was_training)


def sample_grid(nets, data: SemiSupervisedData, kind: str, n: int, seed: int,
                split: str = "test") -> torch.Tensor:
    """One C x H x W image in [0, 1]: ``n`` rows of :func:`sample_images`."""
    cells, _ = sample_images(nets, data, kind, n, seed, split)
    return make_grid(cells.clamp(0, 1).cpu(), rows=n)


def check_request(kind: str, n: int, seed: int = 0) -> None:
    if kind not in KINDS:
        raise SampleError(f"--kind {kind!r} is not known; choose one of {', '.join(KINDS)}")
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_ROWS:
        raise SampleError(f"--n {n!r} is out of range: the grid takes 1 to {MAX_ROWS} rows")
    if not -2**63 <= seed < 2**64:  # what torch.Generator.manual_seed takes
        raise SampleError(f"--seed {seed} is out of range: choose one in [-2**63, 2**64)")


def write_sample(run_dir, kind: str = "style", n: int = 8, seed: int = 0, out="sample.png",
                 device=None, class_map: str | None = None) -> Path:
    """``daae sample``: one PNG grid from a run folder's last checkpoint.

    Every check runs before anything is written, and the PNG is written to a
    temporary file and renamed, so a failure never leaves a partial image.
    ``class_map`` ("whitened" or "gaussianized", ``daae.whitening.CLASS_MAPS``):
    z re-expressed within its predicted class, so a style is a place within each
    class's spread of codes.
    """
    from .runs import load_trained_run, resolve_device
    from .whitening import whiten_networks

    check_request(kind, n, seed)
    out = check_png_out(out, SampleError)
    if not Path(run_dir).is_dir():
        raise CheckpointError(f"run folder {run_dir} does not exist: pass the folder that "
                              f"`daae train` wrote (run.dir/run.name)")
    device = resolve_device(device)
    run = load_trained_run(run_dir, device)
    if class_map is not None:
        whiten_networks(run.nets, run.data.train_images(), run.config.eval.batch_size, device,
                        class_map)
    grid = sample_grid(run.nets, run.data, kind, n, seed)
    try:
        save_png(grid, out)
    except OSError as exc:
        raise SampleError(f"cannot write {out}: {exc}") from None
    return out


# ------------------------------------------------------------------ latent maps

@torch.no_grad()
def encode_styles(nets, images: torch.Tensor,
                  batch_size: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
    """(z, argmax q(y|x)) of uint8 ``images`` in eval mode, on the CPU."""
    device = _device_of(nets)
    was_training = nets.training
    nets.eval()
    codes, predicted = [], []
    try:
        for start in range(0, len(images), batch_size):
            logits_y, z = nets.encoder(to_float(images[start:start + batch_size].to(device)))
            codes.append(z.float().cpu())
            predicted.append(logits_y.argmax(1).cpu())
    finally:
        nets.train(was_training)
    return torch.cat(codes), torch.cat(predicted)


def split_latent_map(nets, images: ImageSet, num_classes: int, points: int, title: str = "",
                     seed: int = 0) -> torch.Tensor:
    """The latent map of the first ``points`` images of a split (a fixed set,
    so maps of successive evaluations are comparable)."""
    subset = images.subset(torch.arange(min(points, len(images))))
    z, _ = encode_styles(nets, subset.images)
    return latent_map(z, subset.labels, num_classes, title, seed)


def write_latent_map(run_dir, out, split: str = "test", points: int = 2000, seed: int = 0,
                     device=None) -> Path:
    """The latent map of a run folder's last checkpoint as a PNG."""
    from .runs import load_trained_run, resolve_device

    out = Path(out)
    if out.suffix.lower() != ".png":
        raise SampleError(f"{out} must name a .png file")
    device = resolve_device(device)
    run = load_trained_run(run_dir, device)
    images = run.data.test if split == "test" else run.data.validation
    title = f"z of {min(points, len(images))} {split} images, step {int(run.state['step'])}"
    save_png(split_latent_map(run.nets, images, run.data.num_classes, points, title, seed), out)
    return out


def tensorboard_generation(writer, nets, data: SemiSupervisedData, step: int, *, rows: int = 8,
                           seed: int = 0, split: str = "validation", map_points: int = 1000,
                           projector_points: int = 300, images_dir=None) -> dict[str, torch.Tensor]:
    """The three sample grids, the latent map and the embedding projector for
    z, written to ``writer`` at ``step`` (and as PNGs to ``images_dir``).

    The seed is the same at every call, so the same styles and images appear
    at every evaluation and the pictures show how the model changes. Only the
    validation split is used by default: test images are only for reporting.
    """
    images = getattr(data, split)
    rows = min(rows, len(images))  # the style grid shows one real image a row
    pictures = {f"generation/{kind}": sample_grid(nets, data, kind, rows, seed, split)
                for kind in KINDS}
    pictures["generation/latent_map"] = split_latent_map(
        nets, images, data.num_classes, map_points, f"z of {split} images, step {step}", seed)
    for tag, picture in pictures.items():
        writer.add_image(tag, picture, step)
        if images_dir is not None:
            save_png(picture, Path(images_dir) / f"{tag.split('/')[-1]}_{step:07d}.png")

    _keep_earlier_embeddings(writer, step)
    subset = images.subset(torch.arange(min(projector_points, len(images))))
    z, predicted = encode_styles(nets, subset.images)
    metadata = [[int(label), int(guess)] for label, guess in zip(subset.labels, predicted)]
    writer.add_embedding(z, metadata=metadata, metadata_header=["label", "predicted"],
                         label_img=to_float(subset.images), global_step=step, tag="z")
    return pictures


def _keep_earlier_embeddings(writer, step: int) -> None:
    """torch's SummaryWriter keeps the projector's config in memory and
    rewrites projector_config.pbtxt from it at each embedding, so a writer
    opened on a resumed run would list only the steps written since. Seed it
    with the file's entries before ``step``: later ones come from a run that
    crashed after its checkpoint, and are about to be written again."""
    path = Path(writer.log_dir) / "projector_config.pbtxt"
    if hasattr(writer, "_projector_config") or not path.is_file():
        return
    from google.protobuf import text_format
    from tensorboard.plugins.projector.projector_config_pb2 import ProjectorConfig

    try:
        config = text_format.Parse(path.read_text(), ProjectorConfig())
    except text_format.ParseError as exc:
        # torch rewrites the file in place, so a crash can leave it torn; it
        # only indexes the embeddings, whose data files stay where they are.
        log.warning("%s is unreadable (%s): TensorBoard's projector lists the embeddings from "
                    "step %d on", path, exc, step)
        config = ProjectorConfig()
    # add_embedding names each entry "<tag>:<step>"; one without a step stays.
    steps = [entry.tensor_name.rpartition(":")[2] for entry in config.embeddings]
    kept = [entry for entry, written in zip(config.embeddings, steps)
            if not written.isdigit() or int(written) < step]
    del config.embeddings[:]
    config.embeddings.extend(kept)
    writer._projector_config = config
