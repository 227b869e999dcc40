import json

import pytest
import torch

from daae import checkpoint
from daae.data import load_data
from daae.evaluate import cluster_accuracy, evaluate
from daae.runs import build_networks
from daae.tracker import LossTracker, NonFiniteLossError
from daae.train import train

from conftest import around_iteration, tiny_config


@pytest.fixture(scope="module")
def decorrelation_pair(tmp_path_factory):
    """The same short synthetic run with the decorrelation phase off and on."""
    base = tmp_path_factory.mktemp("pair")
    common = ("eval.final_test=false",)
    off = train(tiny_config(base, "run.name=off", "loss.decorrelation=0", *common))
    on = train(tiny_config(base, "run.name=on", "loss.decorrelation=0.5", *common))
    return off, on


def test_short_run_classifies_far_above_chance(decorrelation_pair):
    off, on = decorrelation_pair
    assert off["validation"]["accuracy"] > 0.8
    assert on["validation"]["accuracy"] > 0.8


def test_decorrelation_lowers_the_adversary_accuracy(decorrelation_pair):
    off, on = decorrelation_pair
    assert off["validation"]["adversary_accuracy"] > 0.9
    assert on["validation"]["adversary_accuracy"] < off["validation"]["adversary_accuracy"] - 0.1


def test_run_folder_holds_config_events_images_checkpoint_metrics(tmp_path):
    result = train(tiny_config(tmp_path, "run.name=r", "train.max_steps=30", "run.eval_every=15",
                               "run.checkpoint_every=15"))
    run = tmp_path / "r"
    assert (run / "config.yaml").is_file()
    assert list(run.glob("events.out.tfevents.*"))
    images = {p.name for p in (run / "images").glob("*.png")}
    # reconstructions, and the ten classes decoded with a few styles ("random"),
    # at the evaluation during training and at the end
    assert {"random_0000015.png", "reconstructions_0000015.png", "random_0000030.png",
            "reconstructions_0000030.png"} <= images
    assert all(name.endswith(("_0000015.png", "_0000030.png")) for name in images)
    assert checkpoint.load(run)["step"] == 30
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["step"] == result["step"] == 30
    for key in ("accuracy", "adversary_accuracy", "probe_accuracy", "linear_probe_accuracy",
                "recon_mse", "z_mean", "z_std", "y_marginal_entropy", "labelled_accuracy",
                "cluster_accuracy"):
        assert 0 <= metrics["test"][key] or key == "z_mean"
    assert metrics["test"]["cluster_accuracy"] >= metrics["test"]["accuracy"] - 1e-6
    assert not list(run.rglob("*.tmp"))


@pytest.mark.parametrize("step_mode", ["fused", "reference"])
def test_critics_keep_their_learning_rate_past_the_milestone_when_told_to(tmp_path, step_mode):
    # 50 steps per epoch: step 51 is in epoch 1, past the milestone.
    train(tiny_config(tmp_path, "run.name=r", f"train.step_mode={step_mode}", "train.max_steps=51",
                      "train.lr_milestones=[1]", "train.lr_decay=0.1",
                      "train.critic_lr_milestones=[]", "eval.final_test=false",
                      "eval.probe_epochs=1"))
    optimizers = checkpoint.load(tmp_path / "r")["optimizers"]
    critics = {"fused": {"critics"}, "reference": {"discriminators", "correlation"}}[step_mode]
    assert critics < optimizers.keys()
    for name, state in optimizers.items():
        group = state["param_groups"][0]
        expected = group["base_lr"] * (1.0 if name in critics else 0.1)
        assert group["lr"] == pytest.approx(expected), name


@pytest.mark.parametrize("step_mode", ["fused", "reference"])
def test_correlation_lr_scale_sets_cs_rate_and_resumes_a_run_without_it(tmp_path, step_mode):
    common = ("run.name=r", f"train.step_mode={step_mode}", "eval.final_test=false",
              "eval.probe_epochs=1")
    train(tiny_config(tmp_path, *common, "train.max_steps=10"))
    train(tiny_config(tmp_path, *common, "train.max_steps=20", "train.correlation_lr_scale=3"),
          resume=tmp_path / "r")
    optimizers = checkpoint.load(tmp_path / "r")["optimizers"]
    if step_mode == "fused":
        discriminators, correlation = optimizers["critics"]["param_groups"]
    else:
        (discriminators,) = optimizers["discriminators"]["param_groups"]
        (correlation,) = optimizers["correlation"]["param_groups"]
    assert correlation["lr"] == pytest.approx(3 * discriminators["lr"])
    # Adam's moments of C went on from the first 10 steps, not from zero.
    state = optimizers["critics" if step_mode == "fused" else "correlation"]["state"]
    assert all(int(state[index]["step"]) == 20 for index in correlation["params"])


