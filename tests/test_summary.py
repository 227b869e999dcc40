"""`daae summary`: the mean ± std row of a results table, from finished runs."""
import json

import pytest

from daae.cli import main


def _finished_run(folder, accuracy, adversary, *, final_test=True, floor=None, run_seconds=None,
                  whitened=None, resumes=None):
    folder.mkdir()
    metrics = {"step": 1500, "epoch": 3.0, "train_seconds": 300.0, "run_train_seconds": run_seconds,
               "validation": {"accuracy": accuracy - 0.01}}
    if final_test:
        metrics["test"] = {"accuracy": accuracy, "adversary_accuracy": adversary,
                           "probe_accuracy": 0.5, "linear_probe_accuracy": 0.3, "recon_mse": 0.03}
        if floor is not None:
            metrics["test"]["adversary_floor"] = floor
        if whitened is not None:
            metrics["test"]["class_whitened_probe_accuracy"] = whitened
            metrics["test"]["class_whitened_linear_probe_accuracy"] = whitened - 0.01
    if resumes is not None:  # written by daae train since it counts them
        metrics["resumes"] = resumes
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


def test_summary_shows_class_whitened_probes_only_when_runs_report_them(tmp_path, capsys):
    plain = [_finished_run(tmp_path / f"p{i}", 0.98, 0.12) for i in range(2)]
    assert main(["summary", *plain]) == 0
    assert "class-whitened" not in capsys.readouterr().out
    whitened = [_finished_run(tmp_path / f"w{i}", 0.98, 0.12, whitened=w) for i, w in enumerate([0.11, 0.13])]
    assert main(["summary", *whitened, "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["class-whitened probe %"]["mean"] == pytest.approx(12.0)
    assert summary["class-whitened linear probe %"]["values"] == pytest.approx([10.0, 12.0])
    assert main(["summary", *whitened, "--label", "w"]) == 0
    header, _, row = capsys.readouterr().out.splitlines()[-3:]
    assert "| linear probe % | class-whitened probe % | class-whitened linear probe % | recon mse |" in header
    assert "| 30.00 ± 0.00 | 12.00 ± 1.41 | 11.00 ± 1.41 |" in row
    # A run without them (trained before the key, or its whitening failed): "–".
    assert main(["summary", *whitened, plain[0], "--label", "mixed"]) == 0
    header, _, row = capsys.readouterr().out.splitlines()[-3:]
    assert "| class-whitened probe % | class-whitened linear probe % |" in header
    assert "| 30.00 ± 0.00 | – | – |" in row


def test_summary_names_an_unfinished_run_and_missing_test_metrics(tmp_path, caplog):
    done = _finished_run(tmp_path / "done", 0.9, 0.1)
    (tmp_path / "crashed").mkdir()
    assert main(["summary", done, str(tmp_path / "crashed")]) == 2
    assert "crashed/metrics.json not found" in caplog.text

    (tmp_path / "torn").mkdir()
    (tmp_path / "torn" / "metrics.json").write_text('{"step": 15')
    assert main(["summary", done, str(tmp_path / "torn")]) == 2
    assert "torn/metrics.json is not valid JSON" in caplog.text
    # daae eval prints its figures and leaves metrics.json as it is: only training writes it.
    assert f"resume the run to write it again (daae train --resume {tmp_path / 'torn'})" in caplog.text

    no_test = _finished_run(tmp_path / "no_test", 0.9, 0.1, final_test=False)
    assert main(["summary", no_test]) == 2
    assert "no test/accuracy (the run had eval.final_test=false): read its test figures with " \
           f"daae eval --checkpoint {no_test} --split test, or compare the runs on validation with " \
           "daae summary RUN ... --at 1500" in caplog.text


def test_summary_names_a_malformed_metrics_or_resumes_file_and_the_fix(tmp_path, caplog):
    def run(name, metrics=None, resumes=None):
        folder = tmp_path / name
        _finished_run(folder, 0.9, 0.1)
        if metrics is not None:
            (folder / "metrics.json").write_text(metrics)
        if resumes is not None:
            (folder / "resumes.yaml").write_text(resumes)
        return str(folder)

    for folder, message in (
            (run("list", metrics="[1, 2]"), "list/metrics.json holds a list, not the mapping of metrics "
                                             "daae train writes: resume the run to write it again "
                                             f"(daae train --resume {tmp_path / 'list'})"),
            (run("yaml", resumes="- step: [1\n"), "yaml/resumes.yaml should be a list of resumes "
                                                  "(step, changed), as daae writes it, but it is not valid YAML"),
            (run("entry", resumes="- 5\n"), "entry/resumes.yaml should be a list of resumes (step, changed), "
                                            "as daae writes it, but it holds 5, which is not a resume with its step; "
                                            "restore it, or move it aside to summarize"),
            (run("mapping", resumes="step: 5\n"), "mapping/resumes.yaml should be a list of resumes"),
            (run("no_step", metrics='{"validation": {}}', resumes="- step: 5\n  changed: {}\n"),
             "no_step/metrics.json has no step, which daae train writes: resume the run"),
            (run("split", metrics='{"step": 5, "test": [0.9], "validation": {}}'),
             "split/metrics.json: its test holds a list, not the mapping of metrics daae train writes")):
        assert main(["summary", folder]) == 2, folder
        assert message in caplog.text
        caplog.clear()


def test_summary_refuses_one_run_named_twice(tmp_path, caplog):
    # Counted twice, one run would pass for two seeds that agree exactly.
    run = _finished_run(tmp_path / "r", 0.9, 0.1)
    other = _finished_run(tmp_path / "other", 0.8, 0.1)
    for twice in ([run, other, run + "/"], [run, str(tmp_path / "other" / ".." / "r")]):
        assert main(["summary", *twice]) == 2
        assert "are the same run folder, which would count as two runs" in caplog.text
        caplog.clear()
    assert main(["summary", run, run, "--at", "0"]) == 2  # and over TensorBoard's evaluations
    assert "are the same run folder" in caplog.text


def test_summary_refuses_a_run_resumed_past_its_metrics_until_it_finishes(tmp_path, caplog, capsys):
    import os

    run = _finished_run(tmp_path / "going_on", 0.9, 0.1)  # metrics.json of step 1500
    (tmp_path / "going_on" / "resumes.yaml").write_text("- step: 1500\n  changed: {}\n")
    assert main(["summary", run]) == 2
    assert "resumed at step 1500 and has not finished since: its metrics.json is from step 1500" in caplog.text

    # Resumed at 1000 and finished at 1500: copies may give resumes.yaml the later time.
    done = _finished_run(tmp_path / "done", 0.9, 0.1)
    resumes = tmp_path / "done" / "resumes.yaml"
    resumes.write_text("- step: 1000\n  changed: {}\n")
    later = (tmp_path / "done" / "metrics.json").stat().st_mtime_ns + 10**9
    os.utime(resumes, ns=(later, later))
    assert main(["summary", done]) == 0


def test_summary_tells_a_finished_resume_from_a_running_one_in_a_copied_folder(tmp_path, caplog):
    import os

    def copied(name, counted, newer):
        """A run resumed once, at step 1500, as `cp -r` may leave it: ``newer``,
        the file it copied last, has the later time."""
        run = _finished_run(tmp_path / name, 0.9, 0.1, resumes=counted)
        (tmp_path / name / "resumes.yaml").write_text("- step: 1500\n  changed: {}\n")
        later = (tmp_path / name / "metrics.json").stat().st_mtime_ns + 10**9
        os.utime(tmp_path / name / newer, ns=(later, later))
        return run

    # Resumed at its last step (to evaluate again) and finished: the copy made
    # resumes.yaml the newer file.
    assert main(["summary", copied("finished", 1, "resumes.yaml")]) == 0
    # Resumed and still running when copied, its metrics.json the newer file.
    assert main(["summary", copied("running", 0, "metrics.json")]) == 2
    assert "running was resumed at step 1500 and has not finished since" in caplog.text


def _logged_run(folder, accuracy_by_step, adversary=0.12, probes=True, whitened=False):
    """A run folder with the validation scalars training writes at each evaluation."""
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(folder))
    for step, accuracy in accuracy_by_step.items():
        writer.add_scalar("val/accuracy", accuracy, step)
        writer.add_scalar("decorrelation/val/adversary_accuracy", adversary, step)
        if probes:
            writer.add_scalar("decorrelation/val/probe_accuracy", 0.15, step)
            writer.add_scalar("decorrelation/val/linear_probe_accuracy", 0.10, step)
        if whitened:
            writer.add_scalar("decorrelation/val/class_whitened_probe_accuracy", 0.11, step)
            writer.add_scalar("decorrelation/val/class_whitened_linear_probe_accuracy", 0.105, step)
    writer.close()
    return str(folder)


def test_summary_at_steps_reads_validation_from_unfinished_runs(tmp_path, capsys):
    runs = [_logged_run(tmp_path / "s0", {100: 0.90, 200: 0.94}, adversary=0.10),
            _logged_run(tmp_path / "s1", {100: 0.92, 200: 0.98}, adversary=0.14)]
    assert main(["summary", *runs, "--at", "100", "200", "--json"]) == 0
    at100, at200 = json.loads(capsys.readouterr().out)
    assert (at100["first_step"], at100["last_step"], at100["evaluations"]) == (100, 100, [1, 1])
    assert at100["validation accuracy %"]["values"] == pytest.approx([90.0, 92.0])
    assert at200["validation accuracy %"]["mean"] == pytest.approx(96.0)
    assert at200["validation adversary %"]["mean"] == pytest.approx(12.0)
    assert at200["validation MLP probe %"]["mean"] == pytest.approx(15.0)

    # A run trained without eval.probes_during_training has no probe curves: "–".
    runs.append(_logged_run(tmp_path / "s2", {100: 0.91, 200: 0.96}, probes=False))
    assert main(["summary", *runs, "--at", "200", "--label", "P100"]) == 0
    row = capsys.readouterr().out.splitlines()[-1]
    assert row.startswith("| P100 | 3 | 200 | 96.00 ± 2.00 (94.00 / 98.00 / 96.00) |")
    assert row.endswith("| – | – |") and "class-whitened" not in capsys.readouterr().out

    # Runs trained with eval.class_whitened_probes: the whitened pair's columns follow.
    whitened = [_logged_run(tmp_path / f"w{i}", {200: 0.96}, whitened=True) for i in range(2)]
    assert main(["summary", *whitened, "--at", "200", "--label", "P100"]) == 0
    header, _, row = capsys.readouterr().out.splitlines()[-3:]
    assert header.endswith("| validation class-whitened MLP probe % | validation class-whitened linear probe % |")
    assert row.endswith("| 11.00 ± 0.00 (11.00 / 11.00) | 10.50 ± 0.00 (10.50 / 10.50) |")


def test_summary_between_averages_each_runs_evaluations_in_the_window(tmp_path, capsys):
    runs = [_logged_run(tmp_path / "s0", {100: 0.50, 200: 0.90, 300: 0.94, 400: 0.10}),
            _logged_run(tmp_path / "s1", {200: 0.96, 300: 0.98})]
    assert main(["summary", *runs, "--between", "150", "350", "--json"]) == 0
    (window,) = json.loads(capsys.readouterr().out)
    assert window["evaluations"] == [2, 2]
    assert window["validation accuracy %"]["values"] == pytest.approx([92.0, 97.0])


def test_summary_between_says_when_a_column_rests_on_fewer_evaluations(tmp_path, capsys):
    from torch.utils.tensorboard import SummaryWriter

    # Probes at the final evaluation only (no probes during training).
    run = _logged_run(tmp_path / "s0", {100: 0.90, 200: 0.94, 300: 0.96}, probes=False)
    writer = SummaryWriter(run)
    writer.add_scalar("decorrelation/val/probe_accuracy", 0.2, 300)
    writer.close()
    assert main(["summary", run, "--between", "100", "300", "--json"]) == 0
    (window,) = json.loads(capsys.readouterr().out)
    assert window["evaluations"] == [3] and window["validation MLP probe %"]["evaluations"] == [1]
    assert main(["summary", run, "--between", "100", "300"]) == 0
    assert "| 20.00 [at 1 of 3 evaluations] |" in capsys.readouterr().out


def test_summary_at_steps_names_what_is_missing(tmp_path, caplog):
    run = _logged_run(tmp_path / "s0", {1000: 0.9, 2000: 0.95})
    assert main(["summary", run, "--at", "1500"]) == 2
    assert "s0: no validation evaluation at step 1500 (evaluated at steps 1000-2000" in caplog.text
    assert main(["summary", run, "--between", "2500", "3000"]) == 2
    assert "no validation evaluation at steps 2500-3000" in caplog.text
    assert main(["summary", run, "--between", "2000", "1000"]) == 2
    assert "expected 0 <= FIRST <= LAST" in caplog.text
    assert main(["summary", run, "--between", "-5", "-5"]) == 2  # the flag given, not --at
    assert "--between -5 -5: expected 0 <= FIRST <= LAST" in caplog.text
    assert main(["summary", run, "--at", "1000", "-5"]) == 2
    assert "--at -5: expected a step >= 0" in caplog.text

    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(tmp_path / "starting"))  # a run that has logged losses only
    writer.add_scalar("loss/reconstruction", 0.1, 50)
    writer.close()
    assert main(["summary", str(tmp_path / "starting"), "--at", "1000"]) == 2
    assert "starting: never evaluated yet" in caplog.text

    _logged_run(tmp_path / "s1", {1000: 0.9})
    assert main(["summary", str(tmp_path), "--at", "1000"]) == 2
    assert "holds the events of 2 runs (s0, s1): name each run folder" in caplog.text
