import pytest
import torch

from daae import checkpoint
from daae.train import train

from conftest import SMOKE, around_iteration, tiny_config


def _parameters(run_dir):
    return checkpoint.load(run_dir)["networks"]


def test_stopped_and_resumed_run_matches_an_uninterrupted_one(tmp_path):
    # 70 steps cross an epoch boundary (50 steps/epoch) and switch on decorrelation
    # and VAT. data.max_shift draws from the same random stream the resumed run
    # must restore; loss.consistency and loss.vat add optimizers the checkpoint
    # must carry (and VAT's power iteration draws from that stream too).
    common = ("eval.final_test=false", "eval.probe_epochs=1", "run.checkpoint_every=20",
              "data.max_shift=1", "loss.consistency=0.5", "loss.vat=0.5", "loss.vat_start_epoch=1")
    straight = train(tiny_config(tmp_path, "run.name=straight", "train.max_steps=70", *common))
    train(tiny_config(tmp_path, "run.name=split", "train.max_steps=30", *common))
    resumed = train(tiny_config(tmp_path, "run.name=split", "train.max_steps=70", *common),
                    resume=tmp_path / "split")
    assert resumed["step"] == straight["step"] == 70
    a, b = _parameters(tmp_path / "straight"), _parameters(tmp_path / "split")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert resumed["validation"]["accuracy"] == straight["validation"]["accuracy"]


def test_resume_from_a_missing_folder_or_a_checkpoint_file_is_a_clear_error_that_makes_nothing(tmp_path):
    from daae.config import ConfigError

    with pytest.raises(ConfigError, match="--resume .*missing: not a run folder; pass the folder"):
        train(tiny_config(tmp_path, "train.max_steps=2"), resume=tmp_path / "missing")
    assert not (tmp_path / "missing").exists()  # no folder left holding only a lock
    (tmp_path / "r").mkdir()
    with pytest.raises(checkpoint.CheckpointError, match="no checkpoint"):
        train(tiny_config(tmp_path, "train.max_steps=2"), resume=tmp_path / "r")
    last = checkpoint.checkpoint_path(tmp_path / "r")
    last.parent.mkdir()
    last.write_bytes(b"")
    with pytest.raises(ConfigError, match=f"is the checkpoint of {tmp_path / 'r'}, so pass"):
        train(tiny_config(tmp_path, "train.max_steps=2"), resume=last)


def test_a_run_dir_under_home_written_with_a_tilde_lands_there(tmp_path, monkeypatch):
    from daae.runs import new_run_dir

    monkeypatch.setenv("HOME", str(tmp_path))
    assert new_run_dir(tiny_config(tmp_path, "run.dir=~/runs", "run.name=r")) == tmp_path / "runs" / "r"


def test_resuming_with_another_model_names_the_changed_key(tmp_path):
    """An ensemble of correlation classifiers reading standardised codes, beside
    class-whitened codes, resumes to the same weights and running statistics as
    a run never stopped; a changed model is refused, naming the key and both
    values."""
    common = ("eval.final_test=false", "eval.probe_epochs=1", "run.checkpoint_every=10",
              "model.correlation_classifiers=2", "model.correlation_standardised=true",
              "model.class_whitening=true", "train.step_mode=fused")
    train(tiny_config(tmp_path, "run.name=straight", "train.max_steps=20", *common))
    train(tiny_config(tmp_path, "run.name=r", "train.max_steps=10", *common))
    train(tiny_config(tmp_path, "run.name=r", "train.max_steps=20", *common), resume=tmp_path / "r")
    a, b = _parameters(tmp_path / "straight"), _parameters(tmp_path / "r")
    assert {"correlation.members.1.net.0.weight", "correlation.members.1.input_norm.running_var",
            "encoder.z_whitening.running_cov"} <= a.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    with pytest.raises(checkpoint.CheckpointError,
                       match=r"model\.correlation_classifiers is 3 here, 2 in the checkpoint"):
        train(tiny_config(tmp_path, "run.name=r", "train.max_steps=30", *common,
                          "model.correlation_classifiers=3"),
              resume=tmp_path / "r")
    with pytest.raises(checkpoint.CheckpointError,
                       match=r"model\.correlation_standardised is false here, true in the checkpoint"):
        train(tiny_config(tmp_path, "run.name=r", "train.max_steps=30", *common,
                          "model.correlation_standardised=false"),
              resume=tmp_path / "r")
    with pytest.raises(checkpoint.CheckpointError,
                       match=r"model\.class_conditional_prior is true here, false in the checkpoint"):
        train(tiny_config(tmp_path, "run.name=r", "train.max_steps=30", *common,
                          "model.class_conditional_prior=true"),
              resume=tmp_path / "r")
    with pytest.raises(checkpoint.CheckpointError,
                       match=r"model\.class_whitening is false here, true in the checkpoint"):
        train(tiny_config(tmp_path, "run.name=r", "train.max_steps=30", *common,
                          "model.class_whitening=false"),
              resume=tmp_path / "r")