@pytest.mark.parametrize("overrides", [
    ("train.step_mode=fused", "data.max_shift=2", "loss.correlation_input=clean",
     "loss.consistency=2", "loss.vat=1", "model.input_noise=0"),
    ("train.mixed_precision=bf16",),
    ("model.kind=conv", "model.scale=0.25", "loss.decorrelation_objective=uniform"),
    ("data.labels_per_class=null", "loss.correlation_target=hard", "data.max_shift=1",
     "loss.correlation_input=clean"),
    ("data.max_shift=2", "loss.consistency=2", "loss.vat=1"),
    ("data.max_shift=2", "loss.correlation_input=both", "loss.independence=1"),
    ("train.step_mode=fused", "data.max_shift=2", "loss.correlation_input=clean",
     "loss.correlation_batch_norm=evaluation", "loss.consistency=2", "loss.independence=1"),
    ("data.max_shift=2", "loss.correlation_batch_norm=evaluation", "loss.independence=1"),
], ids=["fused-shift-clean-consistency-vat", "bf16", "conv-uniform", "all-labels-hard-shift-clean",
        "reference-consistency-vat", "reference-shift-both-independence",
        "fused-clean-evaluation-codes", "reference-evaluation-codes"])
def test_variants_train_and_learn(tmp_path, overrides):
    result = train(tiny_config(tmp_path, "train.max_steps=120", "eval.final_test=false",
                               "eval.probe_epochs=1", *overrides))
    assert result["validation"]["accuracy"] > 0.5


def test_a_mixed_precision_run_reports_what_daae_eval_reads_from_its_checkpoint(tmp_path):
    """Under bf16 only the training forwards run in low precision: the final
    evaluation (and VAT's power iteration) use the networks in fp32, as
    ``daae eval`` does on the checkpoint."""
    from daae.evaluate import evaluate_run

    result = train(tiny_config(tmp_path, "run.name=r", "train.max_steps=20", "eval.final_test=false",
                               "eval.probe_epochs=1", "train.mixed_precision=bf16"))
    again = evaluate_run(tmp_path / "r", "validation", generation=False)
    assert again["validation_accuracy"] == result["validation"]["accuracy"]
    for key in ("recon_mse", "z_std", "adversary_accuracy", "probe_accuracy"):
        assert again[key] == result["validation"][key], key


def test_non_finite_loss_names_phase_and_step_and_keeps_last_checkpoint(tmp_path):
    train(tiny_config(tmp_path, "run.name=r", "train.max_steps=10", "eval.final_test=false"))
    good = checkpoint.load(tmp_path / "r")
    with pytest.raises(NonFiniteLossError, match=r"loss became non-finite at step 1\d.*intact"):
        train(tiny_config(tmp_path, "run.name=r", "train.max_steps=40", "train.lr=1e38"),
              resume=tmp_path / "r")
    kept = checkpoint.load(tmp_path / "r")
    assert kept["step"] == 10
    for name, tensor in good["networks"].items():
        assert torch.equal(tensor, kept["networks"][name])


def test_a_non_finite_loss_is_named_at_the_step_tensorboard_gives_it(tmp_path, monkeypatch):
    around_iteration(monkeypatch, 3, lambda run: {**run(), "supervised": torch.tensor(float("nan"))})
    # The third step: TensorBoard logs its losses at step 3, its checkpoint would be step 3.
    with pytest.raises(NonFiniteLossError, match=r"the supervised loss became non-finite at step 3 \("):
        train(tiny_config(tmp_path, "train.max_steps=10", "run.log_every=5"))


def test_logged_means_span_a_term_starting_mid_window_and_the_first_bad_step_is_named():
    def losses(**values):
        return {name: torch.tensor(value) for name, value in values.items()}

    tracker = LossTracker(torch.device("cpu"))
    tracker.add(0, losses(reconstruction=1.0, supervised=2.0))
    tracker.add(1, losses(reconstruction=3.0, supervised=4.0, vat=10.0))  # VAT starts
    tracker.check()
    assert tracker.pop_means() == {"reconstruction": 2.0, "supervised": 3.0, "vat": 10.0}
    tracker.add(2, losses(reconstruction=5.0, supervised=6.0, vat=20.0))
    assert tracker.pop_means() == {"reconstruction": 5.0, "supervised": 6.0, "vat": 20.0}

    tracker.add(3, losses(reconstruction=1.0, supervised=float("inf"), vat=1.0))
    tracker.add(4, losses(reconstruction=float("nan"), supervised=1.0))
    tracker.add(5, losses(reconstruction=float("nan"), supervised=float("nan"), vat=1.0))
    with pytest.raises(NonFiniteLossError, match="the supervised loss became non-finite at step 3"):
        tracker.check()


