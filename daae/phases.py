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

    def noisy(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_noise == 0:
            return x
        noise = torch.randn(x.shape, generator=self.generator, device=x.device, dtype=x.dtype)
        return x + self.input_noise * noise

    def prior_z(self, count: int, device) -> torch.Tensor:
        return torch.randn(count, self.z_dim, generator=self.generator, device=device)

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


def _real_fake_logits(critic: nn.Module, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    # One forward over [real; fake]: DDP allows one forward per backward, and
    # the critics have no batch norm, so concatenating changes nothing else.
    return critic(torch.cat([real, fake])).float().squeeze(1)


def _real_fake_bce(logits: torch.Tensor, real_weights: torch.Tensor) -> torch.Tensor:
    """The critic's loss on the logits of [real; fake]: the mean over every draw,
    where real row i stands for ``real_weights[i]`` draws."""
    n_real, n_fake = len(real_weights), len(logits) - len(real_weights)
    targets = torch.cat([torch.ones(n_real, device=logits.device),
                         torch.zeros(n_fake, device=logits.device)])
    weights = torch.cat([real_weights, torch.ones(n_fake, device=logits.device)])
    total = F.binary_cross_entropy_with_logits(logits, targets, weight=weights, reduction="sum")
    return total / (real_weights.sum() + n_fake)


def _fooled_bce(critic_logits: torch.Tensor) -> torch.Tensor:
    """The generator's loss: the critic should call these encodings real."""
    logits = critic_logits.float().squeeze(1)
    return F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits))


def correlation_targets(logits_y: torch.Tensor, kind: str) -> torch.Tensor:
    q = logits_y.detach().float().softmax(1)
    return q if kind == "soft" else q.argmax(1)


def decorrelation_loss(correlation_logits: torch.Tensor, targets: torch.Tensor,
                       objective: str) -> torch.Tensor:
    """Low when C cannot predict the class from z.

    maximize_ce (the reference) rewards any wrong answer, which can drive C
    below chance and so still leak the class; uniform minimises
    KL(uniform || C(z)), which is zero exactly at chance.
    """
    logits = correlation_logits.float()
    if objective == "maximize_ce":
        return -F.cross_entropy(logits, targets)
    log_probs = logits.log_softmax(1)
    return -log_probs.mean(1).mean() - math.log(logits.shape[1])


def reads_clean_images(weights) -> bool:
    """Whether a step encodes the unaltered unlabelled images: C and the
    decorrelation read their codes (correlation_input clean), or the
    consistency or virtual adversarial term takes its targets from them."""
    return weights.correlation_input == "clean" or weights.consistency > 0 or weights.vat > 0


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


@contextmanager
def running_statistics_frozen(module: nn.Module):
    """Batch norm normalises with batch statistics as in training, but its
    running averages (what evaluation uses) do not move: the power
    iteration's probes are not images the model will be evaluated on."""
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
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
        x_hat = ctx.wrapped["decoder"](logits_y.softmax(1), z)
    loss = F.mse_loss(x_hat.float(), x)
    ctx.step(optimizer, weight * loss)
    return {"reconstruction": loss.detach()}


def discriminator_phase(ctx: StepContext, optimizer, x: torch.Tensor):
    with torch.no_grad(), ctx.accelerator.autocast():
        logits_y, z = ctx.plain.encoder(ctx.noisy(x))
    with ctx.accelerator.autocast():
        real_z, (real_y, counts_y) = ctx.prior_z(len(x), x.device), ctx.prior_y(len(x), x.device)
        loss_z = _real_fake_bce(_real_fake_logits(ctx.wrapped["d_z"], real_z, z.float()),
                                torch.ones(len(x), device=x.device))
        loss_y = _real_fake_bce(_real_fake_logits(ctx.wrapped["d_y"], real_y,
                                                  logits_y.float().softmax(1)), counts_y)
    ctx.step(optimizer, loss_z + loss_y)
    return {"discriminator_z": loss_z.detach(), "discriminator_y": loss_y.detach()}


def adversarial_z_phase(ctx: StepContext, optimizer, x: torch.Tensor, weight: float):
    with frozen(ctx.plain.d_z), ctx.accelerator.autocast():
        _, z = ctx.wrapped["encoder"](ctx.noisy(x))
        loss = _fooled_bce(ctx.plain.d_z(z))
    ctx.step(optimizer, weight * loss)
    return {"adversarial_z": loss.detach()}


def adversarial_y_phase(ctx: StepContext, optimizer, x: torch.Tensor, weight: float):
    with frozen(ctx.plain.d_y), ctx.accelerator.autocast():
        logits_y, _ = ctx.wrapped["encoder"](ctx.noisy(x))
        loss = _fooled_bce(ctx.plain.d_y(logits_y.float().softmax(1)))
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


