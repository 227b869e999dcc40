"""Searches end to end on Ray with synthetic data and tiny models: the smoke
search, a trial that crashes once, an interrupted search that resumes, and the
checks that must fail before any trial starts."""
import csv
import os
import json
import shutil
import tempfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

ray = pytest.importorskip("ray")

from daae.cli import main as daae_main  # noqa: E402
from tune.cli import main as tune_main  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SMOKE = str(ROOT / "configs" / "tune" / "smoke.yaml")
# Shorter than the shipped smoke search, same path through the code.
QUICK = ["overrides.train.max_steps=40", "overrides.eval.probe_train_size=500"]
FIXED = ["space.loss.adversarial_z={choice: [1.0]}", "space.train.lr={choice: [0.001]}"]


@pytest.fixture(scope="module")
def ray_session():
    # A short path: Ray's socket paths must stay under the Unix limit. HOME
    # too, so Ray's session files and auth token stay out of the real one.
    root = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RAY_TMPDIR", str(root))
        patch.setenv("HOME", str(root / "home"))
        patch.delenv("RAY_ADDRESS", raising=False)
        (root / "home").mkdir()
        ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
        try:
            yield
        finally:
            ray.shutdown()
            shutil.rmtree(root, ignore_errors=True)


def read_rows(experiment: Path) -> list[dict]:
    with open(experiment / "trials.csv") as handle:
        return list(csv.DictReader(handle))


def results(trial_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (trial_dir / "result.json").read_text().splitlines()]


def trial_dirs(experiment: Path) -> list[Path]:
    return sorted(p for p in experiment.iterdir() if (p / "params.json").is_file())


def test_smoke_search_end_to_end(ray_session, tmp_path, capsys):
    rc = tune_main(["--config", SMOKE, f"storage_path={tmp_path}", "num_samples=3", *QUICK])
    assert rc == 0
    experiment = tmp_path / "smoke"
    trials = trial_dirs(experiment)
    assert len(trials) == 3
    for trial in trials:
        reports = results(trial)
        assert reports, trial
        assert all(r["step"] % 20 == 0 and "score" in r and "meets_target" in r for r in reports)
        assert list(trial.glob("events.out.tfevents.*.hparams"))  # the hparams view
        assert [p for p in trial.glob("events.out.tfevents.*") if not p.name.endswith(".hparams")]
    rows = read_rows(experiment)
    assert [int(r["rank"]) for r in rows] == [1, 2, 3]
    assert {"loss.decorrelation", "loss.adversarial_z", "train.lr", "accuracy",
            "adversary_accuracy", "probe_accuracy", "score", "meets_target"} <= set(rows[0])
    finished = [r for r in rows if r["status"] == "finished"]
    assert finished and rows[0]["status"] == "finished"
    assert [float(r["score"]) for r in finished] == sorted((float(r["score"]) for r in finished),
                                                          reverse=True)
    for row in finished:
        assert row["probe_accuracy"] and int(row["step"]) == 40
    markdown = (experiment / "trials.md").read_text()
    assert markdown.count("\n") == 2 + 3 and markdown in capsys.readouterr().out

    # The best configuration is a plain trainer config that `daae train` runs.
    best = experiment / "best_config.yaml"
    config = yaml.safe_load(best.read_text())
    best_row = rows[0]
    assert config["train"]["lr"] == pytest.approx(float(best_row["train.lr"]))
    assert config["eval"]["final_test"] is True  # trials never looked at test; a real run may
    assert daae_main(["train", "--config", str(best), f"run.dir={tmp_path / 'runs'}", "run.name=best",
                      "train.max_steps=5", "eval.probe_epochs=1"]) == 0
    metrics = json.loads((tmp_path / "runs" / "best" / "metrics.json").read_text())
    assert metrics["step"] == 5 and "test" in metrics


