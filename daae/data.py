"""Data sets, the semi-supervised split (DESIGN.md section 3) and on-device batches.

Images are kept as uint8 tensors (MNIST is 47 MB) and live on the training
device; batches are indexed there, so no DataLoader runs per step.
"""
from __future__ import annotations

import gzip
import hashlib
import logging
import os
import shutil
import struct
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import torch

from .atomic import atomic_write
from .config import DataConfig

log = logging.getLogger(__name__)

NUM_CLASSES = 10

MNIST_FILES = {  # file -> MD5 of the official gzip
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}
MNIST_MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
)
SVHN_FILES = {
    "train_32x32.mat": "e26dedcc434d2e4c54c9b2d4a06d8373",
    "test_32x32.mat": "eb5a983be6a315427106f1b164d9cef3",
    "extra_32x32.mat": "a93ce644f1a588dc4d68dda5feec44a7",
}
SVHN_MIRRORS = ("http://ufldl.stanford.edu/housenumbers/",)


class DataError(RuntimeError):
    """A data file is missing, corrupt or cannot be fetched; the message says what to do."""


@dataclass
class ImageSet:
    images: torch.Tensor  # uint8, N x C x H x W
    labels: torch.Tensor  # int64, N

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: torch.Tensor) -> "ImageSet":
        return ImageSet(self.images[index], self.labels[index])

    def to(self, device) -> "ImageSet":
        return ImageSet(self.images.to(device), self.labels.to(device))


@dataclass
class SemiSupervisedData:
    unlabelled: ImageSet  # labels kept only for analysis; never used to train
    labelled: ImageSet
    validation: ImageSet
    test: ImageSet
    num_classes: int = NUM_CLASSES

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.test.images.shape[1:])

    def train_images(self) -> ImageSet:
        """Every training image outside validation, once, with its true label (for probes)."""
        if self.labelled is self.unlabelled:  # protocol ALL: one set in both roles
            return self.unlabelled
        return ImageSet(torch.cat([self.unlabelled.images, self.labelled.images]),
                        torch.cat([self.unlabelled.labels, self.labelled.labels]))


# --------------------------------------------------------------------------- files

def md5sum(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def cache_root() -> Path:
    """daae's per-user cache folder (honours XDG_CACHE_HOME)."""
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "daae"


def resolve_root(config: DataConfig) -> Path:
    if config.root:
        return Path(config.root).expanduser()
    if os.environ.get("DAAE_DATA_DIR"):
        return Path(os.environ["DAAE_DATA_DIR"]).expanduser()
    return cache_root() / config.name


def _download(name: str, root: Path, mirrors: tuple[str, ...]) -> None:
    errors = []
    for mirror in mirrors:
        url = mirror + name
        log.info("downloading %s", url)
        try:
            with urllib.request.urlopen(url, timeout=60) as response:
                atomic_write(root / name, lambda handle: shutil.copyfileobj(response, handle))
            return
        except (urllib.error.URLError, OSError) as exc:
            errors.append(f"{url}: {exc}")
    raise DataError(
        f"it could not be downloaded ({'; '.join(errors)}). If this machine is offline, "
        f"put the files in a folder and point data.root (or the DAAE_DATA_DIR environment "
        f"variable) at it.")


def fetch_verified(name: str, md5: str, root: Path, download: bool,
                   mirrors: tuple[str, ...]) -> Path:
    """The path of ``root/name`` after an MD5 check, downloading it first if allowed."""
    path = root / name
    if not path.is_file():
        # Said first: a mistyped data.root would otherwise read as a network problem.
        where = (f"{root} is a file, not a folder" if root.is_file()
                 else f"{root} does not exist" if not root.exists()
                 else f"{path} is missing")
        unzipped = path.with_suffix("") if path.suffix == ".gz" else None
        if unzipped is not None and unzipped.is_file():
            where += f" ({unzipped.name} is there unzipped: gzip it, as the official file is)"
        if not download:
            raise DataError(
                f"{where}. Put the official file there, point data.root (or DAAE_DATA_DIR) at "
                f"a folder that holds it, or set data.download=true.")
        try:
            _download(name, root, mirrors)
        except DataError as exc:
            raise DataError(f"{where}, and {exc}") from None
    try:
        actual = md5sum(path)
    except OSError as exc:
        raise DataError(f"{path} cannot be read ({exc}): check its permissions and the disk "
                        f"it is on, or point data.root at a copy.") from None
    if actual != md5:
        again = "it is downloaded again" if download else "with data.download=true it is downloaded again"
        raise DataError(
            f"{path} has MD5 {actual}, expected {md5}: the file is corrupt or not the "
            f"official one. Delete it ({again}) or replace it.")
    return path


def read_idx(path: Path) -> torch.Tensor:
    """An IDX file (gzip or plain) as a uint8 tensor of its declared shape."""
    opener = gzip.open if str(path).endswith(".gz") else open
    try:
        with opener(path, "rb") as handle:
            raw = handle.read()
    except (OSError, EOFError) as exc:
        raise DataError(f"{path} cannot be read ({exc}): the file is corrupt or truncated; "
                        f"delete it and fetch it again.") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise DataError(f"{path} is not an IDX file (bad magic number).")
    dtype_code, ndim = raw[2], raw[3]
    if dtype_code != 0x08:
        raise DataError(f"{path}: IDX element type 0x{dtype_code:02x} is not supported "
                        f"(only unsigned bytes, 0x08).")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path} is truncated inside its header.")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    count = 1
    for size in shape:
        count *= size
    if len(raw) - header != count:
        raise DataError(f"{path} holds {len(raw) - header} bytes of data but its header "
                        f"declares {count} (shape {shape}): the file is truncated or corrupt.")
    return torch.frombuffer(bytearray(raw[header:]), dtype=torch.uint8).reshape(shape)


