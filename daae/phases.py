"""The training phases of DESIGN.md section 2, each a small function.

Every phase zeroes, back-propagates and steps only its own optimizer and
returns detached loss tensors (no host sync: the outer loop decides when to
read them). Networks a phase uses but does not train are called through
their plain module with gradients switched off, so DDP only ever sees the
forward passes of the networks being trained.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .dependence import class_rows, normalised_hsic
from .models import Networks


@dataclass
class StepContext:
    """What every phase needs: the accelerator, the networks (``wrapped`` as
    prepared for DDP/mixed precision, ``plain`` unwrapped) and the process's
    random generator."""
    accelerator: object
    wrapped: dict[str, nn.Module]
    plain: Networks
    generator: torch.Generator
    input_noise: float
    num_classes: int
    z_dim: int
    class_conditional_prior: bool = False

    def noisy(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_noise == 0:
            return x
        noise = torch.randn(x.shape, generator=self.generator, device=x.device, dtype=x.dtype)
        return x + self.input_noise * noise

    def prior_z(self, count: int, device) -> torch.Tensor:
        return torch.randn(count, self.z_dim, generator=self.generator, device=device)

    def conditioned(self, logits_y: torch.Tensor, *codes: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """D_z's rows for each of ``codes``: the codes alone or, with
        model.class_conditional_prior, beside the one-hot argmax of ``logits_y``
        row for row. Prior draws take the classes of the codes they stand
        against, so D_z sees the same classes on both sides and can tell them
        apart by z alone."""
        if not self.class_conditional_prior:
            return codes
        classes = class_rows(logits_y.detach().argmax(1), self.num_classes)
        return tuple(torch.cat([rows, classes.to(rows.dtype)], 1) for rows in codes)

    def prior_y(self, count: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """``count`` draws from the uniform categorical prior, as its K distinct
        one-hot vectors and how often each was drawn: a critic then scores K
        rows instead of ``count``, and the count-weighted loss is the same."""
        labels = torch.randint(self.num_classes, (count,), generator=self.generator, device=device)
        # scatter_add rather than bincount, which reads the largest label back
        # to the host (no CUDA graph can hold that).
        counts = torch.zeros(self.num_classes, device=device).scatter_add_(
            0, labels, torch.ones(count, device=device))
        return torch.eye(self.num_classes, device=device), counts

    def step(self, optimizer, loss: torch.Tensor) -> None:
        optimizer.zero_grad(set_to_none=True)
        self.accelerator.backward(loss)
        optimizer.step()


@contextmanager
def frozen(*modules: nn.Module):
    """Use ``modules`` inside a phase without computing gradients for their weights."""
    params = [p for m in modules for p in m.parameters()]
    previous = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(params, previous):
            p.requires_grad_(flag)


def real_fake_logits(critic: nn.Module, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    # One forward over [real; fake]: DDP allows one forward per backward, and
    # the critics have no batch norm, so concatenating changes nothing else.
    return critic(torch.cat([real, fake])).float().squeeze(1)


def real_fake_bce(logits: torch.Tensor, real_weights: torch.Tensor) -> torch.Tensor:
    """The critic's loss on the logits of [real; fake]: the mean over every draw,
    where real row i stands for ``real_weights[i]`` draws."""
    n_real, n_fake = len(real_weights), len(logits) - len(real_weights)
    targets = torch.cat([torch.ones(n_real, device=logits.device),
                         torch.zeros(n_fake, device=logits.device)])
    weights = torch.cat([real_weights, torch.ones(n_fake, device=logits.device)])
    total = F.binary_cross_entropy_with_logits(logits, targets, weight=weights, reduction="sum")
    return total / (real_weights.sum() + n_fake)


def fooled_bce(critic_logits: torch.Tensor) -> torch.Tensor:
    """The generator's loss: the critic should call these encodings real."""
    logits = critic_logits.float().squeeze(1)
    return F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits))


def correlation_targets(logits_y: torch.Tensor, kind: str) -> torch.Tensor:
    q = logits_y.detach().float().softmax(1)
    return q if kind == "soft" else q.argmax(1)