def test_trial_crashing_once_resumes_from_its_checkpoint(ray_session, tmp_path):
    rc = tune_main(["--config", SMOKE, f"storage_path={tmp_path}", "num_samples=1",
                    "scheduler.kind=none", "max_failures=1", "fault_injection.crash_once_at_step=20",
                    "space.loss.decorrelation={choice: [0.5]}", *FIXED, *QUICK])
    assert rc == 0
    (trial,) = trial_dirs(tmp_path / "smoke")
    assert (trial / ".fault_injection_crashed").read_text() == "20"  # it did crash, at step 20
    reports = results(trial)
    last = reports[-1]
    assert last["final"] and last["step"] == 40
    assert last["resumed_from_step"] == 20
    # The retry continued the trainer from step 20 rather than starting over:
    # its own event file (one per attempt) holds nothing at or before step 20.
    attempts = sorted((p for p in trial.glob("events.out.tfevents.*") if not p.name.endswith(".hparams")),
                      key=lambda p: p.stat().st_mtime)
    assert len(attempts) == 2
    retry = EventAccumulator(str(attempts[-1]))
    retry.Reload()
    steps = {event.step for tag in retry.Tags()["scalars"] for event in retry.Scalars(tag)}
    assert steps and min(steps) > 20
    (row,) = read_rows(tmp_path / "smoke")
    assert row["status"] == "finished" and int(row["step"]) == 40


def test_trial_crash_without_retries_is_reported_as_an_error(ray_session, tmp_path):
    rc = tune_main(["--config", SMOKE, f"storage_path={tmp_path}", "num_samples=1",
                    "scheduler.kind=none", "max_failures=0", "fault_injection.crash_once_at_step=20",
                    "space.loss.decorrelation={choice: [0.5]}", *FIXED, *QUICK])
    assert rc == 0
    (row,) = read_rows(tmp_path / "smoke")
    assert row["status"] == "error" and int(row["step"]) == 20
    assert not (tmp_path / "smoke" / "best_config.yaml").exists()


def test_interrupted_search_resumes_without_rerunning_finished_trials(ray_session, tmp_path):
    rc = tune_main(["--config", SMOKE, f"storage_path={tmp_path}", "num_samples=1",
                    "space.loss.decorrelation={grid: [0.0, 0.5]}", *FIXED, *QUICK,
                    "scheduler.kind=none", "max_concurrent_trials=1",
                    "fault_injection.interrupt_after_trials=1"])
    assert rc == 1  # incomplete: no tables yet
    experiment = tmp_path / "smoke"
    assert not (experiment / "trials.csv").exists()
    done = {t.name: (t / "result.json").read_text() for t in trial_dirs(experiment)
            if (t / "result.json").is_file() and results(t) and results(t)[-1]["final"]}
    assert len(done) == 1

    assert tune_main(["--resume", str(experiment)]) == 0
    rows = read_rows(experiment)
    assert len(rows) == 2 and all(r["status"] == "finished" for r in rows)
    for name, before in done.items():
        assert (experiment / name / "result.json").read_text() == before  # not run again


def test_a_search_moved_while_interrupted_resumes_its_trials_still_to_create(ray_session, tmp_path):
    # Held back by max_concurrent_trials, the second trial did not exist at the
    # interrupt: Tune's searcher creates it on the resume, with the storage it saved.
    rc = tune_main(["--config", SMOKE, f"storage_path={tmp_path / 'before'}", "num_samples=2", *FIXED,
                    "space.loss.decorrelation={choice: [0.5]}", "overrides.train.max_steps=20",
                    "overrides.eval.probe_train_size=500", "scheduler.kind=none", "max_concurrent_trials=1",
                    "fault_injection.interrupt_after_trials=1"])
    assert rc == 1 and len(trial_dirs(tmp_path / "before" / "smoke")) == 1
    (tmp_path / "after").mkdir()
    experiment = (tmp_path / "before" / "smoke").rename(tmp_path / "after" / "smoke")

    assert tune_main(["--resume", str(experiment)]) == 0
    rows = read_rows(experiment)
    assert len(rows) == 2 and all(r["status"] == "finished" for r in rows)
    assert list((tmp_path / "before").iterdir()) == []  # nothing written where it was


