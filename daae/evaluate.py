"""The metrics of DESIGN.md section 4, computed on one split in eval mode."""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix

from .config import CLASS_MAP_KEYS, CLASS_MAPPED_METRICS, ConfigError, EvalConfig
from .data import ImageSet, to_float
from .models import Critic, Networks
from .whitening import CLASS_MAPS, ClassMap, WhiteningError


@dataclass
class Encoded:
    logits_y: torch.Tensor
    z: torch.Tensor
    recon_mse: torch.Tensor


@torch.no_grad()
def encode(nets: Networks, images: torch.Tensor, batch_size: int, device) -> Encoded:
    """Codes of uint8 ``images`` with the networks in eval mode and no input noise."""
    was_training = nets.training
    nets.eval()
    logits, codes, squared_error = [], [], torch.zeros((), device=device)
    for start in range(0, len(images), batch_size):
        x = to_float(images[start:start + batch_size].to(device))
        logits_y, z = nets.encoder(x)
        x_hat = nets.decoder(logits_y.softmax(1), z)
        squared_error += F.mse_loss(x_hat.float(), x, reduction="sum")
        logits.append(logits_y.float())
        codes.append(z.float())
    nets.train(was_training)
    return Encoded(torch.cat(logits), torch.cat(codes), squared_error / images[0].numel() / len(images))


def _accuracy(logits: torch.Tensor, labels: torch.Tensor, num_classes: int) -> float:
    metric = MulticlassAccuracy(num_classes=num_classes, average="micro").to(logits.device)
    return float(metric(logits, labels))


def cluster_accuracy(predictions: torch.Tensor, labels: torch.Tensor, num_classes: int) -> float:
    """Accuracy of the predicted classes under their best one-to-one renaming.

    The accuracy q(y|x) would have if its clusters were named after the labels
    optimally (Hungarian matching on the confusion matrix): equal to the plain
    accuracy once the labels have named the clusters, and the measure of how
    well the categorical adversary clusters when there are no labels. A
    collapse onto fewer classes scores at most the share of those classes.
    """
    from scipy.optimize import linear_sum_assignment

    confusion = MulticlassConfusionMatrix(num_classes).to(labels.device)(predictions, labels)
    rows, cols = linear_sum_assignment(confusion.cpu().numpy(), maximize=True)
    return float(confusion[rows, cols].sum()) / len(labels)