def test_switching_a_term_with_its_own_optimizer_on_resume_names_the_key(tmp_path):
    common = ("eval.final_test=false", "eval.probe_epochs=1", "train.step_mode=reference")
    train(tiny_config(tmp_path, "run.name=r", "train.max_steps=4", "loss.independence=0", *common))
    with pytest.raises(checkpoint.CheckpointError,
                       match=r"loss\.independence is above 0 here, 0 in the checkpoint.*"
                             r"train\.step_mode=fused"):
        train(tiny_config(tmp_path, "run.name=r", "train.max_steps=8", "loss.independence=1",
                          *common), resume=tmp_path / "r")


def test_resuming_with_another_model_names_the_key_even_one_the_checkpoint_predates(tmp_path):
    common = ("eval.final_test=false", "eval.probe_epochs=1")
    train(tiny_config(tmp_path, "run.name=r", "train.max_steps=4", *common))
    with pytest.raises(checkpoint.CheckpointError,
                       match=r"does not fit this model: model\.z_dim is 7 here, \d+ in the checkpoint"):
        train(tiny_config(tmp_path, "run.name=r", "train.max_steps=8", "model.z_dim=7", *common),
              resume=tmp_path / "r")
    # A checkpoint written before daae had the key: it had the default then.
    path = checkpoint.checkpoint_path(tmp_path / "r")
    state = checkpoint.load(path)
    del state["config"]["model"]["class_conditional_prior"]
    checkpoint.save_atomic(state, path)
    with pytest.raises(checkpoint.CheckpointError,
                       match=r"model\.class_conditional_prior is true here, false in the checkpoint"):
        train(tiny_config(tmp_path, "run.name=r", "train.max_steps=8",
                          "model.class_conditional_prior=true", *common), resume=tmp_path / "r")


def test_a_new_run_never_overwrites_an_existing_one(tmp_path):
    from daae.config import ConfigError

    train(tiny_config(tmp_path, "run.name=r", "train.max_steps=2", "eval.final_test=false"))
    with pytest.raises(ConfigError, match="--resume"):
        train(tiny_config(tmp_path, "run.name=r", "train.max_steps=2"))


def test_a_resumed_run_reports_its_training_time_over_every_stretch(tmp_path):
    common = ("eval.final_test=false", "eval.probe_epochs=1", "run.checkpoint_every=10")
    first = train(tiny_config(tmp_path, "run.name=r", "train.max_steps=20", *common))
    assert first["run_train_seconds"] == first["train_seconds"]
    at_20 = checkpoint.load(tmp_path / "r")["train_seconds"]
    assert at_20 == first["train_seconds"]
    second = train(tiny_config(tmp_path, "run.name=r", "train.max_steps=40", *common),
                   resume=tmp_path / "r")
    assert second["run_train_seconds"] == at_20 + second["train_seconds"]

    # From a checkpoint written before daae recorded the time, the run's total
    # is unknown: reported as null (a dash in `daae summary`), not understated.
    state = checkpoint.load(tmp_path / "r")
    del state["train_seconds"]
    checkpoint.save_atomic(state, checkpoint.checkpoint_path(tmp_path / "r"))
    third = train(tiny_config(tmp_path, "run.name=r", "train.max_steps=50", *common),
                  resume=tmp_path / "r")
    assert third["run_train_seconds"] is None and third["train_seconds"] > 0


