"""`daae curves`: TensorBoard scalars exported as a PNG of line plots."""
import numpy as np
import pytest
from PIL import Image
from torch.utils.tensorboard import SummaryWriter

from daae.cli import main
from daae.curves import PANEL_HEIGHT, PANEL_WIDTH, read_scalars
from daae.latent_map import class_colour


@pytest.fixture
def two_runs(tmp_path):
    for name, accuracy in (("a", [0.2, 0.5, 0.9]), ("b", [0.1, 0.3, 0.4])):
        writer = SummaryWriter(str(tmp_path / "search" / name))
        for step, value in zip((100, 200, 300), accuracy):
            writer.add_scalar("val/accuracy", value, step)
            writer.add_scalar("decorrelation/val/adversary_accuracy", 1 - value, step)
        writer.close()
    return tmp_path / "search"


def test_reads_every_run_under_the_folder(two_runs):
    runs = read_scalars(two_runs, ["val/accuracy"])
    assert set(runs) == {"a", "b"}
    assert runs["a"]["val/accuracy"] == [(100, pytest.approx(0.2)), (200, pytest.approx(0.5)),
                                         (300, pytest.approx(0.9))]


def test_cli_draws_one_panel_per_tag_and_one_colour_per_run(two_runs, tmp_path):
    out = tmp_path / "curves.png"
    assert main(["curves", "--logdir", str(two_runs), "--out", str(out)]) == 0
    pixels = np.asarray(Image.open(out).convert("RGB"))
    assert pixels.shape[1] == PANEL_WIDTH and pixels.shape[0] > 2 * PANEL_HEIGHT
    for run in range(2):  # both runs' lines are drawn in both panels
        colour = np.array(class_colour(run))
        for panel in range(2):
            rows = pixels[panel * PANEL_HEIGHT:(panel + 1) * PANEL_HEIGHT]
            assert (rows == colour).all(-1).sum() > 50


def test_bad_input_exits_2_and_writes_nothing(two_runs, tmp_path, caplog):
    out = tmp_path / "x.png"
    assert main(["curves", "--logdir", str(tmp_path / "missing"), "--out", str(out)]) == 2
    assert main(["curves", "--logdir", str(two_runs), "--tags", "no/such", "--out", str(out)]) == 2
    assert main(["curves", "--logdir", str(two_runs), "--out", str(tmp_path / "x.jpg")]) == 2
    assert not out.exists()
    assert "no/such" in caplog.text and "missing: no such folder" in caplog.text


def test_a_run_with_non_finite_values_is_drawn_without_them(two_runs, tmp_path):
    writer = SummaryWriter(str(two_runs / "diverged"))
    for step, value in ((100, 0.3), (200, float("nan")), (300, float("inf")), (400, 0.6)):
        writer.add_scalar("val/accuracy", value, step)
    writer.close()
    out = tmp_path / "curves.png"
    assert main(["curves", "--logdir", str(two_runs), "--tags", "val/accuracy", "--out", str(out)]) == 0
    pixels = np.asarray(Image.open(out).convert("RGB"))
    for run in range(3):  # a, b and diverged, in that order: each line is drawn
        assert (pixels[:PANEL_HEIGHT] == np.array(class_colour(run))).all(-1).sum() > 20


def test_an_out_path_it_cannot_write_exits_2_with_the_fix(two_runs, tmp_path, caplog, monkeypatch):
    import errno

    import daae.atomic

    (tmp_path / "folder.png").mkdir()
    (tmp_path / "a_file").write_text("")
    for out, message in ((tmp_path / "folder.png", "is a folder; name a .png file inside it"),
                         (tmp_path / "a_file" / "sub" / "x.png", "a_file is a file, not a folder")):
        assert main(["curves", "--logdir", str(two_runs), "--out", str(out)]) == 2
        assert message in caplog.text
    assert list((tmp_path / "folder.png").iterdir()) == []

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(daae.atomic, "atomic_write", full_disk)
    assert main(["curves", "--logdir", str(two_runs), "--out", str(tmp_path / "x.png")]) == 2
    assert "cannot write " + str(tmp_path / "x.png") + ": [Errno 28] No space left on device" in caplog.text


def test_a_run_without_the_tags_is_named_as_left_out(two_runs, tmp_path, caplog):
    writer = SummaryWriter(str(two_runs / "starting"))  # a run that has logged losses only
    writer.add_scalar("loss/reconstruction", 0.1, 50)
    writer.close()
    assert main(["curves", "--logdir", str(two_runs), "--tags", "val/accuracy",
                 "--out", str(tmp_path / "x.png")]) == 0
    assert "starting left out: its event files hold none of val/accuracy" in caplog.text
    assert "a left out" not in caplog.text and "b left out" not in caplog.text
