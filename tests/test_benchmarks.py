"""The benchmarks are not tests; these keep them runnable (a few iterations each)."""
import json
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from benchmarks import bench_step, common
from daae.config import load_config

from conftest import SMOKE, tiny_config


def test_bench_step_runs_and_writes_its_result(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "RESULTS", tmp_path)
    assert bench_step.main(["--models", "mlp", "--precisions", "fp32", "--steps", "2",
                            "--repeats", "1", "--images", "600", "--name", "t", "--count-ops",
                            "--set", "model.scale=0.05", "model.adversary_hidden=32"]) == 0
    result = json.loads((tmp_path / "t.json").read_text())
    (row,) = result["rows"]
    assert row["reference_impl_images_per_s"] > 0 and row["daae_fused_images_per_s"] > 0
    # What a GPU step at batch 100 is bound by: the fused step dispatches the fewest operators.
    assert 0 < row["daae_fused_ops_per_step"] < row["daae_reference_ops_per_step"] \
        < row["reference_impl_ops_per_step"]
    assert result["machine"]["cores"] >= 1 and "torch" in result["machine"]


def test_bench_step_runs_daae_options_against_the_plain_original(tmp_path, monkeypatch):
    """The port is the original algorithm: daae's options that widen or multiply
    its networks apply to daae's cases only, not to the port's networks."""
    monkeypatch.setattr(common, "RESULTS", tmp_path)
    assert bench_step.main(["--models", "mlp", "--precisions", "fp32", "--steps", "2",
                            "--repeats", "1", "--images", "600", "--name", "o",
                            "--set", "model.scale=0.05", "model.adversary_hidden=32",
                            "model.class_conditional_prior=true", "model.correlation_classifiers=2",
                            "model.correlation_standardised=true", "train.batch_size=40"]) == 0
    result = json.loads((tmp_path / "o.json").read_text())
    (row,) = result["rows"]
    assert row["reference_impl_images_per_s"] > 0 and row["daae_fused_images_per_s"] > 0
    assert result["batch_size"] == 40 and "2 x 40 per step" in result["note"]


def test_a_failed_cuda_graph_case_keeps_the_eager_figures(tmp_path, monkeypatch):
    """On a GPU bench_step adds the graphed cases; one that fails (here: asked
    for on a CPU, which train.cuda_graph refuses) is recorded, not fatal."""
    monkeypatch.setattr(common, "RESULTS", tmp_path)
    monkeypatch.setattr(bench_step, "graph_cases_run", lambda: True)
    assert bench_step.main(["--models", "mlp", "--precisions", "fp32", "--steps", "2",
                            "--repeats", "1", "--images", "600", "--name", "g",
                            "--set", "model.scale=0.05", "model.adversary_hidden=32"]) == 0
    (row,) = json.loads((tmp_path / "g.json").read_text())["rows"]
    assert row["daae_reference_images_per_s"] > 0 and row["daae_fused_images_per_s"] > 0
    for mode in ("reference_graph", "fused_graph"):
        assert "train.cuda_graph=true needs a CUDA GPU" in row[f"daae_{mode}_error"]
        assert f"speedup_{mode}" not in row


def test_bench_accuracy_records_a_curve_and_the_targets(tmp_path, monkeypatch):
    from benchmarks import bench_accuracy

    monkeypatch.setattr(common, "RESULTS", tmp_path)
    assert bench_accuracy.main(["--config", str(SMOKE), "--set", "train.max_steps=40",
                                "--eval-every", "20", "--targets", "0.0", "1.01",
                                "--budget-s", "600", "--name", "a"]) == 0
    result = json.loads((tmp_path / "a.json").read_text())
    assert [point["step"] for point in result["curve"]] == [20, 40]
    assert result["targets"]["0"]["step"] == 20  # reached at the first evaluation
    assert result["targets"]["1.01"] is None
    assert 0 <= result["final"]["test_accuracy"] <= 1


def _device_session(tmp_path, *args):
    from benchmarks import device_session

    out = tmp_path / "out"
    code = device_session.main(["--data-root", str(tmp_path), "--out", str(out), "--config", str(SMOKE),
                                "--skip-bench", "--seeds", "0", *args])
    return code, out


def test_device_session_trains_every_arm_and_packs_what_comes_back(tmp_path):
    code, out = _device_session(tmp_path, "--arms", "on", "off", "--budget-s", "600",
                                "--set", "train.max_steps=20", "eval.probe_epochs=1")
    assert code == 0
    # What the device returns: files at most two folders down, and no more than 8.
    assert sorted(p.name for p in out.iterdir()) == ["runs.tar.gz", "session.json", "summary.md"]
    summary = (out / "summary.md").read_text()
    assert "| on | 1 |" in summary and "| off | 1 |" in summary
    with tarfile.open(out / "runs.tar.gz") as tar:
        names = tar.getnames()
    for arm in ("on", "off"):
        assert f"runs/{arm}-seed0/metrics.json" in names
        assert f"runs/{arm}-seed0.log" in names
        assert any(n.startswith(f"runs/{arm}-seed0/events.out.tfevents") for n in names)
    assert not any(n.endswith(".pt") for n in names)
    session = json.loads((out / "session.json").read_text())
    assert session["runs"] == {"on-seed0": 0, "off-seed0": 0}
    assert session["machine"]["device"] == "cpu" and session["machine"]["torch"].startswith("2.")
    for term in ("loss.decorrelation=0", "loss.independence=0"):
        assert term in session["commands"]["off-seed0"]
        assert term not in session["commands"]["on-seed0"]