def test_a_checkpoints_training_time_leaves_out_the_evaluation_before_it(tmp_path):
    import time

    from daae.train import Hooks

    recorded = {}

    def slow_evaluation(step, metrics):
        if step == 10:
            time.sleep(2.0)

    def read_checkpoint(step, path):
        recorded[step] = checkpoint.load(path)["train_seconds"]

    result = train(tiny_config(tmp_path, "run.name=r", "train.max_steps=20", "run.eval_every=10",
                               "run.checkpoint_every=10", "eval.final_test=false",
                               "eval.probe_epochs=1"),
                   hooks=Hooks(on_evaluation=slow_evaluation, on_checkpoint=read_checkpoint))
    # Step 10's evaluation slept 2 s right before its checkpoint; neither counts.
    assert 0 < recorded[10] < recorded[20] == result["train_seconds"] < 2.0


def test_a_resume_keeps_the_settings_it_changed_on_record(tmp_path, caplog):
    """config.yaml holds only the config a run goes on with; resumes.yaml keeps
    each resume's step and every setting it changed, and the log names them."""
    import logging

    import yaml

    from daae.config import ConfigError
    from daae.runs import RESUMES_FILE

    common = ("eval.final_test=false", "eval.probe_epochs=1", "run.checkpoint_every=10")
    run = tmp_path / "r"
    train(tiny_config(tmp_path, "run.name=r", "train.max_steps=10", *common))
    assert not (run / RESUMES_FILE).exists()
    before = checkpoint.load(run)["config"]["loss"]["decorrelation"]
    with caplog.at_level(logging.INFO, logger="daae.train"):
        train(tiny_config(tmp_path, "run.name=r", "train.max_steps=20", "loss.decorrelation=0.25", *common),
              resume=run)
    assert f"at step 10; train.max_steps: 10 -> 20; loss.decorrelation: {before} -> 0.25" in caplog.text

    # A checkpoint written before a key existed: the key counts as its default,
    # so only a value other than the default is a change.
    def written_without(section, key):
        state = checkpoint.load(run)
        del state["config"][section][key]
        checkpoint.save_atomic(state, checkpoint.checkpoint_path(run))

    written_without("loss", "correlation_batch_norm_start_epoch")
    train(tiny_config(tmp_path, "run.name=r", "train.max_steps=30", "loss.decorrelation=0.25", *common),
          resume=run)
    written_without("loss", "correlation_batch_norm")
    train(tiny_config(tmp_path, "run.name=r", "train.max_steps=40", "loss.decorrelation=0.25",
                      "loss.correlation_batch_norm=evaluation", *common), resume=run)
    assert yaml.safe_load((run / RESUMES_FILE).read_text()) == [
        {"step": 10, "changed": {"train.max_steps": {"from": 10, "to": 20},
                                 "loss.decorrelation": {"from": before, "to": 0.25}}},
        {"step": 20, "changed": {"train.max_steps": {"from": 20, "to": 30}}},
        {"step": 30, "changed": {"train.max_steps": {"from": 30, "to": 40},
                                 "loss.correlation_batch_norm": {"from": "training", "to": "evaluation"}}},
    ]
    assert yaml.safe_load((run / "config.yaml").read_text())["loss"]["correlation_batch_norm"] == "evaluation"

    (run / RESUMES_FILE).write_text("step: 10\n")
    with pytest.raises(ConfigError, match="resumes.yaml should be a list"):
        train(tiny_config(tmp_path, "run.name=r", "train.max_steps=50", *common), resume=run)
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["max_steps"] == 40