def test_a_resume_of_an_edited_search_file_is_refused_and_loses_nothing(ray_session, tmp_path, caplog):
    # Tune resumes the trials it drew: with an arm gone from search.yaml the
    # trial of that arm failed on every try (forever under max_failures: -1).
    rc = tune_main(["--config", SMOKE, f"storage_path={tmp_path}", "num_samples=1", *FIXED, *QUICK,
                    "space.loss.decorrelation={choice: [0.5]}", "arms.on.loss.independence=0.0",
                    "arms.off.loss.decorrelation=0.0", "scheduler.kind=none", "max_concurrent_trials=1",
                    "max_failures=1", "fault_injection.interrupt_after_trials=1"])
    assert rc == 1
    experiment = tmp_path / "smoke"
    saved = (experiment / "search.yaml").read_text()
    edited = yaml.safe_load(saved)
    del edited["arms"]["off"]
    edited["base"]["train"]["lr"] = 0.5
    (experiment / "search.yaml").write_text(yaml.safe_dump(edited))

    assert tune_main(["--resume", str(experiment)]) == 2
    assert "search.yaml has changed since the search started: arms, base." in caplog.text
    assert ".search_started.yaml" in caplog.text
    assert not (experiment / "trials.csv").exists()

    (experiment / "search.yaml").write_text(saved)
    assert tune_main(["--resume", str(experiment)]) == 0
    rows = read_rows(experiment)
    assert sorted(r["arm"] for r in rows) == ["off", "on"] and all(r["status"] == "finished" for r in rows)


def test_a_search_over_seeds_trains_each_sampled_config_on_every_seed(ray_session, tmp_path, capsys):
    # Interrupted after its first trial and resumed: the sampled values are
    # drawn once, so the resumed trials still share them.
    rc = tune_main(["--config", SMOKE, f"storage_path={tmp_path}", "num_samples=2", "seeds=[3, 4]",
                    "scheduler.kind=none", "max_concurrent_trials=1",
                    "fault_injection.interrupt_after_trials=1", *QUICK])
    assert rc == 1
    experiment = tmp_path / "smoke"
    assert tune_main(["--resume", str(experiment)]) == 0
    searched = ("loss.decorrelation", "loss.adversarial_z", "train.lr")
    trained = {}
    for trial in trial_dirs(experiment):
        config = yaml.safe_load((trial / "config.yaml").read_text())  # what the trainer ran
        values = (config["loss"]["decorrelation"], config["loss"]["adversarial_z"], config["train"]["lr"])
        trained[trial.name.split("-", 1)[1]] = (config["seed"], values)
    assert sorted(trained) == ["c0-seed3", "c0-seed4", "c1-seed3", "c1-seed4"]
    assert {name: seed for name, (seed, _) in trained.items()} == {
        "c0-seed3": 3, "c0-seed4": 4, "c1-seed3": 3, "c1-seed4": 4}
    assert trained["c0-seed3"][1] == trained["c0-seed4"][1] != trained["c1-seed3"][1] == trained["c1-seed4"][1]

    rows = read_rows(experiment)
    assert len(rows) == 4 and all(r["status"] == "finished" for r in rows)
    with open(experiment / "configs.csv") as handle:
        configs = list(csv.DictReader(handle))
    assert [int(c["rank"]) for c in configs] == [1, 2] and all(c["n"] == "2" for c in configs)
    for config in configs:
        seeds = [r for r in rows if r["config"] == config["config"]]
        assert float(config["score_mean"]) == pytest.approx(sum(float(r["score"]) for r in seeds) / 2)
        assert config["meets_target"] == f"{sum(r['meets_target'] == 'True' for r in seeds)}/2"
    key = lambda c: (c["meets_target_on_every_seed"] == "True", float(c["score_mean"]))  # noqa: E731
    assert key(configs[0]) >= key(configs[1])
    best = yaml.safe_load((experiment / "best_config.yaml").read_text())
    best_values = trained[f"c{configs[0]['config']}-seed3"][1]
    assert (best["loss"]["decorrelation"], best["loss"]["adversarial_z"], best["train"]["lr"]) == best_values
    assert best["seed"] == 0  # the base config's: one run per seed is the user's to start
    assert (experiment / "configs.md").read_text() in capsys.readouterr().out
    assert all(float(configs[0][k]) == pytest.approx(v) for k, v in zip(searched, best_values))
    # `daae tune --check` lists the same draws before anything runs.
    assert tune_main(["--check", "--config", SMOKE, "num_samples=2", "seeds=[3, 4]",
                      "scheduler.kind=none"]) == 0
    listed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("# c")]
    assert len(listed) == 2
    for index, line in enumerate(listed):
        drawn = yaml.safe_load(line.split(": ", 1)[1])
        assert tuple(drawn[k] for k in searched) == trained[f"c{index}-seed3"][1]


