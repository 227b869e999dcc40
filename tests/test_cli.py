import json
import os
import re
import subprocess
import sys

import pytest

from daae.cli import main

from conftest import SMOKE


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    code = main(["train", "--config", str(SMOKE), f"run.dir={root}", "run.name=r",
                 "train.max_steps=40", "run.progress_bar=false", "eval.final_test=false",
                 "eval.probe_epochs=1"])
    assert code == 0
    return root / "r"


def test_eval_prints_the_metrics_as_one_json_object(trained_run, tmp_path):
    # The generation-consistency checker is cached under XDG_CACHE_HOME.
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path))
    done = subprocess.run([sys.executable, "-m", "daae", "eval", "--checkpoint", str(trained_run),
                           "--json", "eval.probe_epochs=1"], capture_output=True, text=True,
                          timeout=300, env=env)
    assert done.returncode == 0, done.stderr
    metrics = json.loads(done.stdout)
    for key in ("test_accuracy", "adversary_accuracy", "probe_accuracy", "linear_probe_accuracy",
                "recon_mse", "z_mean", "z_std", "y_marginal_entropy", "labelled_accuracy",
                "cluster_accuracy", "generation_consistency"):
        assert isinstance(metrics[key], float), key
    assert list(tmp_path.glob("daae/classifiers/synthetic-*.pt"))
    assert metrics["test_accuracy"] > 0.3 and metrics["step"] == 40


def test_train_into_a_redirected_log_draws_no_progress_bar(tmp_path):
    # The bar is on by default; on a pipe (a cluster job's log) it would add a
    # line per refresh.
    done = subprocess.run([sys.executable, "-m", "daae", "train", "--config", str(SMOKE),
                           f"run.dir={tmp_path}", "run.name=piped", "train.max_steps=20",
                           "eval.final_test=false", "eval.probe_epochs=1"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "piped" / "checkpoints" / "last.pt").is_file()
    assert "it/s" not in done.stderr and "train:" not in done.stderr, done.stderr[-2000:]


def test_resume_continues_from_the_run_folder(trained_run):
    assert main(["train", "--resume", str(trained_run), "train.max_steps=50"]) == 0
    metrics = json.loads((trained_run / "metrics.json").read_text())
    assert metrics["step"] == 50
    assert metrics["resumes"] == 1  # resumes.yaml's entries when it was written (daae summary)


def test_user_errors_exit_2_with_a_message(tmp_path, caplog):
    assert main(["train", "--config", str(SMOKE), "loss.decorrelation=-1"]) == 2
    assert "loss.decorrelation" in caplog.text
    assert main(["eval", "--checkpoint", str(tmp_path)]) == 2
    assert "not a daae run folder" in caplog.text
    (tmp_path / "a_file").write_text("")
    assert main(["train", "--config", str(SMOKE), f"run.dir={tmp_path / 'a_file'}"]) == 2
    assert "a_file is a file, not a folder: choose another run.dir" in caplog.text


def test_reading_a_run_as_another_model_names_the_key(trained_run, caplog):
    assert main(["eval", "--checkpoint", str(trained_run), "model.z_dim=7"]) == 2
    assert "does not fit: model.z_dim is 7 here" in caplog.text


def test_a_device_this_torch_cannot_use_is_named(trained_run, caplog):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert main(["eval", "--checkpoint", str(trained_run), "--device", "cuda"]) == 2
    assert "--device cuda: this PyTorch sees no CUDA GPU; use --device cpu" in caplog.text
    assert main(["sample", "--checkpoint", str(trained_run), "--kind", "random", "--device", "gpu",
                 "--out", str(trained_run.parent / "never.png")]) == 2
    assert "--device gpu: not a device name" in caplog.text


def test_a_diverged_run_exits_2_with_the_fix_not_a_traceback(tmp_path, caplog):
    run = ["train", "--config", str(SMOKE), f"run.dir={tmp_path}", "run.name=r",
           "run.progress_bar=false", "eval.final_test=false", "eval.probe_epochs=1"]
    assert main([*run, "train.max_steps=10"]) == 0
    assert main(["train", "--resume", str(tmp_path / "r"), "train.max_steps=40",
                 "train.lr=1e38"]) == 2
    assert re.search(r"non-finite at step 1\d .*last good checkpoint.*lower train\.lr", caplog.text)


def test_eval_refuses_overrides_that_redraw_the_splits(trained_run, caplog):
    # Another seed or split seed draws other labelled images and another
    # validation split: the figures would be read on images the run trained on.
    assert main(["eval", "--checkpoint", str(trained_run), "data.split_seed=1"]) == 2
    assert "trained on other splits: data.split_seed is 1 here" in caplog.text


@pytest.mark.parametrize("command, function, argv", [
    ("eval", "daae.evaluate.evaluate_run", ["--checkpoint", "r"]),
    ("sample", "daae.sample.write_sample", ["--checkpoint", "r", "--kind", "random", "--out", "x.png"]),
    ("summary", "daae.summary.summarize", ["r"]),
    ("curves", "daae.curves.write_curves", ["--logdir", "r", "--out", "x.png"]),
])
def test_ctrl_c_in_a_reading_command_exits_130_with_one_line(command, function, argv, monkeypatch,
                                                            caplog):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(function, interrupted)
    try:
        code = main([command, *argv])
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C came out as a KeyboardInterrupt traceback")
    assert code == 130
    assert f"daae {command} interrupted; no file was left half-written" in caplog.text