def member_rows(correlation_logits: torch.Tensor, targets: torch.Tensor):
    """C's logits, ``(batch, classes)``, or an ensemble's, ``(members, batch,
    classes)``, as rows of one batch, and the targets repeated per member: a
    mean over these rows is the mean of the members' losses. One C's pass as
    they are: no view operators added to every step (the GPU step is bound by
    its operator count) for the ensemble's sake."""
    logits = correlation_logits.float()
    if logits.dim() == 2:
        return logits, targets
    return logits.flatten(0, 1), targets.expand(len(logits), *targets.shape).flatten(0, 1)


def correlation_loss(correlation_logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """C's cross-entropy against q(y|x) (or its argmax), averaged over an ensemble's members."""
    return F.cross_entropy(*member_rows(correlation_logits, targets))


def decorrelation_loss(correlation_logits: torch.Tensor, targets: torch.Tensor,
                       objective: str) -> torch.Tensor:
    """Low when C cannot predict the class from z (every member of an
    ensemble, on average).

    maximize_ce (the reference) rewards any wrong answer, which can drive C
    below chance and so still leak the class; uniform minimises
    KL(uniform || C(z)), which is zero exactly at chance.
    """
    logits, targets = member_rows(correlation_logits, targets)
    if objective == "maximize_ce":
        return -F.cross_entropy(logits, targets)
    log_probs = logits.log_softmax(1)
    return -log_probs.mean(1).mean() - math.log(logits.shape[1])


def reads_clean_images(weights) -> bool:
    """Whether a step encodes the unaltered unlabelled images: C and the
    decorrelation read their codes (correlation_input clean or both), or the
    consistency or virtual adversarial term takes its targets from them."""
    return weights.correlation_input != "training" or weights.consistency > 0 or weights.vat > 0


def correlation_rows(ctx: StepContext, x: torch.Tensor, x_clean: torch.Tensor | None,
                     correlation_input: str) -> torch.Tensor:
    """The images whose codes C, the decorrelation and the independence term
    read (``loss.correlation_input``), as the encoder takes them: the training
    inputs ``x`` with fresh noise, the unaltered ``x_clean`` as they are, or
    both in one batch (one forward, so batch norm sees them as the fused step does)."""
    if correlation_input == "training":
        return ctx.noisy(x)
    if correlation_input == "clean":
        return x_clean
    return torch.cat([ctx.noisy(x), x_clean])


def consistency_loss(logits_training: torch.Tensor, logits_clean: torch.Tensor) -> torch.Tensor:
    """KL(q_clean || q_training): the unaltered images' q(y|x) is the target,
    held fixed, so only the training inputs' predictions move. The virtual
    adversarial term is the same KL with the perturbed images as the student."""
    return F.kl_div(logits_training.float().log_softmax(1),
                    logits_clean.detach().float().log_softmax(1),
                    log_target=True, reduction="batchmean")


# The power iteration's finite-difference step (L2 norm per image, pixels in
# [0, 1]). VAT's 1e-6 finds the KL's curvature at x itself; on a confident
# encoder (a near-saturated softmax) that direction differs from where the KL
# grows at a finite distance (cosine about 0.25 between steps 1e-6 and 1e-3..1
# on a 2,500-step P100 model), and the perturbation is applied at distance
# vat_epsilon. 0.1 is the step the shipped weight was chosen with.
POWER_ITERATION_STEP = 0.1


def _unit_rows(t: torch.Tensor) -> torch.Tensor:
    return F.normalize(t.flatten(1), dim=1).view_as(t)


def batch_norms(module: nn.Module) -> list[nn.Module]:
    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@contextmanager
def running_statistics_frozen(module: nn.Module):
    """Batch norm normalises with batch statistics as in training, but its
    running averages (what evaluation uses) do not move: the power
    iteration's probes are not images the model will be evaluated on."""
    norms = batch_norms(module)
    saved = [(m.momentum, None if m.num_batches_tracked is None else m.num_batches_tracked.clone())
             for m in norms]
    for m in norms:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, (momentum, tracked) in zip(norms, saved):
            m.momentum = momentum
            if tracked is not None:
                m.num_batches_tracked.copy_(tracked)


@contextmanager
def batch_norm_as(module: nn.Module, mode: str):
    """``mode`` evaluation: ``module``'s batch norms normalise with their
    running averages, as evaluation and the probes do, and leave them as
    they are (``loss.correlation_batch_norm``); training: nothing changes,
    and no module is visited (the default, on every reference step)."""
    if mode != "evaluation":
        yield
        return
    norms = [m for m in batch_norms(module) if m.training]
    for m in norms:
        m.eval()
    try:
        yield
    finally:
        for m in norms:
            m.train()


def track_class_whitening(ctx: StepContext, rows: torch.Tensor | None,
                          evaluation_codes: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
    """With model.class_whitening, C's rows of this step, encoded as evaluation
    encodes them (batch norms on their running averages, as the probes read
    z), move the encoder's per-class statistics. ``evaluation_codes``:
    ``(logits_y, z)`` of those rows when the step has them already; else one
    more forward, without gradients, encodes them."""
    whitening = ctx.plain.encoder.z_whitening
    if whitening is None:
        return
    if evaluation_codes is None:
        with (torch.no_grad(), batch_norm_as(ctx.plain.encoder, "evaluation"),
              ctx.accelerator.autocast()):
            evaluation_codes = ctx.plain.encoder(rows)
    logits_y, z = evaluation_codes
    whitening.track(z, logits_y)


def virtual_adversarial_perturbation(ctx: StepContext, x: torch.Tensor,
                                     epsilon: float) -> torch.Tensor:
    """VAT's r_adv (Miyato et al. 2018): per image, the perturbation of L2 norm
    ``epsilon`` that changes q(y|x) most, from one power iteration (a random
    direction, then the gradient of KL(q(y|x) || q(y|x + step·d)) in it).
    Uses the plain encoder (DDP sees only the training forward) in fp32, where
    a small KL's gradient does not underflow."""
    encoder = ctx.plain.encoder
    with running_statistics_frozen(encoder), torch.enable_grad():
        with torch.no_grad():
            target = encoder(x)[0].float()
        direction = torch.randn(x.shape, generator=ctx.generator, device=x.device, dtype=x.dtype)
        probe = (POWER_ITERATION_STEP * _unit_rows(direction)).requires_grad_()
        (grad,) = torch.autograd.grad(consistency_loss(encoder(x + probe)[0], target), probe)
    return epsilon * _unit_rows(grad)


# -------------------------------------------------------------- reference phases

def reconstruction_phase(ctx: StepContext, optimizer, x: torch.Tensor, weight: float):
    with ctx.accelerator.autocast():
        logits_y, z = ctx.wrapped["encoder"](ctx.noisy(x))
        x_hat = ctx.wrapped["decoder"](logits_y.float().softmax(1), z)
    loss = F.mse_loss(x_hat.float(), x)
    ctx.step(optimizer, weight * loss)
    return {"reconstruction": loss.detach()}


def discriminator_phase(ctx: StepContext, optimizer, x: torch.Tensor):
    with torch.no_grad(), ctx.accelerator.autocast():
        logits_y, z = ctx.plain.encoder(ctx.noisy(x))
    with ctx.accelerator.autocast():
        real_z, (real_y, counts_y) = ctx.prior_z(len(x), x.device), ctx.prior_y(len(x), x.device)
        real_rows, fake_rows = ctx.conditioned(logits_y, real_z, z.float())
        loss_z = real_fake_bce(real_fake_logits(ctx.wrapped["d_z"], real_rows, fake_rows),
                                torch.ones(len(x), device=x.device))
        loss_y = real_fake_bce(real_fake_logits(ctx.wrapped["d_y"], real_y,
                                                  logits_y.float().softmax(1)), counts_y)
    ctx.step(optimizer, loss_z + loss_y)
    return {"discriminator_z": loss_z.detach(), "discriminator_y": loss_y.detach()}


def adversarial_z_phase(ctx: StepContext, optimizer, x: torch.Tensor, weight: float):
    with frozen(ctx.plain.d_z), ctx.accelerator.autocast():
        logits_y, z = ctx.wrapped["encoder"](ctx.noisy(x))
        (rows,) = ctx.conditioned(logits_y, z)
        loss = fooled_bce(ctx.plain.d_z(rows))
    ctx.step(optimizer, weight * loss)
    return {"adversarial_z": loss.detach()}


def adversarial_y_phase(ctx: StepContext, optimizer, x: torch.Tensor, weight: float):
    with frozen(ctx.plain.d_y), ctx.accelerator.autocast():
        logits_y, _ = ctx.wrapped["encoder"](ctx.noisy(x))
        loss = fooled_bce(ctx.plain.d_y(logits_y.float().softmax(1)))
    ctx.step(optimizer, weight * loss)
    return {"adversarial_y": loss.detach()}


def supervised_phase(ctx: StepContext, optimizer, x: torch.Tensor, labels: torch.Tensor,
                     weight: float):
    with ctx.accelerator.autocast():
        logits_y, _ = ctx.wrapped["encoder"](ctx.noisy(x))
    loss = F.cross_entropy(logits_y.float(), labels)
    ctx.step(optimizer, weight * loss)
    return {"supervised": loss.detach()}


def consistency_phase(ctx: StepContext, optimizer, x: torch.Tensor, x_clean: torch.Tensor,
                      weight: float):
    """``x``: the training inputs (before noise), ``x_clean`` the same images
    unaltered; both in one forward, so batch norm sees them as the fused step does."""
    with ctx.accelerator.autocast():
        logits_y, _ = ctx.wrapped["encoder"](torch.cat([ctx.noisy(x), x_clean]))
    loss = consistency_loss(logits_y[:len(x)], logits_y[len(x):])
    ctx.step(optimizer, weight * loss)
    return {"consistency": loss.detach()}


def virtual_adversarial_phase(ctx: StepContext, optimizer, x_clean: torch.Tensor,
                              weight: float, epsilon: float):
    """``x_clean`` and its virtual adversarial perturbation in one forward, so
    batch norm sees both as the fused step does."""
    perturbed = x_clean + virtual_adversarial_perturbation(ctx, x_clean, epsilon)
    with ctx.accelerator.autocast():
        logits_y, _ = ctx.wrapped["encoder"](torch.cat([x_clean, perturbed]))
    loss = consistency_loss(logits_y[len(x_clean):], logits_y[:len(x_clean)])
    ctx.step(optimizer, weight * loss)
    return {"vat": loss.detach()}


# The z-branch phases take their encoder input as correlation_rows gives it
# (any noise already added) and encode it with the batch norms as
# ``batch_norm`` (loss.correlation_batch_norm) says.

def correlation_phase(ctx: StepContext, optimizer, rows: torch.Tensor, target_kind: str,
                      batch_norm: str = "training"):
    with torch.no_grad(), ctx.accelerator.autocast(), batch_norm_as(ctx.plain.encoder, batch_norm):
        logits_y, z = ctx.plain.encoder(rows)
    track_class_whitening(ctx, rows, (logits_y, z) if batch_norm == "evaluation" else None)
    targets = correlation_targets(logits_y, target_kind)
    with ctx.accelerator.autocast():
        logits_c = ctx.wrapped["correlation"](z.float())
    loss = correlation_loss(logits_c, targets)
    ctx.step(optimizer, loss)
    return {"correlation": loss.detach()}


def decorrelation_phase(ctx: StepContext, optimizer, rows: torch.Tensor, weight: float,
                        objective: str, target_kind: str, batch_norm: str = "training"):
    # The wrapped encoder (DDP reduces this phase's gradients), whose batch
    # norms are the plain encoder's modules.
    with (frozen(ctx.plain.correlation), ctx.accelerator.autocast(),
          batch_norm_as(ctx.plain.encoder, batch_norm)):
        logits_y, z = ctx.wrapped["encoder"](rows)
        logits_c = ctx.plain.correlation(z.float())
    loss = decorrelation_loss(logits_c, correlation_targets(logits_y, target_kind), objective)
    ctx.step(optimizer, weight * loss)
    return {"decorrelation": loss.detach()}


def independence_phase(ctx: StepContext, optimizer, rows: torch.Tensor, weight: float,
                       target_kind: str, batch_norm: str = "training"):
    with ctx.accelerator.autocast(), batch_norm_as(ctx.plain.encoder, batch_norm):
        logits_y, z = ctx.wrapped["encoder"](rows)
    classes = class_rows(correlation_targets(logits_y, target_kind), ctx.num_classes)
    loss = normalised_hsic(z, classes)
    ctx.step(optimizer, weight * loss)
    return {"independence": loss.detach()}
