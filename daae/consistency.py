"""``generation_consistency``: does the decoder draw the class it is asked for?

An independent judge is needed: the model's own encoder would grade its own
decoder and could agree with it on images no person would read as that class.
So a small CNN is trained once on the training images with their true labels
(every training image outside validation, not only the labelled subset: the
checker is a measuring instrument, not a competitor) and cached on disk.
"""
from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from . import checkpoint
from .data import ImageSet, SemiSupervisedData, cache_root, to_float

log = logging.getLogger(__name__)

# Bump when the checker's architecture or training changes, so that stale
# cached checkers are not loaded into a new architecture.
CHECKER_VERSION = 2


class Checker(nn.Module):
    """Two strided convolutions and a small head, ~1.5 M multiply-adds per
    image: cheap enough to train once on a CPU, ~99 % on MNIST in two epochs."""

    def __init__(self, channels: int, num_classes: int):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(channels, 32, 5, stride=2, padding=2, bias=False), nn.BatchNorm2d(32),
            nn.ReLU(inplace=True),
            nn.Conv2d(32, 64, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(64),
            nn.ReLU(inplace=True),
            # A fixed output size makes one checker fit 28x28 and 32x32 images.
            nn.AdaptiveAvgPool2d(7))
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(0.2), nn.Linear(64 * 49, 64),
                                  nn.ReLU(inplace=True), nn.Linear(64, num_classes))

    def forward(self, x):
        return self.head(self.features(x))


def cache_dir() -> Path:
    return cache_root() / "classifiers"


def data_fingerprint(images: ImageSet, epochs: int, test: ImageSet) -> str:
    """A hash of the training images, labels and recipe, and of the test set
    the cached accuracy was read on: a checker is reused only for exactly the
    data and training it was made with."""
    digest = hashlib.sha256()
    digest.update(f"v{CHECKER_VERSION}-e{epochs}-{tuple(images.images.shape)}".encode())
    for part in (images, test):
        digest.update(f"-{tuple(part.images.shape)}".encode())
        digest.update(part.images.contiguous().numpy().tobytes())
        digest.update(part.labels.contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, device, batch_size: int = 1000) -> torch.Tensor:
    """Predicted classes of float images in [0, 1] (or uint8 images)."""
    model.eval()
    out = []
    for start in range(0, len(images), batch_size):
        x = images[start:start + batch_size].to(device)
        x = to_float(x) if x.dtype == torch.uint8 else x.float()
        out.append(model(x).argmax(1).cpu())
    return torch.cat(out)


def train_checker(train: ImageSet, test: ImageSet, num_classes: int, device, epochs: int = 2,
                  batch_size: int = 128, lr: float = 5e-3,
                  seed: int = 0) -> tuple[nn.Module, float]:
    """Fit the checker on ``train``; returns it and its accuracy on ``test``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Checker(train.images.shape[1], num_classes).to(device)
    generator = torch.Generator().manual_seed(seed)
    images, labels = train.images.to(device), train.labels.to(device)
    steps = epochs * -(-len(train) // batch_size)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    # A one-cycle schedule reaches ~99 % on MNIST in two epochs; a flat rate needs more.
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps)
    model.train()
    # Callers may hold torch.no_grad() (evaluation code usually does).
    with torch.random.fork_rng(devices=[]), torch.enable_grad():
        torch.manual_seed(seed)  # dropout masks
        for epoch in range(epochs):
            log.info("generation checker: epoch %d of %d", epoch + 1, epochs)
            order = torch.randperm(len(train), generator=generator).to(device)
            for start in range(0, len(train), batch_size):
                index = order[start:start + batch_size]
                loss = F.cross_entropy(model(to_float(images[index])), labels[index])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
    accuracy = float((predict(model, test.images, device) == test.labels).float().mean())
    return model.eval(), accuracy


def load_checker(data: SemiSupervisedData, dataset: str, device, epochs: int = 2,
                 directory: str | Path | None = None) -> tuple[nn.Module, float]:
    """The cached checker for this data, trained (and cached) on first use."""
    train = data.train_images()
    path = Path(directory or cache_dir()) / f"{dataset}-{data_fingerprint(train, epochs, data.test)}.pt"
    channels = data.image_shape[0]
    if path.is_file():
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            model = Checker(channels, data.num_classes)
            model.load_state_dict(state["model"])
            return model.to(device).eval(), float(state["test_accuracy"])
        except Exception as exc:  # a damaged cache file is rebuilt, not fatal
            log.warning("cached checker %s is unreadable (%s); training it again", path, exc)
    log.info("training the generation checker on %d %s images (once; cached in %s)",
             len(train), dataset, path)
    model, accuracy = train_checker(train, data.test, data.num_classes, device, epochs)
    log.info("generation checker: %.2f%% test accuracy", 100 * accuracy)
    state = {"model": {k: v.cpu() for k, v in model.state_dict().items()},
             "test_accuracy": accuracy, "version": CHECKER_VERSION}
    try:
        checkpoint.save_atomic(state, path)  # atomic: parallel evaluations may race to write it
    except OSError as exc:
        # The cache only spares the next evaluation this training; failing to
        # write it must not throw away the metrics this one has computed.
        log.warning("cannot cache the generation checker at %s (%s): going on with the one just "
                    "trained, which the next evaluation trains again; point XDG_CACHE_HOME at a "
                    "writable folder to keep it", path, exc)
    return model, accuracy


def generation_consistency(nets, data: SemiSupervisedData, config, device,
                           per_class: int = 200, seed: int = 0,
                           checker_dir: str | Path | None = None) -> dict[str, float]:
    """The share of images decoded from z ~ N(0, I) as class c that the
    checker labels c, averaged over classes (chance is 1/K), plus the
    checker's own test accuracy, which bounds how far the figure can be trusted."""
    device = torch.device(device)
    checker, checker_accuracy = load_checker(data, config.data.name, device, directory=checker_dir)
    num_classes = data.num_classes
    generator = torch.Generator().manual_seed(seed)
    z = torch.randn(per_class * num_classes, config.model.z_dim, generator=generator).to(device)
    y_index = torch.arange(num_classes).repeat_interleave(per_class)
    y = F.one_hot(y_index, num_classes).float().to(device)
    was_training = nets.training
    nets.eval()
    try:
        with torch.no_grad():
            images = torch.cat([nets.decoder(y[s:s + 1000], z[s:s + 1000]).float()
                                for s in range(0, len(z), 1000)])
    finally:
        nets.train(was_training)
    hits = (predict(checker, images, device) == y_index).float().view(num_classes, per_class)
    per_class_share = hits.mean(1)
    return {"generation_consistency": float(per_class_share.mean()),
            "generation_consistency_worst_class": float(per_class_share.min()),
            "generation_checker_accuracy": checker_accuracy}