def test_device_session_stops_runs_at_the_deadline_and_evaluates_their_checkpoints(tmp_path):
    from benchmarks import device_session
    from daae.train import train

    # A run killed after its last checkpoint: the checkpoint is there, metrics.json is not.
    # Both class maps on, as the shipped configs have them, and too few codes to fit the
    # Gaussianization: the stopped run's raw figures still count.
    train(tiny_config(tmp_path, "run.name=on-seed0", "train.max_steps=10", "eval.probe_epochs=1",
                      "eval.final_test=false", "eval.class_whitened_probes=true",
                      "eval.class_gaussianized_probes=true"))
    (tmp_path / "on-seed0" / "metrics.json").unlink()
    still_running = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    codes = device_session.wait_for({"on-seed0": still_running}, time.perf_counter() + 0.5)
    assert codes == {"on-seed0": device_session.STOPPED}
    assert still_running.poll() is not None

    stopped = device_session.evaluate_stopped(tmp_path, ["on-seed0"])
    summary = device_session.summarize_arms(["on"], tmp_path, codes, stopped)
    assert "on: no run finished" in summary
    assert "on-seed0: stopped at the deadline; its last checkpoint (step 10): test error" in summary
    written = json.loads((tmp_path / "on-seed0" / device_session.STOPPED_METRICS).read_text())
    assert written["step"] == 10 and 0 <= written["test_accuracy"] <= 1
    assert "probe_accuracy" in written and not any(key.startswith("class_") for key in written)


def test_device_session_refuses_a_data_root_without_mnist(tmp_path, capsys):
    from benchmarks import device_session

    with pytest.raises(SystemExit):
        device_session.main(["--data-root", str(tmp_path), "--out", str(tmp_path / "o"),
                             "--skip-bench"])
    assert "holds no train-images-idx3-ubyte.gz" in capsys.readouterr().err


def test_device_session_stops_a_benchmark_and_everything_it_started(tmp_path):
    from benchmarks import device_session

    # A benchmark that started a helper of its own (as bench_tune starts Ray), both still running.
    leader = subprocess.Popen(["sh", "-c", "sleep 600 & sleep 600"], start_new_session=True)
    time.sleep(0.5)
    device_session.stop_group(leader, grace_s=5)
    assert leader.poll() is not None
    deadline = time.monotonic() + 10  # SIGKILL is sent; on a loaded machine dying takes a moment
    while _running_in_group(leader.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _running_in_group(leader.pid) == []


def _running_in_group(pgid: int) -> list[int]:
    """Live processes of a process group (zombies, which an init that does not
    reap leaves behind, are dead)."""
    alive = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            alive.append(int(stat.parent.name))
    return alive


def test_device_session_refuses_bench_tune_without_ray(tmp_path, capsys, monkeypatch):
    import importlib.util

    from benchmarks import device_session

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name == "ray" else find_spec(name, *args))
    with pytest.raises(SystemExit):
        device_session.main(["--data-root", str(tmp_path), "--out", str(tmp_path / "o"), "--config",
                             str(SMOKE), "--skip-bench", "--tune-concurrency", "1", "8"])
    assert "--tune-concurrency needs Ray, which this Python cannot import" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # refused before anything started


def test_device_session_refuses_tune_trials_that_do_not_match_the_levels(tmp_path, capsys):
    from benchmarks import device_session

    with pytest.raises(SystemExit):
        device_session.main(["--data-root", str(tmp_path), "--out", str(tmp_path / "o"), "--config",
                             str(SMOKE), "--skip-bench", "--tune-concurrency", "1", "8",
                             "--tune-trials", "2", "8", "8"])
    assert "--tune-trials: give one number, or one per --tune-concurrency level (2), not 3" in \
        capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_the_documented_device_calls_parse():
    """A lease is minutes long: a typo in a prepared command must fail here."""
    import shlex

    from benchmarks import device_session

    root = Path(__file__).resolve().parents[1]
    # benchmarks/README.md's prepared calls, and docs/results.md's record of those that ran.
    text = "\n".join((root / name).read_text() for name in ("benchmarks/README.md", "docs/results.md"))
    calls = [line.split("benchmarks.device_session", 1)[1] for line in text.replace("\\\n", " ").splitlines()
             if "python3 -m benchmarks.device_session --" in line]
    assert len(calls) >= 4
    for call in calls:
        args = device_session.build_parser().parse_args(shlex.split(call.replace("$OUT", "out")))
        assert args.data_root == ".device/mnist" and (root / args.config).is_file()
        load_config(root / args.config, args.set)  # every --set key exists and fits
