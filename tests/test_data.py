import gzip

import pytest
import torch

from daae.config import DataConfig
from daae.data import (DataError, DeviceBatches, labelled_indices, load_mnist, make_synthetic,
                       md5sum, random_shift, read_idx, resolve_root, split, write_idx)

NAMES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
         "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")


def fake_mnist(root, train=60, test=20):
    generator = torch.Generator().manual_seed(0)
    arrays = {
        NAMES[0]: torch.randint(0, 256, (train, 28, 28), generator=generator, dtype=torch.uint8),
        NAMES[1]: (torch.arange(train) % 10).to(torch.uint8),
        NAMES[2]: torch.randint(0, 256, (test, 28, 28), generator=generator, dtype=torch.uint8),
        NAMES[3]: (torch.arange(test) % 10).to(torch.uint8),
    }
    for name, array in arrays.items():
        write_idx(root / name, array)
    return arrays, {name: md5sum(root / name) for name in NAMES}


def test_idx_round_trip(tmp_path):
    array = torch.randint(0, 256, (5, 3, 4), dtype=torch.uint8)
    write_idx(tmp_path / "a.gz", array)
    assert torch.equal(read_idx(tmp_path / "a.gz"), array)


def test_mnist_reader_checks_md5_and_shapes(tmp_path):
    arrays, checksums = fake_mnist(tmp_path)
    train, test = load_mnist(tmp_path, download=False, checksums=checksums)
    assert train.images.shape == (60, 1, 28, 28) and test.images.shape == (20, 1, 28, 28)
    assert torch.equal(train.images[:, 0], arrays[NAMES[0]])
    assert torch.equal(test.labels, arrays[NAMES[3]].long())


def test_wrong_md5_is_a_clear_error(tmp_path):
    _, checksums = fake_mnist(tmp_path)
    checksums[NAMES[0]] = "0" * 32
    with pytest.raises(DataError, match=r"train-images.*MD5.*expected 0{32}.*Delete it"):
        load_mnist(tmp_path, download=False, checksums=checksums)


def test_truncated_and_corrupt_files_are_clear_errors(tmp_path):
    write_idx(tmp_path / "a.gz", torch.zeros(4, 5, 5, dtype=torch.uint8))
    raw = gzip.decompress((tmp_path / "a.gz").read_bytes())
    (tmp_path / "short.gz").write_bytes(gzip.compress(raw[:-7]))
    with pytest.raises(DataError, match="truncated"):
        read_idx(tmp_path / "short.gz")
    (tmp_path / "cut.gz").write_bytes((tmp_path / "a.gz").read_bytes()[:20])
    with pytest.raises(DataError, match="corrupt or truncated"):
        read_idx(tmp_path / "cut.gz")
    (tmp_path / "junk.gz").write_bytes(gzip.compress(b"\x12\x34\x08\x01rubbish"))
    with pytest.raises(DataError, match="not an IDX file"):
        read_idx(tmp_path / "junk.gz")


def test_missing_files_offline_say_how_to_point_at_a_folder(tmp_path):
    with pytest.raises(DataError, match="data.root.*DAAE_DATA_DIR"):
        load_mnist(tmp_path / "empty", download=False)


def test_labelled_subset_has_n_per_class_without_repeats_and_is_seeded():
    labels = torch.arange(1000) % 10
    chosen = labelled_indices(labels, 7, seed=3)
    assert len(chosen) == 70 and len(set(chosen.tolist())) == 70
    assert torch.bincount(labels[chosen], minlength=10).tolist() == [7] * 10
    assert torch.equal(chosen, labelled_indices(labels, 7, seed=3))
    assert not torch.equal(chosen, labelled_indices(labels, 7, seed=4))


def test_too_many_labels_per_class_names_the_smallest_class_and_the_validation_size():
    # Class 1 is the first short of 95, class 9 the smallest: a fix must hold for it.
    labels = torch.repeat_interleave(torch.arange(10), torch.tensor([100, 90] + [100] * 7 + [60]))
    with pytest.raises(DataError, match="class 9 has only 60 training images outside validation: "
                                        "use at most 60, or lower data.validation_size"):
        labelled_indices(labels, 95, seed=0)
    assert len(labelled_indices(labels, 60, seed=0)) == 600


def test_split_keeps_validation_fixed_and_labelled_out_of_unlabelled():
    train, test = make_synthetic(600, 50, 28)
    ids = torch.arange(len(train))
    train.images[:, 0, 0, 0], train.images[:, 0, 0, 1] = ids % 256, ids // 256
    config = DataConfig(name="synthetic", labels_per_class=5, validation_size=100)
    a, b = split(train, test, config, seed=0), split(train, test, config, seed=1)
    assert len(a.validation) == 100 and torch.equal(a.validation.images, b.validation.images)
    assert len(a.labelled) == 50 and len(a.unlabelled) == 450
    assert not torch.equal(a.labelled.images, b.labelled.images)

    def image_ids(images):
        return set((images[:, 0, 0, 0].long() + 256 * images[:, 0, 0, 1].long()).tolist())

    parts = [image_ids(s.images) for s in (a.validation, a.labelled, a.unlabelled)]
    assert sum(len(p) for p in parts) == len(set.union(*parts)) == len(train)


def test_probes_read_each_training_image_once_in_every_protocol():
    train, test = make_synthetic(600, 50, 28)
    for labels_per_class, expected in ((5, 500), (None, 500)):
        data = split(train, test, DataConfig(name="synthetic", labels_per_class=labels_per_class,
                                             validation_size=100), seed=0)
        images = data.train_images().images.flatten(1)
        assert len(images) == expected and len(torch.unique(images, dim=0)) == expected