def test_resources_the_cluster_cannot_hold_fail_before_any_trial(ray_session, tmp_path, caplog):
    for override, named in (("resources.cpu=64", "64 CPU"), ("resources.gpu=2", "2 GPU"),
                            ("resources.gpu=0.5", "0.5 GPU")):
        assert tune_main(["--config", SMOKE, f"storage_path={tmp_path}", override]) == 2
        assert named in caplog.text and "resources" in caplog.text
        assert not (tmp_path / "smoke").exists()


def test_an_existing_search_is_not_overwritten(ray_session, tmp_path, caplog):
    (tmp_path / "smoke").mkdir()
    (tmp_path / "smoke" / "search.yaml").write_text("name: smoke\n")
    assert tune_main(["--config", SMOKE, f"storage_path={tmp_path}"]) == 2
    assert "--resume" in caplog.text


def test_multi_gpu_trials_run_as_a_torch_trainer(tmp_path):
    from ray.train.torch import TorchTrainer

    from tune import load_search
    from tune.distributed import build_trainer

    spec = load_search(SMOKE, [f"storage_path={tmp_path}", "resources.gpu=2", "resources.cpu=8"])
    assert spec.file.resources.num_workers == 2
    trainer = build_trainer(spec.trainer_config({}), tmp_path / "trial", None, None,
                            spec.file.resources, str(tmp_path))
    assert isinstance(trainer, TorchTrainer)
    scaling = trainer.scaling_config
    assert scaling.num_workers == 2 and scaling.use_gpu
    assert scaling.resources_per_worker == {"CPU": 4.0, "GPU": 1.0}


def test_a_distributed_trials_run_folder_travels_without_its_checkpoints(tmp_path):
    """Rank 0 may train on another node than the trial function, which alone
    Tune uploads from (bucket storage): what changed in the run folder goes
    to the trial function at each evaluation, whole files, checkpoints aside."""
    from tune.distributed import RunFolderShipper, write_run_folder_files

    written = {"config.yaml": b"seed: 0\n", "events.out.tfevents.1.node.7": b"\x00events",
               "images/step_00040.png": b"png"}
    source = tmp_path / "rank0"
    for relative, data in {**written, "checkpoints/last.pt": b"weights",
                           "workers-1a2b3c4d/state.json": b"ray train"}.items():
        (source / relative).parent.mkdir(parents=True, exist_ok=True)
        (source / relative).write_bytes(data)
    messages = []
    shipper = RunFolderShipper(source, SimpleNamespace(put=messages.append))
    shipper.ship()
    shipper.ship()  # nothing changed: nothing sent
    with open(source / "events.out.tfevents.1.node.7", "ab") as events:
        events.write(b"+more")
    (source / "metrics.json").write_bytes(b"{}")
    shipper.ship()
    assert [(kind, sorted(files)) for kind, _, files in messages] == [
        ("files", sorted(written)), ("files", ["events.out.tfevents.1.node.7", "metrics.json"])]
    target = tmp_path / "trial"
    target.mkdir()
    (target / "result.json").write_text("{}")  # Tune's own files stay
    for _, _, files in messages:
        write_run_folder_files(target, files)
    assert {str(p.relative_to(target)): p.read_bytes() for p in target.rglob("*") if p.is_file()} == {
        **written, "events.out.tfevents.1.node.7": b"\x00events+more", "metrics.json": b"{}",
        "result.json": b"{}"}


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("DAAE_TEST_DISTRIBUTED"),
                    reason="a 2-worker TorchTrainer trial takes about a minute on 2 CPUs; "
                           "set DAAE_TEST_DISTRIBUTED=1 to run it")
