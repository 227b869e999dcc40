"""Generation and analysis: sample grids, `daae sample`, latent maps, the
TensorBoard pictures and generation_consistency, on a run trained in seconds."""
from __future__ import annotations

import re
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from daae import cli
from daae.config import load_config
from daae.consistency import generation_consistency, load_checker
from daae.grids import decode_classes
from daae.latent_map import PALETTE, draw_latent_map, pca_2d
from daae.runs import load_trained_run
from daae.sample import (KINDS, MAX_ROWS, SampleError, interpolation_styles, sample_grid,
                         sample_images, tensorboard_generation, write_sample)
from daae.train import train

ROOT = Path(__file__).resolve().parents[1]
CELL = 28 + 2  # image plus make_grid's padding


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tensors here are tiny: a second intra-op thread only adds
    synchronisation, which costs twice the time on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    parent = tmp_path_factory.mktemp("runs")
    config = load_config(ROOT / "configs" / "smoke.yaml", [
        f"run.dir={parent}", "run.name=gen", "train.max_steps=20", "run.progress_bar=false",
        "eval.final_test=false", "eval.probe_epochs=1", "eval.probe_train_size=200",
        # A smaller set keeps the checker's one-off training short.
        "data.synthetic_train_size=1500", "data.validation_size=300",
        "data.synthetic_test_size=300"])
    train(config)
    return parent / "gen"


@pytest.fixture(scope="module")
def run(run_dir):
    return load_trained_run(run_dir, "cpu")


@pytest.fixture(scope="module")
def checker_dir(tmp_path_factory) -> Path:
    """Shared, so the synthetic checker is trained once for the whole file."""
    return tmp_path_factory.mktemp("checkers")


@pytest.mark.parametrize("kind", KINDS)
def test_grid_size_and_pixel_range(run, kind):
    n, k = 3, run.data.num_classes
    grid = sample_grid(run.nets, run.data, kind, n, seed=0)
    columns = k + 1 if kind == "style" else k
    assert grid.shape == (1, n * CELL + 2, columns * CELL + 2)
    assert grid.min() >= 0 and grid.max() <= 1
    cells, cols = sample_images(run.nets, run.data, kind, n, seed=0)
    assert cols == columns and cells.shape == (n * columns, 1, 28, 28)
    # Every cell has content: no row or column was left as padding.
    assert (cells.flatten(1).std(1) > 0).all()


def test_style_rows_are_real_images_decoded_as_every_class(run):
    n, k = 4, run.data.num_classes
    cells, cols = sample_images(run.nets, run.data, "style", n, seed=5)
    cells = cells.view(n, cols, 1, 28, 28)
    real = cells[:, 0]
    test_images = run.data.test.images.float() / 255
    for image in real:  # the left column holds images of the test split
        assert ((test_images - image).abs().flatten(1).amax(1) < 1e-6).any()
    _, z = run.nets.encoder(real)
    expected = decode_classes(run.nets.decoder, z, k)
    assert torch.allclose(cells[:, 1:].flatten(0, 1), expected, atol=1e-5)


def test_interpolation_is_a_straight_line_between_its_ends():
    z = interpolation_styles(5, 9, torch.Generator().manual_seed(0))
    steps = z[1:] - z[:-1]
    assert torch.allclose(steps, steps[0].expand_as(steps), atol=1e-5)
    assert steps[0].norm() > 0.1


def test_random_rows_differ_and_seed_fixes_them(run):
    a, _ = sample_images(run.nets, run.data, "random", 3, seed=1)
    b, _ = sample_images(run.nets, run.data, "random", 3, seed=1)
    c, _ = sample_images(run.nets, run.data, "random", 3, seed=2)
    assert torch.equal(a, b) and not torch.equal(a, c)
    rows = a.view(3, -1)
    assert not torch.allclose(rows[0], rows[1])


def test_same_seed_same_png_bytes(run_dir, tmp_path):
    paths = [write_sample(run_dir, "interpolate", 3, seed, tmp_path / f"{i}.png", "cpu")
             for i, seed in enumerate((7, 7, 8))]
    first, again, other = (p.read_bytes() for p in paths)
    assert first == again and first != other