def test_a_resume_keeps_the_labelled_subset_and_the_validation_split(tmp_path):
    train(tiny_config(tmp_path, "run.name=r", "train.max_steps=4", "eval.final_test=false",
                      "eval.probe_epochs=1"))
    for change, message in (("seed=7", r"seed is 7 here, 0 in the checkpoint"),
                            ("data.validation_size=300", r"data\.validation_size is 300 here")):
        with pytest.raises(checkpoint.CheckpointError, match=message + r".*start a new run"):
            train(tiny_config(tmp_path, "run.name=r", "train.max_steps=8", change), resume=tmp_path / "r")


def test_every_data_key_but_where_the_files_are_and_the_shifts_is_kept_on_resume():
    # A data key added later is kept unless it is known not to change which
    # images are labelled or held out (data.svhn_extra once slipped through).
    from dataclasses import fields

    from daae.config import DataConfig
    from daae.runs import SPLIT_KEYS

    free = {"data.root", "data.download", "data.max_shift"}
    assert {f"data.{field.name}" for field in fields(DataConfig)} - free <= set(SPLIT_KEYS)


def test_a_run_folder_trains_in_one_process_at_a_time(tmp_path):
    from daae.config import ConfigError
    from daae.train import _lock_run_dir

    train(tiny_config(tmp_path, "run.name=r", "train.max_steps=4", "eval.final_test=false",
                      "eval.probe_epochs=1"))
    held = _lock_run_dir(tmp_path / "r")  # as a second `daae train --resume` would find it
    try:
        with pytest.raises(ConfigError, match="another daae process is training"):
            train(tiny_config(tmp_path, "run.name=r", "train.max_steps=8"), resume=tmp_path / "r")
    finally:
        held.close()
    assert train(tiny_config(tmp_path, "run.name=r", "train.max_steps=8", "eval.final_test=false",
                             "eval.probe_epochs=1"), resume=tmp_path / "r")["step"] == 8