def test_distributed_trial_reports_once_per_evaluation(ray_session, tmp_path):
    # Two gloo workers on CPU stand in for two GPUs: only rank 0 reports.
    rc = tune_main(["--config", SMOKE, f"storage_path={tmp_path}", "num_samples=1",
                    "scheduler.kind=none", "resources.workers=2", "resources.cpu=1.9",
                    "space.loss.decorrelation={choice: [0.5]}", *FIXED, *QUICK])
    assert rc == 0
    (trial,) = trial_dirs(tmp_path / "smoke")
    assert [(r["step"], r["final"]) for r in results(trial)] == [(20, False), (40, True)]
    writers = [p for p in trial.glob("events.out.tfevents.*") if not p.name.endswith(".hparams")]
    assert len(writers) == 1  # one main process, so the workers formed one run
    (row,) = read_rows(tmp_path / "smoke")
    assert row["status"] == "finished"


BENCH_TUNE_TINY = ["overrides.data.synthetic_train_size=1000",
                   "overrides.model.scale=0.05", "overrides.model.adversary_hidden=16",
                   "overrides.train.max_steps=20", "overrides.run.eval_every=10",
                   "overrides.run.checkpoint_every=10", "overrides.eval.probe_train_size=300"]


def test_bench_tune_runs_each_concurrency_level(ray_session, tmp_path, monkeypatch):
    from benchmarks import bench_tune, common

    monkeypatch.setattr(common, "RESULTS", tmp_path)
    # One trial alone, two at once: trials per level may differ, and the rate still compares.
    assert bench_tune.main(["--concurrency", "1", "2", "--trials", "1", "2", "--name", "t",
                            "--set", *BENCH_TUNE_TINY]) == 0
    result = json.loads((tmp_path / "t.json").read_text())
    assert [row["concurrency"] for row in result["rows"]] == [1, 2]
    assert [row["trials"] for row in result["rows"]] == [1, 2]
    assert [row["resources.cpu"] for row in result["rows"]] == [2, 1]
    assert all(row["trials_per_hour"] > 0 for row in result["rows"])
    assert result["rows"][0]["speedup_vs_first"] == 1
    assert result["rows"][1]["speedup_vs_first"] == pytest.approx(
        result["rows"][1]["trials_per_hour"] / result["rows"][0]["trials_per_hour"])


def test_bench_tune_refuses_a_trial_count_per_level_that_does_not_match(capsys):
    from benchmarks import bench_tune

    with pytest.raises(SystemExit):
        bench_tune.main(["--concurrency", "1", "2", "4", "--trials", "1", "2"])
    assert "--trials: give one number, or one per --concurrency level (3), not 2" in capsys.readouterr().err


def test_device_session_runs_bench_tune_and_brings_its_result_back(ray_session, tmp_path, monkeypatch):
    from benchmarks import device_session

    # bench_tune runs as its own process: it joins this test's Ray rather than starting one.
    monkeypatch.setenv("RAY_ADDRESS", ray.get_runtime_context().gcs_address)
    out = tmp_path / "out"
    assert device_session.main([
        "--data-root", str(tmp_path), "--out", str(out), "--config", str(ROOT / "configs" / "smoke.yaml"),
        "--skip-bench", "--seeds", "0", "--arms", "on", "--set", "train.max_steps=10", "eval.probe_epochs=1",
        "--tune-concurrency", "1", "--tune-trials", "1", "--tune-set", *BENCH_TUNE_TINY]) == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "bench_tune-device.json", "runs.tar.gz", "session.json", "summary.md"]
    (row,) = json.loads((out / "bench_tune-device.json").read_text())["rows"]
    assert row["concurrency"] == 1 and row["trials"] == 1 and row["trials_per_hour"] > 0
    session = json.loads((out / "session.json").read_text())
    assert session["bench_tune"]["exit"] == 0 and session["bench_tune"]["result"] == "bench_tune-device.json"
    assert session["runs"] == {"on-seed0": 0}