@pytest.mark.parametrize("adversary_answer, adversary_accuracy", [(7, 1.0), (2, 0.0)])
def test_adversary_floor_is_the_share_of_the_commonest_predicted_class(
        tmp_path, adversary_answer, adversary_accuracy):
    """q(y|x) answers 7 for every image, whatever its label: an adversary that
    ignores z and answers 7 is always right, so the floor is 100 %."""
    config = tiny_config(tmp_path)
    data = load_data(config.data, config.seed)
    nets = build_networks(config, data.image_shape, data.num_classes)
    with torch.no_grad():
        for head, answer in ((nets.encoder.y_head, 7), (nets.correlation.net[-1], adversary_answer)):
            head.weight.zero_()
            head.bias.zero_()
            head.bias[answer] = 1.0
    metrics = evaluate(nets, data.validation, data.labelled, config.eval, data.num_classes, "cpu")
    assert metrics["adversary_floor"] == 1.0
    assert metrics["adversary_accuracy"] == adversary_accuracy
    assert metrics["accuracy"] < 0.5  # the labels are not all 7


def test_an_ensembles_adversary_accuracy_is_its_best_classifiers(tmp_path):
    """q(y|x) answers 7 everywhere; of three classifiers only the second does too."""
    config = tiny_config(tmp_path, "model.correlation_classifiers=3")
    data = load_data(config.data, config.seed)
    nets = build_networks(config, data.image_shape, data.num_classes)
    heads = [nets.encoder.y_head, *(member.net[-1] for member in nets.correlation.members)]
    with torch.no_grad():
        for head, answer in zip(heads, (7, 2, 7, 3)):
            head.weight.zero_()
            head.bias.zero_()
            head.bias[answer] = 1.0
    metrics = evaluate(nets, data.validation, data.labelled, config.eval, data.num_classes, "cpu")
    assert metrics["adversary_accuracy"] == 1.0


def test_cluster_accuracy_names_each_cluster_after_its_best_matching_label():
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 2, 2])
    renamed = (labels + 1) % 3  # perfect clusters under other names
    assert cluster_accuracy(renamed, labels, 3) == 1.0
    # Collapsed onto one class: only the largest class can be matched.
    assert cluster_accuracy(torch.zeros_like(labels), labels, 3) == 0.5
    # Two labels share a cluster: one of them is matched, the other is an error.
    merged = torch.tensor([1, 1, 1, 1, 0, 0, 0, 0])
    assert cluster_accuracy(merged, labels, 3) == 0.75


@pytest.mark.parametrize("step_mode", ["reference", "fused"])
def test_a_training_iteration_never_searches_the_import_path(tmp_path, monkeypatch, step_mode):
    """A GPU step at batch 100 is bound by host time: nothing in an iteration
    may look for packages on sys.path (Accelerate's optimizer wrapper did)."""
    import importlib.util

    from daae.prepare import make_accelerator, prepare_training
    from daae.iteration import training_iteration

    config = tiny_config(tmp_path, f"train.step_mode={step_mode}")
    setup = prepare_training(config, make_accelerator("no"), load_data(config.data, config.seed))
    training_iteration(setup.ctx, setup.optimizers, setup.batches, 1, 0, config)  # first calls may import
    searches, find_spec = [], importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: searches.append(name) or find_spec(name, *args))
    for step in (1, 2):
        training_iteration(setup.ctx, setup.optimizers, setup.batches, 1, step, config)
    assert searches == []


def test_periodic_probes_stay_short_and_the_final_probe_trains_its_full_length(tmp_path, monkeypatch):
    import daae.evaluate

    budgets, train_probe = [], daae.evaluate.train_probe

    def recording(probe, z, labels, config, seed):
        budgets.append(config.probe_epochs)
        return train_probe(probe, z, labels, config, seed)

    monkeypatch.setattr(daae.evaluate, "train_probe", recording)
    train(tiny_config(tmp_path, "train.max_steps=20", "run.eval_every=10", "eval.final_test=false",
                      "eval.probes_during_training=true", "eval.probe_epochs_during_training=1",
                      "eval.probe_epochs=4"))
    # An MLP and a linear probe at step 10, then at the end.
    assert budgets == [1, 1, 4, 4]