def correlation_phase(ctx: StepContext, optimizer, x: torch.Tensor, target_kind: str,
                      clean: bool = False):
    """``clean``: encode ``x`` as it is, without the input noise."""
    with torch.no_grad(), ctx.accelerator.autocast():
        logits_y, z = ctx.plain.encoder(x if clean else ctx.noisy(x))
    targets = correlation_targets(logits_y, target_kind)
    with ctx.accelerator.autocast():
        logits_c = ctx.wrapped["correlation"](z.float())
    loss = F.cross_entropy(logits_c.float(), targets)
    ctx.step(optimizer, loss)
    return {"correlation": loss.detach()}


def decorrelation_phase(ctx: StepContext, optimizer, x: torch.Tensor, weight: float,
                        objective: str, target_kind: str, clean: bool = False):
    with frozen(ctx.plain.correlation), ctx.accelerator.autocast():
        logits_y, z = ctx.wrapped["encoder"](x if clean else ctx.noisy(x))
        logits_c = ctx.plain.correlation(z)
    loss = decorrelation_loss(logits_c, correlation_targets(logits_y, target_kind), objective)
    ctx.step(optimizer, weight * loss)
    return {"decorrelation": loss.detach()}


def independence_phase(ctx: StepContext, optimizer, x: torch.Tensor, weight: float,
                       target_kind: str, clean: bool = False):
    with ctx.accelerator.autocast():
        logits_y, z = ctx.wrapped["encoder"](x if clean else ctx.noisy(x))
    classes = class_rows(correlation_targets(logits_y, target_kind), ctx.num_classes)
    loss = normalised_hsic(z, classes)
    ctx.step(optimizer, weight * loss)
    return {"independence": loss.detach()}


# ------------------------------------------------------------------- fused step

def _fooling_gradient(critic_input_grad: torch.Tensor, fake_logits: torch.Tensor,
                      critic_batch: int) -> torch.Tensor:
    """d _fooled_bce(critic(code)) / d code, from the critic's own backward.

    A critic scores each sample on its own (no batch norm), so at the fakes the
    critic loss and the fooling loss differ only in the scalar gradient at each
    logit: sigmoid(l) / critic_batch versus (sigmoid(l) - 1) / n. Scaling the
    critic's input gradient per sample by their ratio, -(critic_batch / n) exp(-l),
    gives the encoder its gradient without a second pass through the critic.
    The exponent is capped where sigmoid(l) nears fp32's floor; a critic that
    certain (l < -60) is far outside a working adversarial game.
    """
    n = len(fake_logits)
    ratio = -(critic_batch / n) * torch.exp((-fake_logits).clamp(max=60.0))
    return critic_input_grad * ratio.view(-1, *([1] * (critic_input_grad.dim() - 1)))


def _loss_scale(ctx: StepContext) -> float:
    """fp16's loss scale, read before the step that may change it (one host sync);
    1 without fp16."""
    scaler = getattr(ctx.accelerator, "scaler", None)
    return 1.0 if scaler is None else scaler.get_scale()