def test_too_many_labels_per_class_is_a_clear_error():
    train, test = make_synthetic(200, 20, 28)
    with pytest.raises(DataError, match="labels_per_class=30.*class"):
        split(train, test, DataConfig(name="synthetic", labels_per_class=30, validation_size=10), 0)


def test_device_batches_cover_an_epoch_once_and_shard_ranks():
    train, test = make_synthetic(300, 20, 28)
    data = split(train, test, DataConfig(name="synthetic", labels_per_class=2, validation_size=100), 0)
    data.unlabelled.images = torch.arange(len(data.unlabelled)).view(-1, 1, 1, 1).to(torch.uint8)
    seen = []
    for rank in range(2):
        batches = DeviceBatches(data, "cpu", 10, seed=5, rank=rank, world_size=2)
        for step in range(batches.steps_per_epoch):
            seen += (batches.unlabelled_batch(0, step) * 255).round().long().flatten().tolist()
    assert len(seen) == len(set(seen)) == 2 * 10 * (180 // 20)


def test_download_writes_the_verified_file_and_leaves_nothing_on_failure(tmp_path):
    import functools
    import http.server
    import threading

    from daae.data import fetch_verified

    served = tmp_path / "served"
    served.mkdir()
    write_idx(served / "a.gz", torch.zeros(3, 2, dtype=torch.uint8))
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *args: None
    server = http.server.HTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    mirror = (f"http://127.0.0.1:{server.server_port}/",)
    cache = tmp_path / "cache"
    try:
        path = fetch_verified("a.gz", md5sum(served / "a.gz"), cache, True, mirror)
        assert path.read_bytes() == (served / "a.gz").read_bytes()
        with pytest.raises(DataError, match=f"{cache / 'b.gz'} is missing, and it could not be "
                                            f"downloaded .*data.root"):
            fetch_verified("b.gz", "0" * 32, cache, True, mirror)
        assert sorted(p.name for p in cache.iterdir()) == ["a.gz"]
    finally:
        server.shutdown()


def test_a_data_root_that_is_wrong_is_named_before_any_download(tmp_path):
    from daae.data import fetch_verified

    offline = ("http://127.0.0.1:9/",)  # the discard port: nothing answers
    with pytest.raises(DataError, match=f"{tmp_path / 'typo'} does not exist, and it could not be downloaded"):
        fetch_verified("a.gz", "0" * 32, tmp_path / "typo", True, offline)
    (tmp_path / "file").write_text("")
    with pytest.raises(DataError, match=f"{tmp_path / 'file'} is a file, not a folder. Put"):
        fetch_verified("a.gz", "0" * 32, tmp_path / "file", False, offline)
    write_idx(tmp_path / "a", torch.zeros(3, 2, dtype=torch.uint8))
    with pytest.raises(DataError, match="a.gz is missing \\(a is there unzipped: gzip it"):
        fetch_verified("a.gz", "0" * 32, tmp_path, False, offline)
    (tmp_path / "b.gz").symlink_to("/proc/self/mem")  # reading it fails with an I/O error
    with pytest.raises(DataError, match="b.gz cannot be read .*check its permissions"):
        fetch_verified("b.gz", "0" * 32, tmp_path, False, offline)
    write_idx(tmp_path / "c.gz", torch.zeros(3, 2, dtype=torch.uint8))
    with pytest.raises(DataError, match="Delete it \\(with data.download=true it is downloaded again\\)"):
        fetch_verified("c.gz", "0" * 32, tmp_path, False, offline)


def _bright_pixels(image):
    """(row, col) of every lit pixel of a (channels, height, width) image."""
    return {(row, col) for _, row, col in image.nonzero().tolist()}


def test_random_shift_moves_each_image_by_its_own_offset_within_the_limit():
    images = torch.zeros(400, 3, 28, 28)
    images[:, :, 14, 10] = 1.0  # one bright pixel, the same in every channel
    shifted = random_shift(images, 2, torch.Generator().manual_seed(0))
    assert shifted.shape == images.shape
    offsets = set()
    for image in shifted:
        [(row, col)] = _bright_pixels(image)
        assert torch.equal(image[:, row, col], torch.ones(3)) and image.sum() == 3
        offsets.add((row - 14, col - 10))
    assert offsets == {(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)}


def test_random_shift_fills_with_zeros_and_never_wraps_around():
    images = torch.zeros(300, 1, 28, 28)
    images[:, :, 0, 0] = 1.0  # in the corner: shifted up or left, it must leave the image
    shifted = random_shift(images, 3, torch.Generator().manual_seed(1))
    kept = [pixel for image in shifted for pixel in _bright_pixels(image)]
    assert all(0 <= row <= 3 and 0 <= col <= 3 for row, col in kept)
    assert 0 < len(kept) < len(images)  # some moved inward, some out of the frame
    assert torch.equal(random_shift(images, 0, torch.Generator()), images)


def test_the_data_folder_is_data_root_then_daae_data_dir_then_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("DAAE_DATA_DIR", raising=False)
    assert resolve_root(DataConfig(name="mnist")) == tmp_path / "cache" / "daae" / "mnist"
    monkeypatch.setenv("DAAE_DATA_DIR", str(tmp_path / "shared"))
    assert resolve_root(DataConfig(name="mnist")) == tmp_path / "shared"
    assert resolve_root(DataConfig(name="mnist", root=str(tmp_path / "mine"))) == tmp_path / "mine"
