"""`daae summary`: the mean ± std row of a results table, from finished runs."""
import json

import pytest

from daae.cli import main


def _finished_run(folder, accuracy, adversary, *, final_test=True, floor=None, run_seconds=None):
    folder.mkdir()
    metrics = {"step": 1500, "epoch": 3.0, "train_seconds": 300.0, "run_train_seconds": run_seconds,
               "validation": {"accuracy": accuracy - 0.01}}
    if final_test:
        metrics["test"] = {"accuracy": accuracy, "adversary_accuracy": adversary,
                           "probe_accuracy": 0.5, "linear_probe_accuracy": 0.3, "recon_mse": 0.03}
        if floor is not None:
            metrics["test"]["adversary_floor"] = floor
    (folder / "metrics.json").write_text(json.dumps(metrics))
    return str(folder)


def test_summary_gives_mean_and_sample_std_over_seeds(tmp_path, capsys):
    runs = [_finished_run(tmp_path / f"s{i}", accuracy, adversary)
            for i, (accuracy, adversary) in enumerate([(0.98, 0.08), (0.97, 0.12), (0.99, 0.10)])]

    assert main(["summary", *runs, "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["runs"] == 3
    assert summary["test error %"]["mean"] == pytest.approx(2.0)
    assert summary["test error %"]["std"] == pytest.approx(1.0)
    assert summary["adversary %"]["mean"] == pytest.approx(10.0)
    assert summary["adversary %"]["std"] == pytest.approx(2.0)
    assert summary["validation accuracy %"]["mean"] == pytest.approx(97.0)

    assert main(["summary", *runs, "--label", "P100 on"]) == 0
    row = capsys.readouterr().out.splitlines()[-1]
    assert row.startswith("| P100 on | 3 | 2.00 ± 1.00 | 10.00 ± 2.00 |")


def test_summary_shows_what_runs_before_a_metric_lack_as_a_dash(tmp_path, capsys):
    runs = [_finished_run(tmp_path / f"s{i}", 0.98, 0.12, floor=floor, run_seconds=seconds)
            for i, (floor, seconds) in enumerate([(0.1135, 900.0), (0.1145, 1100.0)])]
    assert main(["summary", *runs, "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["adversary floor %"]["mean"] == pytest.approx(11.40)
    assert summary["run training s"]["mean"] == pytest.approx(1000.0)
    assert summary["training s"]["mean"] == pytest.approx(300.0)

    older = _finished_run(tmp_path / "older", 0.98, 0.12)
    assert main(["summary", *runs, older, "--label", "mixed"]) == 0
    row = capsys.readouterr().out.splitlines()[-1]
    assert row.startswith("| mixed | 3 | 2.00 ± 0.00 | 12.00 ± 0.00 | – | 50.00 ± 0.00 |")
    assert row.endswith("| 300 ± 0 | – |")


def test_summary_names_an_unfinished_run_and_missing_test_metrics(tmp_path, caplog):
    done = _finished_run(tmp_path / "done", 0.9, 0.1)
    (tmp_path / "crashed").mkdir()
    assert main(["summary", done, str(tmp_path / "crashed")]) == 2
    assert "crashed/metrics.json not found" in caplog.text

    no_test = _finished_run(tmp_path / "no_test", 0.9, 0.1, final_test=False)
    assert main(["summary", no_test]) == 2
    assert "no test/accuracy (the run had eval.final_test=false)" in caplog.text