def write_idx(path: Path, array: torch.Tensor) -> None:
    """Write a uint8 tensor as a gzip IDX file (the inverse of :func:`read_idx`)."""
    array = array.to(torch.uint8).contiguous()
    header = bytes([0, 0, 0x08, array.dim()]) + struct.pack(f">{array.dim()}I", *array.shape)
    with gzip.open(path, "wb") as handle:
        handle.write(header + array.numpy().tobytes())


def load_mnist(root: Path, download: bool = True, checksums: dict | None = None):
    checksums = MNIST_FILES if checksums is None else checksums
    paths = {name: fetch_verified(name, md5, root, download, MNIST_MIRRORS)
             for name, md5 in checksums.items()}

    def pair(prefix: str) -> ImageSet:
        images = read_idx(paths[f"{prefix}-images-idx3-ubyte.gz"])
        labels = read_idx(paths[f"{prefix}-labels-idx1-ubyte.gz"]).long()
        if len(images) != len(labels):
            raise DataError(f"{root}: {prefix} images ({len(images)}) and labels "
                            f"({len(labels)}) differ in count.")
        return ImageSet(images.unsqueeze(1), labels)

    return pair("train"), pair("t10k")


def load_svhn(root: Path, download: bool = True, extra: bool = False,
              checksums: dict | None = None):
    try:
        from scipy.io import loadmat
    except ImportError:  # pragma: no cover - scipy is a dependency
        raise DataError("SVHN needs scipy to read its .mat files: pip install scipy") from None
    checksums = SVHN_FILES if checksums is None else checksums

    def read(name: str) -> ImageSet:
        path = fetch_verified(name, checksums[name], root, download, SVHN_MIRRORS)
        try:
            mat = loadmat(path)
        except Exception as exc:  # scipy raises several types for broken files
            raise DataError(f"{path} cannot be read as a .mat file ({exc}).") from None
        images = torch.from_numpy(mat["X"]).permute(3, 2, 0, 1).contiguous()  # HWCN -> NCHW
        labels = torch.from_numpy(mat["y"].reshape(-1).astype("int64")) % 10  # label 10 is digit 0
        return ImageSet(images, labels)

    train = read("train_32x32.mat")
    if extra:
        more = read("extra_32x32.mat")
        train = ImageSet(torch.cat([train.images, more.images]), torch.cat([train.labels, more.labels]))
    return train, read("test_32x32.mat")


def make_synthetic(train_size: int, test_size: int, image_size: int, seed: int = 1234):
    """A tiny class-structured image set: ten fixed prototypes (the class) drawn
    with a random shift, stroke gain and noise (the style)."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(NUM_CLASSES, 1, 7, 7, generator=generator)
    prototypes = torch.nn.functional.interpolate(coarse, size=(image_size, image_size),
                                                 mode="bilinear", align_corners=False)
    prototypes = (prototypes > 0.55).float()

    def draw(count: int) -> ImageSet:
        labels = torch.arange(count) % NUM_CLASSES
        labels = labels[torch.randperm(count, generator=generator)]
        images = prototypes[labels].clone()
        shifts = torch.randint(-2, 3, (count, 2), generator=generator)
        for i in range(count):
            images[i] = torch.roll(images[i], shifts=tuple(shifts[i].tolist()), dims=(1, 2))
        gain = 0.5 + 0.5 * torch.rand(count, 1, 1, 1, generator=generator)
        images = images * gain + 0.1 * torch.rand(images.shape, generator=generator)
        return ImageSet((images.clamp(0, 1) * 255).to(torch.uint8), labels)

    return draw(train_size), draw(test_size)


# --------------------------------------------------------------------------- split

def labelled_indices(labels: torch.Tensor, per_class: int, seed: int,
                     num_classes: int = NUM_CLASSES) -> torch.Tensor:
    """``per_class`` distinct indices of each class, drawn with ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    counts = torch.bincount(labels, minlength=num_classes)
    smallest = int(counts[:num_classes].argmin())
    if counts[smallest] < per_class:
        # The smallest class, not the first short one: the fix must hold for every class.
        raise DataError(f"data.labels_per_class={per_class} but class {smallest} has only "
                        f"{int(counts[smallest])} training images outside validation: use at most "
                        f"{int(counts[smallest])}, or lower data.validation_size.")
    chosen = []
    for cls in range(num_classes):
        members = torch.nonzero(labels == cls).flatten()
        chosen.append(members[torch.randperm(len(members), generator=generator)[:per_class]])
    return torch.sort(torch.cat(chosen)).values