def test_cli_writes_the_grid(run_dir, tmp_path):
    out = tmp_path / "sub" / "style.png"
    code = cli.main(["sample", "--checkpoint", str(run_dir), "--kind", "style", "--n", "5",
                     "--seed", "3", "--out", str(out), "--device", "cpu"])
    assert code == 0
    with Image.open(out) as image:
        assert image.size == (11 * CELL + 2, 5 * CELL + 2)
        assert image.mode == "L"


def _run_without_checkpoint(run_dir, tmp_path):
    folder = tmp_path / "no_checkpoint"
    folder.mkdir()
    shutil.copy(run_dir / "config.yaml", folder / "config.yaml")
    return folder


def _run_of_another_kind(run_dir, tmp_path):
    folder = tmp_path / "other_kind"
    shutil.copytree(run_dir, folder)
    config = yaml.safe_load((folder / "config.yaml").read_text())
    config["model"]["kind"] = "conv"
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    return folder


@pytest.mark.parametrize("case, argv, message", [
    ("missing", ["--kind", "style"], "does not exist"),
    ("no_checkpoint", ["--kind", "style"], "no checkpoint"),
    ("other_kind", ["--kind", "style"], "does not fit"),
    ("ok", ["--kind", "style", "--n", "0"], "out of range"),
    ("ok", ["--kind", "random", "--n", str(MAX_ROWS + 1)], "out of range"),
    ("ok", ["--kind", "random", "--seed", str(2**64)], "--seed 18446744073709551616 is out of range"),
])
def test_bad_input_is_a_clear_error_and_writes_nothing(run_dir, tmp_path, caplog, case, argv,
                                                       message):
    folder = {"missing": lambda: tmp_path / "nowhere",
              "no_checkpoint": lambda: _run_without_checkpoint(run_dir, tmp_path),
              "other_kind": lambda: _run_of_another_kind(run_dir, tmp_path),
              "ok": lambda: run_dir}[case]()
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    code = cli.main(["sample", "--checkpoint", str(folder), *argv, "--out", str(out_dir / "x.png"),
                     "--device", "cpu"])
    assert code == 2
    assert message in caplog.text
    assert list(out_dir.iterdir()) == []


def test_any_seed_torchs_generator_takes_draws_a_grid(run_dir, tmp_path):
    for seed in (-1, 2**64 - 1):
        out = tmp_path / f"random{seed}.png"
        assert cli.main(["sample", "--checkpoint", str(run_dir), "--kind", "random", "--n", "2",
                         "--seed", str(seed), "--out", str(out), "--device", "cpu"]) == 0
        assert out.is_file()


def test_unknown_kind_is_refused(run_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["sample", "--checkpoint", str(run_dir), "--kind", "zebra", "--out",
                  str(tmp_path / "x.png")])
    assert exit_info.value.code == 2 and "invalid choice" in capsys.readouterr().err
    with pytest.raises(SampleError, match="not known"):
        write_sample(run_dir, "zebra", 2, 0, tmp_path / "x.png", "cpu")
    assert not (tmp_path / "x.png").exists()


def test_pca_finds_the_main_axis_and_the_map_places_classes():
    generator = torch.Generator().manual_seed(0)
    z = torch.randn(400, 5, generator=generator) * 0.1
    labels = torch.arange(400) % 2
    z[:, 3] += labels * 4.0  # the classes differ along one axis only
    coords, share = pca_2d(z)
    assert share[0] > 0.9
    assert coords[labels == 1, 0].mean() > coords[labels == 0, 0].mean()  # sign fixed
    picture = (draw_latent_map(coords, labels, 2) * 255).round().to(torch.uint8)
    xs = {}
    for cls in (0, 1):
        colour = torch.tensor(PALETTE[cls], dtype=torch.uint8)[:, None, None]
        hits = (picture == colour).all(0).nonzero()
        assert len(hits) > 50
        xs[cls] = hits[:, 1].float()
    # Class 1 lies right of class 0 in z, so its dots (not its legend swatch) do too.
    assert xs[1].median() > xs[0].median() + 100