def train_probe(probe: nn.Module, z: torch.Tensor, labels: torch.Tensor, config: EvalConfig,
                seed: int) -> nn.Module:
    """Fit a fresh classifier on frozen codes (already standardised).

    A probe stopped after a fixed few epochs under-reads the class: it is the
    figure that counts, so it trains until its loss on a held-out share of its
    own training codes stops falling (``eval.probe_patience`` epochs) and keeps
    its best epoch, at most ``eval.probe_epochs``. The loss, not the accuracy:
    held-out accuracy moves in steps smaller than its noise while the probe is
    still learning, and stopped it too soon. The split the probe is scored on
    plays no part in that choice.
    """
    generator = torch.Generator(device=z.device).manual_seed(seed)
    held_out = int(len(z) * config.probe_holdout)
    # Without a held-out share the random draws are those of the fixed-epoch
    # probe that daae had before, so its earlier figures repeat exactly.
    order = (torch.randperm(len(z), generator=generator, device=z.device) if held_out
             else torch.arange(len(z), device=z.device))
    fit, held = order[held_out:], order[:held_out]
    optimizer = torch.optim.Adam(probe.parameters(), lr=config.probe_lr)
    best_loss, best_state, epochs_since_best = math.inf, None, 0
    for _ in range(config.probe_epochs):
        probe.train()
        shuffled = fit[torch.randperm(len(fit), generator=generator, device=z.device)]
        for start in range(0, len(shuffled), config.probe_batch_size):
            index = shuffled[start:start + config.probe_batch_size]
            loss = F.cross_entropy(probe(z[index]), labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        if not torch.isfinite(loss):  # a diverged probe answers one class: chance, read as no class in z
            raise ConfigError(f"the probe's training loss became non-finite: lower eval.probe_lr "
                              f"(now {config.probe_lr})")
        if held_out == 0:
            continue
        probe.eval()
        with torch.no_grad():
            held_loss = float(F.cross_entropy(probe(z[held]), labels[held]))
        if held_loss < best_loss:
            best_loss, epochs_since_best = held_loss, 0
            best_state = {k: v.detach().clone() for k, v in probe.state_dict().items()}
        else:
            epochs_since_best += 1
            if config.probe_patience and epochs_since_best >= config.probe_patience:
                break
    if best_state is not None:
        probe.load_state_dict(best_state)
    probe.eval()
    return probe


@dataclass
class Probes:
    """Fresh classifiers fitted on frozen codes of training images, and the
    statistics that standardised those codes. The fit does not depend on the
    split scored, so one fit serves every split."""
    mean: torch.Tensor
    std: torch.Tensor
    classifiers: dict[str, nn.Module]

    @torch.no_grad()
    def accuracies(self, z: torch.Tensor, labels: torch.Tensor, num_classes: int) -> dict[str, float]:
        z = (z - self.mean) / self.std
        return {name: _accuracy(probe(z), labels, num_classes) for name, probe in self.classifiers.items()}


@dataclass
class ProbeSet:
    """The probes on the raw codes and, for each map of ``eval.class_maps()``
    (``eval.class_whitened_probes``, ``eval.class_gaussianized_probes``), a
    second pair on the same codes mapped within their predicted class
    (``daae.whitening.CLASS_MAPS``, fitted on those training codes), or the
    reason the map could not be fitted (``map_errors``)."""
    raw: Probes
    mapped: dict[str, tuple[ClassMap, Probes]] = field(default_factory=dict)
    map_errors: dict[str, str] = field(default_factory=dict)

    def accuracies(self, encoded: Encoded, labels: torch.Tensor, num_classes: int) -> dict[str, float]:
        metrics = self.raw.accuracies(encoded.z, labels, num_classes)
        predicted = encoded.logits_y.argmax(1)
        for name, (class_map, probes) in self.mapped.items():
            # Gaussianized codes come in float64; the probes are float32.
            mapped_z = class_map.whiten(encoded.z, predicted).float()
            metrics.update({f"class_{name}_{metric}": value for metric, value in
                            probes.accuracies(mapped_z, labels, num_classes).items()})
        return metrics


def fit_probes_on_codes(train_z: torch.Tensor, train_labels: torch.Tensor, num_classes: int,
                        config: EvalConfig, seed: int) -> Probes:
    """An MLP like C and a linear classifier, fitted on ``train_z`` standardised."""
    mean, std = train_z.mean(0), train_z.std(0).clamp_min(1e-6)
    train_z = (train_z - mean) / std
    z_dim = train_z.shape[1]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        probes = {"probe_accuracy": Critic(z_dim, num_classes, config.probe_hidden),
                  "linear_probe_accuracy": nn.Linear(z_dim, num_classes)}
    with torch.enable_grad():
        classifiers = {name: train_probe(probe.to(train_z.device), train_z, train_labels, config, seed)
                       for name, probe in probes.items()}
    return Probes(mean, std, classifiers)


def probe_accuracies(train_z: torch.Tensor, train_labels: torch.Tensor, eval_z: torch.Tensor,
                     eval_labels: torch.Tensor, num_classes: int, config: EvalConfig,
                     seed: int) -> dict[str, float]:
    """How much class a fresh classifier recovers from z (chance: 1/K).

    The adversary C can sit at chance while z still carries the class in a form
    C has not learned to read (Elazar & Goldberg, 2018); a probe trained from
    scratch after training is the honest measure.
    """
    return fit_probes_on_codes(train_z, train_labels, num_classes, config, seed).accuracies(
        eval_z, eval_labels, num_classes)


def fit_probes(nets: Networks, probe_train: ImageSet, config: EvalConfig, num_classes: int,
               device, seed: int, strict: bool = False) -> ProbeSet:
    """The post-hoc probes on the codes of ``config.probe_train_size`` images of
    ``probe_train``, drawn with ``seed``; for each map of ``config.class_maps()``
    also a pair on those codes mapped within their predicted class. A map that
    cannot be fitted raises ``WhiteningError`` with ``strict``, else is named in
    ``map_errors`` and its pair left out."""
    subset = probe_train.subset(torch.randperm(
        len(probe_train), generator=torch.Generator().manual_seed(seed))[:config.probe_train_size])
    encoded = encode(nets, subset.images, config.batch_size, device)
    predicted = encoded.logits_y.argmax(1)
    class_maps, map_errors = {}, {}
    # Before the slow probe fits, so that `daae eval` fails fast on them.
    for name in config.class_maps():
        try:
            class_maps[name] = CLASS_MAPS[name].fit(encoded.z, predicted, num_classes).to(device)
        except WhiteningError as exc:
            if strict:
                key = CLASS_MAP_KEYS[name]
                raise WhiteningError(f"{key}: {exc}; or set {key}=false") from None
            # Early in training a class can be predicted too rarely; that
            # evaluation then lacks the pair rather than ending the run.
            map_errors[name] = str(exc)
    labels = subset.labels.to(device)
    probes = ProbeSet(fit_probes_on_codes(encoded.z, labels, num_classes, config, seed),
                      map_errors=map_errors)
    for name, class_map in class_maps.items():
        mapped_z = class_map.whiten(encoded.z, predicted).float()
        probes.mapped[name] = (class_map, fit_probes_on_codes(mapped_z, labels, num_classes, config, seed))
    return probes


@torch.no_grad()
def evaluate(nets: Networks, split: ImageSet, labelled: ImageSet, config: EvalConfig,
             num_classes: int, device, probes: ProbeSet | None = None) -> dict[str, float]:
    """Metrics on ``split``; with ``probes`` (``fit_probes``) also the post-hoc probes."""
    encoded = encode(nets, split.images, config.batch_size, device)
    labels = split.labels.to(device)
    was_training = nets.training
    nets.eval()
    adversary_logits = nets.correlation(encoded.z)
    nets.train(was_training)
    q = encoded.logits_y.softmax(1)
    predicted = q.argmax(1)
    marginal = q.mean(0)
    metrics = {
        "accuracy": _accuracy(encoded.logits_y, labels, num_classes),
        # An ensemble (model.correlation_classifiers) scores as its best member.
        "adversary_accuracy": float((adversary_logits.argmax(-1) == predicted).float()
                                    .reshape(-1, len(predicted)).mean(1).max()),
        # What an adversary that ignores z scores: always the most frequent
        # predicted class. Above chance (1/K) when q(y|x)'s classes are unequal
        # (MNIST test: the digit 1, 11.35 %), so the adversary reads against it.
        "adversary_floor": float(torch.bincount(predicted, minlength=num_classes).max()) / len(predicted),
        "recon_mse": float(encoded.recon_mse),
        "z_mean": float(encoded.z.mean()),
        "z_std": float(encoded.z.std()),
        "y_marginal_entropy": float(-(marginal * marginal.clamp_min(1e-12).log()).sum()),
        "y_marginal_entropy_max": math.log(num_classes),
        "cluster_accuracy": cluster_accuracy(predicted, labels, num_classes),
    }
    labelled_logits = encode(nets, labelled.images, config.batch_size, device).logits_y
    metrics["labelled_accuracy"] = _accuracy(labelled_logits, labelled.labels.to(device), num_classes)
    if probes is not None:
        metrics.update(probes.accuracies(encoded, labels, num_classes))
    return metrics


def tensorboard_tags(split_name: str, metrics: dict[str, float]) -> dict[str, float]:
    """DESIGN.md's metric families as TensorBoard tags, per split."""
    family = {"accuracy": f"{split_name}/accuracy",
              "labelled_accuracy": "train/labelled_accuracy",
              "adversary_accuracy": f"decorrelation/{split_name}/adversary_accuracy",
              "adversary_floor": f"decorrelation/{split_name}/adversary_floor",
              "probe_accuracy": f"decorrelation/{split_name}/probe_accuracy",
              "linear_probe_accuracy": f"decorrelation/{split_name}/linear_probe_accuracy",
              **{metric: f"decorrelation/{split_name}/{metric}" for metric in CLASS_MAPPED_METRICS},
              "recon_mse": f"recon/{split_name}/mse",
              "z_mean": f"z/{split_name}/mean",
              "z_std": f"z/{split_name}/std",
              "y_marginal_entropy": f"y/{split_name}/marginal_entropy",
              "cluster_accuracy": f"y/{split_name}/cluster_accuracy"}
    return {family[k]: v for k, v in metrics.items() if k in family}


def evaluate_run(run_dir, split: str = "test", overrides: list[str] = (), device=None,
                 generation: bool = True, class_map: str | None = None) -> dict:
    """``daae eval``: the metrics of a run folder's last checkpoint on one split,
    probes included, as flat keys. ``generation=False`` skips the generation
    checks, whose checker takes minutes to train the first time.
    ``class_map`` ("whitened" or "gaussianized", ``daae.whitening.CLASS_MAPS``)
    reads every metric on z re-expressed within its predicted class by that map,
    fitted on the training images' codes, and leaves out the adversary, which
    was trained on the raw codes."""
    from .consistency import generation_consistency
    from .runs import load_trained_run, resolve_device
    from .whitening import whiten_networks

    device = resolve_device(device)
    run = load_trained_run(run_dir, device, overrides)
    data = run.data
    target = data.test if split == "test" else data.validation
    train_images = data.train_images()
    eval_config = run.config.eval
    if class_map is not None:
        whiten_networks(run.nets, train_images, eval_config.batch_size, device, class_map)
        # Every probe then reads mapped codes already: a mapped pair would map
        # them again.
        eval_config = replace(eval_config, class_whitened_probes=False, class_gaussianized_probes=False)
    probes = fit_probes(run.nets, train_images, eval_config, data.num_classes, device,
                        run.config.seed, strict=True)
    metrics = evaluate(run.nets, target, data.labelled, eval_config, data.num_classes, device, probes)
    if class_map is not None:
        del metrics["adversary_accuracy"]
        metrics[f"class_{class_map}"] = True
    flat = {f"{split}_accuracy" if key == "accuracy" else key: value for key, value in metrics.items()}
    if generation:
        flat.update(generation_consistency(run.nets, data, run.config, device))
    flat.update(split=split, step=int(run.state["step"]))
    return flat