def split(train: ImageSet, test: ImageSet, config: DataConfig, seed: int) -> SemiSupervisedData:
    if config.validation_size >= len(train):
        raise DataError(f"data.validation_size={config.validation_size} leaves no training "
                        f"images out of {len(train)}; lower it.")
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(config.split_seed))
    validation = train.subset(order[:config.validation_size])
    rest = train.subset(order[config.validation_size:])
    if config.labels_per_class is None:
        # Protocol ALL: every training image is labelled and also used unlabelled.
        return SemiSupervisedData(unlabelled=rest, labelled=rest, validation=validation, test=test)
    chosen = labelled_indices(rest.labels, config.labels_per_class, seed)
    keep = torch.ones(len(rest), dtype=torch.bool)
    keep[chosen] = False
    return SemiSupervisedData(unlabelled=rest.subset(keep.nonzero().flatten()),
                              labelled=rest.subset(chosen), validation=validation, test=test)


def load_data(config: DataConfig, seed: int) -> SemiSupervisedData:
    if config.name == "synthetic":
        train, test = make_synthetic(config.synthetic_train_size, config.synthetic_test_size,
                                     config.synthetic_image_size)
    elif config.name == "mnist":
        train, test = load_mnist(resolve_root(config), config.download)
    else:
        train, test = load_svhn(resolve_root(config), config.download, config.svhn_extra)
    return split(train, test, config, seed)


# ------------------------------------------------------------------------- batches

def to_float(images: torch.Tensor) -> torch.Tensor:
    return images.float().div_(255.0)


def random_shift(images: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Translate each image by its own offset of up to ``max_shift`` pixels along
    each axis, filling with zeros (MNIST's background; a black border on SVHN).

    One gather for the whole batch rather than a slice per image: on a GPU the
    step is bound by kernel launches, and 200 slices would cost more than the model.
    """
    if max_shift == 0:
        return images
    count, _, height, width = images.shape
    offsets = torch.randint(-max_shift, max_shift + 1, (2, count, 1), generator=generator,
                            device=images.device)
    rows = torch.arange(height, device=images.device) - offsets[0]  # source row of each output row
    cols = torch.arange(width, device=images.device) - offsets[1]
    inside = (((rows >= 0) & (rows < height))[:, :, None]
              & ((cols >= 0) & (cols < width))[:, None, :])
    batch = torch.arange(count, device=images.device)[:, None, None]
    # Indices around a slice put their broadcast shape first: (count, height, width, channels).
    moved = images[batch, :, rows.clamp(0, height - 1)[:, :, None], cols.clamp(0, width - 1)[:, None, :]]
    return (moved * inside[..., None]).permute(0, 3, 1, 2).contiguous()


class DeviceBatches:
    """Random batches indexed on the device.

    Unlabelled batches walk an epoch permutation that depends only on
    (seed, epoch), so every rank sees the same order and takes its own stride,
    and a resumed run redraws exactly the batches it would have seen.
    Labelled batches are drawn with replacement from the small labelled set
    with the caller's generator.
    """

    def __init__(self, data: SemiSupervisedData, device, batch_size: int, seed: int,
                 rank: int = 0, world_size: int = 1):
        self.unlabelled = data.unlabelled.images.to(device)
        self.labelled = data.labelled.to(device)
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.steps_per_epoch = len(self.unlabelled) // (batch_size * world_size)
        if self.steps_per_epoch < 1:
            raise DataError(f"train.batch_size={batch_size} x {world_size} processes is more "
                            f"than the {len(self.unlabelled)} unlabelled images; lower it.")
        self._epoch = -1
        self._order = None

    def _epoch_order(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            order = torch.randperm(len(self.unlabelled), generator=generator)
            self._order = order[self.rank::self.world_size].to(self.device)
            self._epoch = epoch
        return self._order

    def unlabelled_index(self, epoch: int, step_in_epoch: int) -> torch.Tensor:
        """Which unlabelled images make up the batch, on the device."""
        start = step_in_epoch * self.batch_size
        return self._epoch_order(epoch)[start:start + self.batch_size]

    def unlabelled_images(self, index: torch.Tensor) -> torch.Tensor:
        return to_float(self.unlabelled[index])

    def unlabelled_batch(self, epoch: int, step_in_epoch: int) -> torch.Tensor:
        return self.unlabelled_images(self.unlabelled_index(epoch, step_in_epoch))

    def labelled_batch(self, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.randint(len(self.labelled), (self.batch_size,), generator=generator,
                              device=self.device)
        return to_float(self.labelled.images[index]), self.labelled.labels[index]
