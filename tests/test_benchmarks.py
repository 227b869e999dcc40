"""The benchmarks are not tests; these keep them runnable (a few iterations each)."""
import json

from benchmarks import bench_step, common


def test_bench_step_runs_and_writes_its_result(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "RESULTS", tmp_path)
    assert bench_step.main(["--models", "mlp", "--precisions", "fp32", "--steps", "2",
                            "--repeats", "1", "--images", "600", "--name", "t",
                            "--set", "model.scale=0.05", "model.adversary_hidden=32"]) == 0
    result = json.loads((tmp_path / "t.json").read_text())
    (row,) = result["rows"]
    assert row["reference_impl_images_per_s"] > 0 and row["daae_fused_images_per_s"] > 0
    assert result["machine"]["cores"] >= 1 and "torch" in result["machine"]
