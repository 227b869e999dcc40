"""The benchmarks are not tests; these keep them runnable (a few iterations each)."""
import json

from benchmarks import bench_step, common

from conftest import SMOKE


def test_bench_step_runs_and_writes_its_result(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "RESULTS", tmp_path)
    assert bench_step.main(["--models", "mlp", "--precisions", "fp32", "--steps", "2",
                            "--repeats", "1", "--images", "600", "--name", "t",
                            "--set", "model.scale=0.05", "model.adversary_hidden=32"]) == 0
    result = json.loads((tmp_path / "t.json").read_text())
    (row,) = result["rows"]
    assert row["reference_impl_images_per_s"] > 0 and row["daae_fused_images_per_s"] > 0
    assert result["machine"]["cores"] >= 1 and "torch" in result["machine"]


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