def test_tensorboard_pictures_and_projector(run, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(tmp_path))
    tensorboard_generation(writer, run.nets, run.data, step=7, rows=2, map_points=200,
                           projector_points=50, images_dir=tmp_path / "images")
    writer.close()
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    tags = {f"generation/{name}" for name in (*KINDS, "latent_map")}
    assert tags <= set(events.Tags()["images"])
    assert len(list((tmp_path / "images").glob("latent_map_0000007.png"))) == 1
    projector = tmp_path / "00007" / "z"
    assert "tensor_path" in (tmp_path / "projector_config.pbtxt").read_text()
    rows = (projector / "metadata.tsv").read_text().splitlines()
    assert rows[0] == "label\tpredicted" and len(rows) == 51
    assert [int(r.split("\t")[0]) for r in rows[1:]] == run.data.validation.labels[:50].tolist()
    assert len((projector / "tensors.tsv").read_text().splitlines()) == 50
    with Image.open(projector / "sprite.png") as sprite:
        assert sprite.size == (8 * 28, 8 * 28)  # ceil(sqrt(50)) images a side


def test_projector_of_a_resumed_run_lists_every_step_once(run, tmp_path):
    """A resumed run opens a new writer on the same folder: the projector
    keeps the steps from before the resume, and a step the crashed run wrote
    after its checkpoint is listed once, as written again."""
    from torch.utils.tensorboard import SummaryWriter

    def write(steps):
        writer = SummaryWriter(str(tmp_path))
        for step in steps:
            tensorboard_generation(writer, run.nets, run.data, step=step, rows=1,
                                   map_points=20, projector_points=5)
        writer.close()

    write([5, 7, 9])  # checkpoint at 7, crashed after 9
    write([9, 11])    # resumed at 7
    config = (tmp_path / "projector_config.pbtxt").read_text()
    assert re.findall(r'tensor_name: "z:(\d+)"', config) == ["00005", "00007", "00009", "00011"]


def test_a_torn_projector_index_does_not_stop_a_resume(run, tmp_path, caplog):
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(tmp_path))
    tensorboard_generation(writer, run.nets, run.data, step=5, rows=1, map_points=20, projector_points=5)
    writer.close()
    index = tmp_path / "projector_config.pbtxt"
    index.write_text(index.read_text()[:40])  # a crash while torch rewrote it in place
    writer = SummaryWriter(str(tmp_path))
    tensorboard_generation(writer, run.nets, run.data, step=7, rows=1, map_points=20, projector_points=5)
    writer.close()
    assert "projector_config.pbtxt is unreadable" in caplog.text
    assert re.findall(r'tensor_name: "z:(\d+)"', index.read_text()) == ["00007"]