def fused_step(ctx: StepContext, autoencoder_optimizer, critic_optimizer,
               x_u: torch.Tensor, x_l: torch.Tensor, y_l: torch.Tensor, weights,
               x_clean: torch.Tensor | None = None):
    """Every loss from one encoder forward over [x_u; x_l] and one pass
    through each critic.

    The critics see leaf copies of the codes, so their single backward yields
    both their own gradients and, at the leaves, the gradient the encoder needs
    to fool them; the encoder and decoder then take one step on their losses
    plus those code gradients. Critic and encoder are judged by the same
    (pre-update) critics: simultaneous rather than alternating updates.
    ``weights`` is the loss config in force: each term's weight (a zero
    decorrelation leaves it out), the decorrelation's objective and C's target.
    ``x_clean``, the unlabelled images unaltered, is encoded without noise in
    the same forward (DDP allows one per backward; batch norm then normalises
    over all parts) when C and the decorrelation read its codes
    (``weights.correlation_input`` clean) or the consistency or virtual
    adversarial term needs its targets; None when none does. With ``weights.vat``
    the perturbed unaltered images are a fourth part of that forward.
    """
    on_clean = weights.correlation_input == "clean"
    decorrelate, objective = weights.decorrelation > 0, weights.decorrelation_objective
    if x_clean is None and reads_clean_images(weights):
        raise ValueError("fused_step: loss.correlation_input=clean, loss.consistency > 0 or "
                         "loss.vat > 0 reads the unaltered unlabelled images; pass them as x_clean")
    n, n_l = len(x_u), len(x_l)
    n_clean = 0 if x_clean is None else len(x_clean)
    inputs = [ctx.noisy(torch.cat([x_u, x_l]))]
    if x_clean is not None:
        inputs.append(x_clean)
    if weights.vat > 0:
        inputs.append(x_clean + virtual_adversarial_perturbation(ctx, x_clean, weights.vat_epsilon))
    with ctx.accelerator.autocast():
        logits_all, z_all = ctx.wrapped["encoder"](torch.cat(inputs))
    logits_y, z, logits_l = logits_all[:n].float(), z_all[:n].float(), logits_all[n:n + n_l].float()
    clean_rows = slice(n + n_l, n + n_l + n_clean)
    logits_clean, z_clean = logits_all[clean_rows].float(), z_all[clean_rows].float()
    logits_perturbed = logits_all[n + n_l + n_clean:].float()
    q = logits_y.softmax(1)
    logits_c_input, z_c_input = (logits_clean, z_clean) if on_clean else (logits_y, z)
    targets = correlation_targets(logits_c_input, weights.correlation_target)

    z_at_dz, q_at_dy, z_at_c = (code.detach().requires_grad_() for code in (z, q, z_c_input))
    real_z, (real_y, counts_y) = ctx.prior_z(n, z.device), ctx.prior_y(n, z.device)
    with ctx.accelerator.autocast():
        dz_logits = _real_fake_logits(ctx.wrapped["d_z"], real_z, z_at_dz)
        dy_logits = _real_fake_logits(ctx.wrapped["d_y"], real_y, q_at_dy)
        c_logits = ctx.wrapped["correlation"](z_at_c).float()
    loss_dz = _real_fake_bce(dz_logits, torch.ones(n, device=z.device))
    loss_dy = _real_fake_bce(dy_logits, counts_y)
    loss_c = F.cross_entropy(c_logits, targets)
    fake_dz, fake_dy = dz_logits[-n:].detach(), dy_logits[-n:].detach()
    losses = {"discriminator_z": loss_dz, "discriminator_y": loss_dy, "correlation": loss_c,
              "adversarial_z": _fooled_bce(fake_dz[:, None]),
              "adversarial_y": _fooled_bce(fake_dy[:, None])}
    if decorrelate:
        losses["decorrelation"] = decorrelation_loss(c_logits, targets, objective)
        if objective != "maximize_ce":
            # Not C's loss negated: needs its own (input-gradient-only) pass back through C.
            (grad_decorrelation,) = torch.autograd.grad(losses["decorrelation"], z_at_c,
                                                        retain_graph=True)
    scale = _loss_scale(ctx)
    ctx.step(critic_optimizer, loss_dz + loss_dy + loss_c)

    grad_z = weights.adversarial_z * _fooling_gradient(z_at_dz.grad / scale, fake_dz, 2 * n)
    grad_q = weights.adversarial_y * _fooling_gradient(q_at_dy.grad / scale, fake_dy, 2 * n)
    if decorrelate:
        # maximize_ce is C's own loss negated, so its gradient is C's, reversed.
        grad_decorrelation = weights.decorrelation * (
            -z_at_c.grad / scale if objective == "maximize_ce" else grad_decorrelation)
        if not on_clean:
            grad_z = grad_z + grad_decorrelation

    with ctx.accelerator.autocast():
        x_hat = ctx.wrapped["decoder"](q, z)
    losses["reconstruction"] = F.mse_loss(x_hat.float(), x_u)
    losses["supervised"] = F.cross_entropy(logits_l, y_l)
    # The code terms are linear surrogates: their gradients are grad_z and grad_q.
    total = (weights.reconstruction * losses["reconstruction"]
             + weights.supervised * losses["supervised"]
             + (z * grad_z).sum() + (q * grad_q).sum())
    if weights.consistency > 0:
        losses["consistency"] = consistency_loss(logits_y, logits_clean)
        total = total + weights.consistency * losses["consistency"]
    if weights.vat > 0:
        losses["vat"] = consistency_loss(logits_perturbed, logits_clean)
        total = total + weights.vat * losses["vat"]
    if weights.independence > 0:
        losses["independence"] = normalised_hsic(z_c_input, class_rows(targets, ctx.num_classes))
        total = total + weights.independence * losses["independence"]
    if decorrelate and on_clean:
        # The clean rows feed only C: their gradient is a surrogate of its own.
        total = total + (z_c_input * grad_decorrelation).sum()
    ctx.step(autoencoder_optimizer, total)
    return {name: value.detach() for name, value in losses.items()}
