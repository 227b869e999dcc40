"""Typed configuration: one dataclass per concern, loaded from YAML plus
``dotted.key=value`` overrides.

Every key is declared here with its type, so a typo in a YAML file or in a
search space raises instead of being silently ignored (daae.schema checks them).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import yaml

from .atomic import atomic_write
from .schema import ConfigError, apply_overrides, build_dataclass, read_yaml


@dataclass
class DataConfig:
    name: str = "mnist"  # mnist | svhn | synthetic
    # Folder with the raw files; None: $DAAE_DATA_DIR, else a per-user cache.
    root: Optional[str] = None
    download: bool = True
    # None: every training image is labelled (protocol ALL).
    labels_per_class: Optional[int] = 10
    validation_size: int = 10000
    # The validation split is drawn with its own seed so that every seed
    # (labelled subset) is selected on the same held-out images.
    split_seed: int = 0
    svhn_extra: bool = False
    # Translate every training image (unlabelled and labelled, not evaluation's)
    # by a random offset of up to this many pixels per axis, zero-filled,
    # before the input noise; 0: none, as in the paper.
    max_shift: int = 0
    # Only for name=synthetic: a small class-structured set for tests/smoke runs.
    synthetic_train_size: int = 3000
    synthetic_test_size: int = 500
    synthetic_image_size: int = 28


@dataclass
class ModelConfig:
    kind: str = "conv"  # mlp | conv
    z_dim: int = 9
    # MLP: hidden width 1000*scale; conv: channel multiplier s.
    scale: float = 2.0
    # Width of the hidden layers of D_z, D_y and the correlation classifier C.
    adversary_hidden: int = 1000
    # How many correlation classifiers C, each its own initialisation, learn
    # the class from z side by side; the decorrelation and C's loss average
    # over them. One C is one reading of z that the encoder can outrun while
    # another still finds the class (Elazar & Goldberg 2018 tried an ensemble
    # of adversaries to remove more of it); evaluation reports the best of them.
    correlation_classifiers: int = 1
    # C reads z standardised per dimension (batch statistics; running ones in
    # evaluation), as the probes do. With random shifts the unaltered images'
    # codes fill a region a tenth of the prior's spread, too small for the
    # ReLU kinks of a C reading raw codes: on frozen codes such a C reads 12 %
    # where the same MLP on standardised codes reads 16 %, so the encoder hides
    # the class from a blunter reader than the probe that scores it. On MNIST
    # it lowers the short probe, not the full one (docs/results.md "C reads z
    # standardised"), so the shipped configs leave it off.
    correlation_standardised: bool = False
    # D_z reads each code beside its class (the one-hot argmax of q(y|x), held
    # fixed), and each prior draw beside the class of the same row: z must
    # then match N(0, I) within every class, which is independence from the
    # class, not only in the marginal. It removes the class from the codes D_z
    # reads (the training inputs'), not from the unaltered images' codes that
    # the probes read, so the shipped configs leave it off (docs/results.md
    # "D_z sees the class").
    class_conditional_prior: bool = False
    # z whitened within its predicted class inside the encoder, by a running
    # mean and covariance per class of C's rows as evaluation encodes them
    # (daae.models.RunningClassWhitening): the codes the probes read then
    # have matched class-wise first two moments, as `daae eval
    # --class-whitened` gives them after training. It raised the adversary
    # and the probes with 100 labels (docs/results.md "Whitened in
    # training"), so the shipped configs leave it off.
    class_whitening: bool = False
    input_noise: float = 0.3


@dataclass
class TrainConfig:
    batch_size: int = 100
    epochs: int = 150
    # Stop after this many iterations (smoke runs); None: run all epochs.
    max_steps: Optional[int] = None
    lr: float = 3e-4
    lr_milestones: list[int] = field(default_factory=lambda: [20, 50])
    lr_decay: float = 0.1
    # The critics' (D_z, D_y and C) own milestones; None: train.lr_milestones.
    # [] keeps their learning rate while the encoder's drops, so that C still
    # tracks a slowly moving z and the decorrelation pushes against the class
    # information z really holds, not against a C that lags behind it.
    critic_lr_milestones: Optional[list[int]] = None
    # C's learning rate as a multiple of the critics' (train.lr, under
    # critic_lr_milestones). C learns online against a z the encoder keeps
    # moving; a C that lags is fooled while a fresh classifier (the MLP probe)
    # still reads the class from z.
    correlation_lr_scale: float = 1.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    mixed_precision: str = "no"  # no | bf16 | fp16
    # reference: six phases (one more each for loss.consistency, loss.vat and
    # loss.independence), each its own forward and optimizer step, in
    # DESIGN.md order; fused: one encoder forward (and VAT's power iteration
    # before it) and one pass through each critic feed every loss, then one
    # critic step and one encoder/decoder step.
    step_mode: str = "reference"  # reference | fused
    # torch.compile the networks each step trains: no | default | reduce-overhead
    # (adds CUDA graphs, for a GPU step bound by kernel launches) | max-autotune.
    compile: str = "no"
    # One CUDA GPU, one process: record the whole iteration (batch draws,
    # every forward, backward and Adam step, either step_mode) as one CUDA
    # graph and replay it, captured afresh when a learning rate or a loss weight changes
    # (daae/graphed.py). The step at batch 100 is bound by the host's cost per
    # operator; a replay is one launch.
    cuda_graph: bool = False
    # Conv model only: weights and activations in channels-last (NHWC) layout,
    # which oneDNN and cuDNN convolve without reordering every layer's input.
    channels_last: bool = True
    # Each reference phase has its own Adam, which is invariant to the scale of
    # its loss; scaling the phase's learning rate by its weight (as the
    # reference does for decorrelation) is what makes the weights matter.
    weights_scale_lr: bool = True


@dataclass
class LossConfig:
    reconstruction: float = 1.0
    adversarial_z: float = 1.0
    adversarial_y: float = 1.0
    supervised: float = 1.0
    decorrelation: float = 0.5  # 0 turns the phase off
    decorrelation_objective: str = "maximize_ce"  # maximize_ce | uniform
    decorrelation_start_epoch: int = 1
    correlation_target: str = "soft"  # soft: q(y|x); hard: its argmax
    # What C and the decorrelation read z from. training: the training inputs
    # (shifted, noisy), as the reference does; clean: the unaltered unlabelled
    # images, which is what the probes and every user of z see. Shifts and
    # noise move z off the clean images' codes, and a z decorrelated only
    # there can still carry the class on clean images; both: the two sets of
    # codes as one batch, since one decorrelated only on clean images still
    # carries the class on the shifted ones it is trained on.
    correlation_input: str = "training"  # training | clean | both
    # Which batch-norm statistics normalise the codes C, the decorrelation and
    # the independence term read. training: the statistics of the training
    # forward they come from, as for every other term; evaluation: the
    # encoder's running averages, as evaluation, the probes and every user of
    # z compute codes (a second encoder forward of C's rows, which leaves the
    # averages as they are). The training forward's batch (shifted, labelled,
    # unaltered and perturbed images together) moves the codes by 8-20 % of
    # their spread (docs/results.md "The codes C reads in training and the
    # codes the probes read"), so a z decorrelated there can still carry the
    # class on the codes the probes read.
    correlation_batch_norm: str = "training"  # training | evaluation
    # First epoch whose steps read evaluation codes (with
    # correlation_batch_norm evaluation; training codes before it). From
    # scratch, evaluation codes left a fresh probe reading more of the class
    # at epoch 10 than training codes did; switched on at epoch 41 they lowered
    # it (docs/results.md "C reads the evaluation codes, from scratch").
    correlation_batch_norm_start_epoch: int = 0
    # Consistency (not in the paper; the Pi-model's and UDA's term): pull q(y|x)
    # of each shifted, noisy unlabelled image toward q(y|x) of the same image
    # unaltered, a target held fixed, by KL(q_clean || q_training). Through a
    # saturated softmax the reconstruction's and D_y's gradients vanish, so a
    # confident encoding never moves; this term's gradient on the logits is
    # q_training - q_clean, which does not vanish where the two views disagree.
    # 0: off. Needs views that differ: data.max_shift or model.input_noise > 0.
    consistency: float = 0.0
    # Virtual adversarial training (Miyato et al. 2018; not in the paper): pull
    # q(y|x) of each unaltered unlabelled image plus the perturbation of L2
    # norm vat_epsilon (pixels in [0, 1]) that changes it most toward q(y|x) of
    # the image, a target held fixed. Random shifts and noise probe a few
    # directions; this one finds, per image, the direction where the class
    # boundary is nearest. 0: off.
    vat: float = 0.0
    vat_epsilon: float = 2.0
    # First epoch with the VAT term. From the start, VAT can settle a labelled
    # subset on a wrong partition within a few hundred steps (seed 2, docs/results.md
    # "Virtual adversarial training"); started later, it refines the clusters
    # that the supervised and consistency terms have formed.
    vat_start_epoch: int = 0
    # Independence (not in the paper): the normalised HSIC between z and C's
    # targets on the rows C reads (daae/dependence.py), added to the encoder's
    # loss with this weight from loss.decorrelation_start_epoch on. C can be
    # fooled while a fresh classifier still reads the class from z; this
    # kernel measure has no network to fool. 0: off.
    independence: float = 0.0


# What eval.class_whitened_probes and eval.class_gaussianized_probes add to
# the metrics, by map (daae.whitening.CLASS_MAPS): summary columns and search
# metrics name them from here.
CLASS_MAP_METRICS = {name: (f"class_{name}_probe_accuracy", f"class_{name}_linear_probe_accuracy")
                     for name in ("whitened", "gaussianized")}
CLASS_MAPPED_METRICS = tuple(metric for pair in CLASS_MAP_METRICS.values() for metric in pair)
# The key that turns each map's pair on.
CLASS_MAP_KEYS = {name: f"eval.class_{name}_probes" for name in CLASS_MAP_METRICS}


@dataclass
class EvalConfig:
    # Post-hoc probes on frozen z (DESIGN.md section 4).
    probe_hidden: int = 1000
    # The most epochs: a probe stops once its loss on probe_holdout of its
    # training codes has not fallen for probe_patience epochs (0: never stops
    # early), and keeps its best epoch. Fewer epochs or codes under-read the
    # class (docs/results.md, *How long to train the probe*).
    probe_epochs: int = 50
    probe_patience: int = 3
    probe_holdout: float = 0.1
    probe_train_size: int = 50000
    probe_batch_size: int = 256
    probe_lr: float = 1e-3
    # Run the (slower) probes at every periodic evaluation, not only at the end.
    probes_during_training: bool = False
    # Their most epochs there: those probes draw curves and feed Tune's
    # schedulers, and stay cheap; the final evaluation and `daae eval` use
    # probe_epochs.
    probe_epochs_during_training: int = 3
    # A second pair of probes on the same codes whitened within their
    # predicted class (the map of `daae eval --class-whitened`, fitted on the
    # probes' training codes): class_whitened_probe_accuracy and
    # class_whitened_linear_probe_accuracy, wherever the probes run. Doubles
    # the probes' time.
    class_whitened_probes: bool = False
    # The same with the map of `daae eval --class-gaussianized` (whitened, then
    # each class's shape made normal; needs 256 of the probes' codes predicted
    # in every class): class_gaussianized_probe_accuracy and
    # class_gaussianized_linear_probe_accuracy. Another probe fit too.
    class_gaussianized_probes: bool = False
    # Report test metrics in metrics.json at the end (never used for selection).
    final_test: bool = True
    batch_size: int = 1000

    def class_maps(self) -> list[str]:
        """The maps (keys of CLASS_MAP_METRICS) whose probe pairs run."""
        return [name for name in CLASS_MAP_METRICS if getattr(self, f"class_{name}_probes")]


@dataclass
class RunConfig:
    dir: str = "runs"
    name: Optional[str] = None  # None: a timestamped name
    log_every: int = 50
    eval_every: int = 1000
    checkpoint_every: int = 1000
    progress_bar: bool = True  # shown only when stderr is a terminal


@dataclass
class Config:
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    run: RunConfig = field(default_factory=RunConfig)


CHOICES = {
    "data.name": ("mnist", "svhn", "synthetic"),
    "model.kind": ("mlp", "conv"),
    "train.mixed_precision": ("no", "bf16", "fp16"),
    "train.step_mode": ("reference", "fused"),
    "train.compile": ("no", "default", "reduce-overhead", "max-autotune"),
    "loss.decorrelation_objective": ("maximize_ce", "uniform"),
    "loss.correlation_target": ("soft", "hard"),
    "loss.correlation_input": ("training", "clean", "both"),
    "loss.correlation_batch_norm": ("training", "evaluation"),
}
CLASS_SIZES = {"mnist": 5421, "svhn": 4659}  # smallest class of each training set


def from_dict(values: dict) -> Config:
    config = build_dataclass(Config, values or {})
    validate(config)
    return config


def to_dict(config) -> dict:
    return dataclasses.asdict(config)


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """The config of a YAML file and ``dotted.key=value`` overrides. An error
    names where its cause was written: the file, or the override."""
    values = read_yaml(path) if path is not None else {}
    in_file = f" (in {path})" if path is not None else ""
    try:
        build_dataclass(Config, values)
    except ConfigError as exc:
        raise ConfigError(f"{exc}{in_file}") from None
    for override in overrides:
        try:
            values = apply_overrides(values, [override])  # one at a time, to name the culprit
            build_dataclass(Config, values)
        except ConfigError as exc:
            raise ConfigError(f"{exc} (in the override '{override}')") from None
    try:
        return from_dict(values)
    except ConfigError as exc:  # a check across keys: the file's, the overrides' or both
        given = f"{in_file[:-1]} with the overrides)" if overrides and in_file else in_file
        raise ConfigError(f"{exc}{given}") from None


def save_config(config: Config, path: str | Path) -> None:
    # Rewritten at every start and resume, and --resume, eval and sample read it:
    # a kill mid-write must leave the old file, not half of the new one.
    text = yaml.safe_dump(to_dict(config), sort_keys=False)
    atomic_write(path, lambda handle: handle.write(text), binary=False)


# ---------------------------------------------------------------------- validation

def _require(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"{key}: {message}")


def _increasing_epochs(milestones: list[int]) -> bool:
    # Strictly: a repeated epoch would multiply by the drop twice there.
    return all(a < b for a, b in zip(milestones, milestones[1:])) and all(m >= 1 for m in milestones)


def validate(config: Config) -> None:
    for key, allowed in CHOICES.items():
        section, name = key.split(".")
        value = getattr(getattr(config, section), name)
        _require(value in allowed, key, f"got {value!r}; expected one of {', '.join(allowed)}")

    data, model, train, loss = config.data, config.model, config.train, config.loss
    if data.labels_per_class is not None:
        _require(data.labels_per_class >= 1, "data.labels_per_class",
                 "must be at least 1 (or null for every label)")
        smallest = CLASS_SIZES.get(data.name)
        if smallest is not None:
            _require(data.labels_per_class <= smallest, "data.labels_per_class",
                     f"{data.labels_per_class} is more than the smallest {data.name} class "
                     f"holds ({smallest}, before data.validation_size takes its share); use "
                     f"fewer, or null for all labels")
    # Two codes at least: the latent map's principal axes (and a spread) need them.
    _require(data.validation_size >= 2, "data.validation_size", "must be at least 2")
    _require(0 <= data.max_shift <= 8, "data.max_shift",
             f"must be a number of pixels from 0 (no shift) to 8, got {data.max_shift}")
    _require(data.synthetic_image_size in (28, 32), "data.synthetic_image_size", "must be 28 or 32")
    _require(data.synthetic_train_size > data.validation_size or data.name != "synthetic",
             "data.validation_size",
             f"must be smaller than data.synthetic_train_size ({data.synthetic_train_size})")
    _require(data.synthetic_test_size >= 1, "data.synthetic_test_size", "must be at least 1")
    _require(model.z_dim >= 1, "model.z_dim", "must be at least 1")
    _require(model.scale > 0, "model.scale", "must be positive")
    _require(model.adversary_hidden >= 1, "model.adversary_hidden", "must be at least 1")
    _require(model.correlation_classifiers >= 1, "model.correlation_classifiers", "must be at least 1")
    _require(model.input_noise >= 0, "model.input_noise", "must be 0 or more")
    _require(train.batch_size >= 2, "train.batch_size", "must be at least 2 (batch norm)")
    _require(train.epochs >= 1, "train.epochs", "must be at least 1")
    _require(train.max_steps is None or train.max_steps >= 1, "train.max_steps",
             "must be at least 1, or null to run every epoch")
    _require(train.lr > 0, "train.lr", "must be positive")
    _require(_increasing_epochs(train.lr_milestones),
             "train.lr_milestones", "must be increasing epoch numbers, each at least 1")
    _require(train.critic_lr_milestones is None or _increasing_epochs(train.critic_lr_milestones),
             "train.critic_lr_milestones",
             "must be increasing epoch numbers, each at least 1 ([] for none), or null to follow "
             "train.lr_milestones")
    if train.cuda_graph:
        _require(train.mixed_precision != "fp16", "train.cuda_graph",
                 "cannot hold fp16's loss scaler (it reads the scale on the host every step): "
                 "use train.mixed_precision=bf16 or no, or train.cuda_graph=false")
        _require(train.compile == "no", "train.cuda_graph",
                 "is a graph of the whole step already; train.compile would capture inside it: "
                 "set train.compile=no, or train.cuda_graph=false")
    _require(0 < train.lr_decay <= 1, "train.lr_decay", "must be in (0, 1]")
    _require(train.correlation_lr_scale > 0, "train.correlation_lr_scale", "must be positive")
    _require(0 <= train.adam_beta1 < 1, "train.adam_beta1", "must be in [0, 1)")
    _require(0 <= train.adam_beta2 < 1, "train.adam_beta2", "must be in [0, 1)")
    for name in ("reconstruction", "adversarial_z", "adversarial_y", "supervised", "decorrelation",
                 "consistency", "vat", "independence"):
        _require(getattr(loss, name) >= 0, f"loss.{name}",
                 f"must be 0 or more (0 turns the phase off), got {getattr(loss, name)}")
    # Without shifts or noise the training inputs are the unaltered images.
    views_differ = data.max_shift > 0 or model.input_noise > 0
    _require(loss.consistency == 0 or views_differ, "loss.consistency",
             "compares the training inputs with the unaltered images, which are the same without "
             "shifts or noise: set data.max_shift or model.input_noise above 0, or "
             "loss.consistency to 0")
    _require(loss.correlation_input != "both" or views_differ, "loss.correlation_input",
             "both reads the training inputs' codes and the unaltered images', which are the same "
             "without shifts or noise: set data.max_shift or model.input_noise above 0, or "
             "loss.correlation_input to training or clean")
    _require(loss.vat_epsilon > 0, "loss.vat_epsilon",
             f"must be positive (the perturbation's L2 norm per image), got {loss.vat_epsilon}")
    _require(loss.decorrelation_start_epoch >= 0, "loss.decorrelation_start_epoch", "must be 0 or more")
    _require(loss.vat_start_epoch >= 0, "loss.vat_start_epoch", "must be 0 or more")
    _require(loss.correlation_batch_norm_start_epoch >= 0, "loss.correlation_batch_norm_start_epoch",
             "must be 0 or more")
    for name in ("probe_hidden", "probe_epochs", "probe_epochs_during_training",
                 "probe_batch_size", "batch_size"):
        _require(getattr(config.eval, name) >= 1, f"eval.{name}", "must be at least 1")
    _require(config.eval.probe_train_size >= 2, "eval.probe_train_size",
             f"must be at least 2 (the probes read the codes standardised by their spread), "
             f"got {config.eval.probe_train_size}")
    _require(config.eval.probe_lr > 0, "eval.probe_lr", "must be positive")
    _require(config.eval.probe_patience >= 0, "eval.probe_patience", "must be 0 (never stop early) or more")
    _require(0 <= config.eval.probe_holdout < 1, "eval.probe_holdout",
             f"must be a share in [0, 1), got {config.eval.probe_holdout}")
    _require(config.eval.probe_patience == 0 or config.eval.probe_holdout > 0, "eval.probe_patience",
             "stops on the held-out loss, so it needs eval.probe_holdout above 0 (or set it to 0)")
    for name in ("log_every", "eval_every", "checkpoint_every"):
        _require(getattr(config.run, name) >= 1, f"run.{name}", "must be at least 1")
    _require(config.run.dir.strip() != "", "run.dir",
             "is empty: name the folder that holds the runs (. for the current one)")
    name = config.run.name
    _require(name is None or (name not in ("", ".", "..") and not set(name) & set("/\\")),
             "run.name", f"must be a plain folder name (it goes under run.dir), got {name!r}")
    # The random streams take seed * 1,000,003 + the process's rank as a 64-bit seed.
    _require(0 <= config.seed < 2**32, "seed", f"must be in [0, 2**32), got {config.seed}")
    _require(0 <= data.split_seed < 2**63, "data.split_seed",
             f"must be in [0, 2**63) (torch's generator seed), got {data.split_seed}")