def test_generation_pictures_fit_a_validation_split_smaller_than_the_grid(run, tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    small = replace(run.data, validation=run.data.validation.subset(torch.arange(3)))
    writer = SummaryWriter(str(tmp_path))
    pictures = tensorboard_generation(writer, run.nets, small, step=1, rows=8, map_points=20,
                                      projector_points=5)
    writer.close()
    assert set(pictures) == {f"generation/{name}" for name in (*KINDS, "latent_map")}


class _ClassPrototypes(torch.nn.Module):
    """A stand-in decoder that draws the mean training image of the class it is given."""

    def __init__(self, data, ignore_class=False):
        super().__init__()
        train = data.train_images()
        means = torch.stack([train.images[train.labels == c].float().mean(0) / 255
                             for c in range(data.num_classes)])
        self.register_buffer("means", means)
        self.ignore_class = ignore_class

    def forward(self, y, z):
        index = torch.zeros_like(y.argmax(1)) if self.ignore_class else y.argmax(1)
        return self.means[index]


def test_generation_consistency_scores_obedient_and_deaf_decoders(run, checker_dir):
    original = run.nets.decoder
    try:
        run.nets.decoder = _ClassPrototypes(run.data)
        obedient = generation_consistency(run.nets, run.data, run.config, "cpu", per_class=20,
                                          checker_dir=checker_dir)
        run.nets.decoder = _ClassPrototypes(run.data, ignore_class=True)
        deaf = generation_consistency(run.nets, run.data, run.config, "cpu", per_class=20,
                                      checker_dir=checker_dir)
    finally:
        run.nets.decoder = original
    assert obedient["generation_checker_accuracy"] > 0.95
    assert obedient["generation_consistency"] > 0.95
    # Always the same class: only that class's share is 1, so the mean is 1/K.
    assert deaf["generation_consistency"] == pytest.approx(0.1)
    assert deaf["generation_consistency_worst_class"] == 0.0
    cached = list(checker_dir.glob("synthetic-*.pt"))
    assert len(cached) == 1  # trained once, then loaded


def test_checker_is_loaded_from_cache_not_retrained(run, checker_dir, monkeypatch):
    import daae.consistency as consistency

    first, accuracy = load_checker(run.data, "synthetic", "cpu", directory=checker_dir)
    monkeypatch.setattr(consistency, "train_checker",
                        lambda *a, **k: pytest.fail("the cached checker was not used"))
    again, cached_accuracy = load_checker(run.data, "synthetic", "cpu", directory=checker_dir)
    assert cached_accuracy == accuracy
    for a, b in zip(first.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)
    metrics = generation_consistency(run.nets, run.data, run.config, "cpu", per_class=10,
                                     checker_dir=checker_dir)
    assert 0.0 <= metrics["generation_consistency"] <= 1.0


def test_a_cached_checker_is_not_reused_for_another_test_set(run, checker_dir, monkeypatch):
    # Its cached accuracy was read on the test set it was trained beside.
    import daae.consistency as consistency

    checker, _ = load_checker(run.data, "synthetic", "cpu", directory=checker_dir)
    trained = []
    monkeypatch.setattr(consistency, "train_checker",
                        lambda *args, **kwargs: trained.append(args) or (checker, 0.5))
    fewer = replace(run.data, test=run.data.test.subset(torch.arange(len(run.data.test) // 2)))
    assert load_checker(fewer, "synthetic", "cpu", directory=checker_dir)[1] == 0.5
    assert len(trained) == 1 and trained[0][1] is fewer.test


def test_a_checker_cache_that_cannot_be_written_costs_a_warning_not_the_metrics(run, tmp_path,
                                                                                monkeypatch, caplog):
    import daae.consistency as consistency

    trained = consistency.Checker(run.data.image_shape[0], run.data.num_classes)
    monkeypatch.setattr(consistency, "train_checker", lambda *a, **k: (trained, 0.5))
    (tmp_path / "a_file").write_text("")  # XDG_CACHE_HOME pointing at a plain file
    model, accuracy = load_checker(run.data, "synthetic", "cpu", directory=tmp_path / "a_file" / "c")
    assert model is trained and accuracy == 0.5
    assert "cannot cache the generation checker at " + str(tmp_path / "a_file" / "c") in caplog.text
    assert "XDG_CACHE_HOME" in caplog.text


def test_a_run_still_in_its_first_stretch_is_named_as_training_not_stopped(run_dir, tmp_path, caplog):
    import fcntl

    folder = _run_without_checkpoint(run_dir, tmp_path)
    commands = (["eval", "--checkpoint", str(folder)],
                ["sample", "--checkpoint", str(folder), "--kind", "random", "--out", str(tmp_path / "x.png")])
    with open(folder / ".daae.lock", "w") as trainer:  # held as daae train holds it
        fcntl.flock(trainer, fcntl.LOCK_EX | fcntl.LOCK_NB)
        for argv in commands:
            assert cli.main(argv) == 2
            assert f"no checkpoint in {folder} yet: it is still training (a live daae process holds " \
                   "its .daae.lock) and writes its first checkpoint after run.checkpoint_every " \
                   "steps (" in caplog.text
            assert "stopped before its first checkpoint" not in caplog.text
            caplog.clear()
    # The trainer gone, the folder is a run that stopped; and the probe left no lock behind.
    assert cli.main(commands[0]) == 2
    assert "stopped before its first checkpoint: start it again" in caplog.text
    with open(folder / ".daae.lock", "w") as next_trainer:
        fcntl.flock(next_trainer, fcntl.LOCK_EX | fcntl.LOCK_NB)
    # A resume holds the lock itself as it looks for the checkpoint: it is no trainer to wait for.
    caplog.clear()
    assert cli.main(["train", "--resume", str(folder)]) == 2
    assert "stopped before its first checkpoint" in caplog.text and "still training" not in caplog.text