def test_a_crash_after_the_checkpoint_leaves_no_doubled_steps_or_stale_files(tmp_path, monkeypatch):
    """The stretch after the last checkpoint is trained again on resume: its
    TensorBoard points are replaced, not doubled, and a checkpoint half written
    by a killed process is cleared away."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    common = ("run.name=r", "train.max_steps=20", "run.log_every=5", "run.checkpoint_every=10",
              "run.eval_every=10", "eval.final_test=false", "eval.probe_epochs=1")

    def machine_goes_away(run):
        raise RuntimeError("the machine went away")

    with monkeypatch.context() as patch:
        around_iteration(patch, 18, machine_goes_away)
        with pytest.raises(RuntimeError, match="went away"):
            train(tiny_config(tmp_path, *common))
    stale = tmp_path / "r" / "checkpoints" / ".last.pt.k1ll3d.tmp"
    stale.write_bytes(b"half a checkpoint")
    assert train(tiny_config(tmp_path, *common), resume=tmp_path / "r")["step"] == 20
    assert not stale.exists()
    events = EventAccumulator(str(tmp_path / "r"))
    events.Reload()
    assert [e.step for e in events.Scalars("loss/reconstruction")] == [5, 10, 15, 20]


def test_a_run_stopped_by_a_signal_checkpoints_there_and_resumes(tmp_path, monkeypatch, caplog):
    import os
    import signal

    from daae.cli import main

    def ctrl_c(run):  # while step 7 runs
        os.kill(os.getpid(), signal.SIGINT)
        return run()

    command = ["train", "--config", str(SMOKE), f"run.dir={tmp_path}", "run.name=r",
               "run.progress_bar=false", "train.max_steps=20", "eval.final_test=false",
               "eval.probe_epochs=1"]
    with monkeypatch.context() as patch:
        around_iteration(patch, 7, ctrl_c)
        assert main(command) == 130
    assert f"stopped by SIGINT at step 7, with a checkpoint there: go on with daae train --resume {tmp_path / 'r'}" \
        in caplog.text
    assert checkpoint.load(tmp_path / "r")["step"] == 7
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers put back
    assert main(["train", "--resume", str(tmp_path / "r")]) == 0
    assert checkpoint.load(tmp_path / "r")["step"] == 20


def test_a_stop_between_log_steps_resumes_the_loss_means_as_the_straight_run_logs_them(tmp_path,
                                                                                    monkeypatch):
    import os
    import signal

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from daae.cli import main

    def ctrl_c(run):  # while step 7 runs: steps 6 and 7 are summed, not yet logged
        os.kill(os.getpid(), signal.SIGINT)
        return run()

    command = ["train", "--config", str(SMOKE), f"run.dir={tmp_path}", "run.progress_bar=false",
               "train.max_steps=15", "run.log_every=5", "eval.final_test=false", "eval.probe_epochs=1"]
    assert main([*command, "run.name=straight"]) == 0
    with monkeypatch.context() as patch:
        around_iteration(patch, 7, ctrl_c)
        assert main([*command, "run.name=split"]) == 130
    assert main(["train", "--resume", str(tmp_path / "split")]) == 0
    logged = {}
    for name in ("straight", "split"):
        events = EventAccumulator(str(tmp_path / name))
        events.Reload()
        logged[name] = {tag: [(e.step, e.value) for e in events.Scalars(tag)]
                        for tag in events.Tags()["scalars"] if tag.startswith("loss/")}
    assert logged["split"] == logged["straight"]
    assert [step for step, _ in logged["straight"]["loss/reconstruction"]] == [5, 10, 15]


@pytest.mark.parametrize("name", ["SIGINT", "SIGTERM"])
def test_a_stop_signal_is_noted_and_a_second_one_stops_at_once(name):
    # SIGTERM is what SLURM's preemption and `kill` send: noted like Ctrl-C.
    import os
    import signal

    from daae.interrupt import StopRequest

    number = getattr(signal, name)
    before = signal.getsignal(number)
    stop = StopRequest.install()
    try:
        os.kill(os.getpid(), number)
        assert stop.requested("cpu", 1) and stop.signal_name == name
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), number)
    finally:
        stop.restore()
    assert signal.getsignal(number) == before


def test_a_run_that_stopped_before_its_first_checkpoint_says_how_to_start_it_again(tmp_path):
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "config.yaml").write_text("seed: 0\n")
    with pytest.raises(checkpoint.CheckpointError, match=r"stopped before its first checkpoint: "
                                                         r"start it again with daae train --config"):
        train(tiny_config(tmp_path, "run.name=r"), resume=tmp_path / "r")



def test_a_resume_goes_on_in_its_folder_and_config_yaml_says_where_it_is(tmp_path, caplog):
    import yaml

    from daae import cli

    common = ("eval.final_test=false", "eval.probe_epochs=1", "run.checkpoint_every=2")
    train(tiny_config(tmp_path, "run.name=r", "train.max_steps=2", *common))
    run = tmp_path / "r"
    assert cli.main(["train", "--resume", str(run), "run.name=elsewhere", "train.max_steps=4"]) == 2
    assert "run.name: --resume" in caplog.text and "cp -r" in caplog.text
    assert checkpoint.load(run)["step"] == 2
    # --config names another place (a timestamped name): the run goes on where it is.
    assert cli.main(["train", "--config", str(SMOKE), "--resume", str(run), "run.progress_bar=false",
                     "train.max_steps=4", *common]) == 0
    saved = yaml.safe_load((run / "config.yaml").read_text())["run"]
    assert (saved["dir"], saved["name"]) == (str(tmp_path), "r")
    assert checkpoint.load(run)["step"] == 4
    assert "run." not in (run / "resumes.yaml").read_text()  # the folder keys are not changes
