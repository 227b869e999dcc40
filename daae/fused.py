"""The fused step (``train.step_mode: fused``): every loss of DESIGN.md
section 2 from one encoder forward and one pass through each critic, then
one critic step and one encoder/decoder step."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .dependence import class_rows, normalised_hsic
from .phases import (StepContext, batch_norm_as, consistency_loss, correlation_loss,
                     correlation_targets, decorrelation_loss, fooled_bce, reads_clean_images,
                     real_fake_bce, real_fake_logits, track_class_whitening,
                     virtual_adversarial_perturbation)


def _fooling_gradient(critic_input_grad: torch.Tensor, fake_logits: torch.Tensor,
                      critic_batch: int) -> torch.Tensor:
    """d fooled_bce(critic(code)) / d code, from the critic's own backward.

    A critic scores each sample on its own (no batch norm), so at the fakes the
    critic loss and the fooling loss differ only in the scalar gradient at each
    logit: sigmoid(l) / critic_batch versus (sigmoid(l) - 1) / n. Scaling the
    critic's input gradient per sample by their ratio, -(critic_batch / n) exp(-l),
    gives the encoder its gradient without a second pass through the critic.
    The exponent is capped where sigmoid(l) nears fp32's floor; a critic that
    certain (l < -60) is far outside a working adversarial game. Under fp16
    the critic's gradient underflows from about l = -20, so fp16 takes the
    fooling gradients from a pass of their own (``_fooling_pass``).
    """
    n = len(fake_logits)
    ratio = -(critic_batch / n) * torch.exp((-fake_logits).clamp(max=60.0))
    return critic_input_grad * ratio.view(-1, *([1] * (critic_input_grad.dim() - 1)))


def _fooling_pass(dz_logits: torch.Tensor, dy_logits: torch.Tensor, z_at_dz: torch.Tensor,
                  q_at_dy: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """fp16's d fooled_bce / d code for D_z and D_y: a backward of the scaled
    fooling losses to the codes alone (no weight gradients), before the critics'
    step changes the weights that backward reads. Unlike the critic's own
    gradient, sigmoid(l) / n, the fooling gradient (sigmoid(l) - 1) / n is
    largest where the critic is surest, so it does not underflow."""
    n = len(z_at_dz)
    fooling = fooled_bce(dz_logits[-n:, None]) + fooled_bce(dy_logits[-n:, None])
    grad_z, grad_q = torch.autograd.grad(fooling * scale, (z_at_dz, q_at_dy), retain_graph=True)
    return grad_z / scale, grad_q / scale


def _fp16_scaler(ctx: StepContext):
    """fp16's gradient scaler; None in every other precision."""
    return getattr(ctx.accelerator, "scaler", None)


def _loss_scale(ctx: StepContext) -> float:
    """fp16's loss scale, read before the step that may change it (one host sync);
    1 without fp16."""
    scaler = _fp16_scaler(ctx)
    return 1.0 if scaler is None else scaler.get_scale()


@dataclass
class _Forward:
    """The one encoder forward over [x_u; x_l; x_clean; x_clean perturbed], by part."""
    logits_y: torch.Tensor
    q: torch.Tensor  # q(y|x) of x_u, one softmax that the critics and the decoder share
    z: torch.Tensor
    logits_l: torch.Tensor
    logits_clean: torch.Tensor
    z_clean: torch.Tensor
    logits_perturbed: torch.Tensor
    training_rows: torch.Tensor  # x_u as that forward saw it, noise included


@dataclass
class _CodeGradients:
    """What the critics' backward leaves for the encoder: the gradients of its
    fooling terms at z and q(y|x), and of the decorrelation at C's codes."""
    z: torch.Tensor
    q: torch.Tensor
    decorrelation: torch.Tensor | None


def _reads_evaluation_codes(weights) -> bool:
    """Whether C and the class-removing terms read a second forward of their
    rows, with the encoder's batch norms on their running averages."""
    return weights.correlation_batch_norm == "evaluation"


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
    (``weights.correlation_input`` clean or both) or the consistency or virtual
    adversarial term needs its targets; None when none does. With ``weights.vat``
    the perturbed unaltered images are a fourth part of that forward.
    With ``weights.correlation_batch_norm`` evaluation, C's rows (the training
    inputs as that forward saw them, the unaltered images, or both) are
    encoded in a second forward, by the plain encoder with its batch norms on
    their running averages as the first forward left them; the unaltered
    images then join the first forward only when the consistency or virtual
    adversarial term needs them. The second forward's gradients join the
    same backward, so DDP still reduces each parameter's gradient once.
    """
    if x_clean is None and reads_clean_images(weights):
        raise ValueError("fused_step: loss.correlation_input=clean or both, loss.consistency > 0 or "
                         "loss.vat > 0 reads the unaltered unlabelled images; pass them as x_clean")
    forward = _encode(ctx, x_u, x_l, x_clean, weights)
    logits_c_input, z_c_input = _correlation_codes(ctx, forward, x_clean, weights)
    targets = correlation_targets(logits_c_input, weights.correlation_target)
    losses, gradients = _critic_step(ctx, critic_optimizer, forward, z_c_input, targets, weights)
    losses |= _autoencoder_step(ctx, autoencoder_optimizer, forward, x_u, y_l, z_c_input, targets,
                                gradients, weights)
    return {name: value.detach() for name, value in losses.items()}


def _encode(ctx: StepContext, x_u: torch.Tensor, x_l: torch.Tensor, x_clean: torch.Tensor | None,
            weights) -> _Forward:
    """The step's one forward through the wrapped encoder (DDP's one per backward)."""
    n, n_l = len(x_u), len(x_l)
    # With evaluation codes C reads a forward of its own, so the unaltered
    # images join this one only for the consistency and VAT targets.
    clean_in_forward = x_clean is not None and (
        weights.consistency > 0 or weights.vat > 0 or not _reads_evaluation_codes(weights))
    n_clean = len(x_clean) if clean_in_forward else 0
    inputs = [ctx.noisy(torch.cat([x_u, x_l]))]
    if clean_in_forward:
        inputs.append(x_clean)
    if weights.vat > 0:
        inputs.append(x_clean + virtual_adversarial_perturbation(ctx, x_clean, weights.vat_epsilon))
    with ctx.accelerator.autocast():
        logits_all, z_all = ctx.wrapped["encoder"](torch.cat(inputs))
    clean_rows = slice(n + n_l, n + n_l + n_clean)
    logits_y = logits_all[:n].float()
    return _Forward(logits_y=logits_y, q=logits_y.softmax(1), z=z_all[:n].float(),
                    logits_l=logits_all[n:n + n_l].float(),
                    logits_clean=logits_all[clean_rows].float(), z_clean=z_all[clean_rows].float(),
                    logits_perturbed=logits_all[n + n_l + n_clean:].float(),
                    training_rows=inputs[0][:n])


def _correlation_codes(ctx: StepContext, forward: _Forward, x_clean: torch.Tensor | None,
                       weights) -> tuple[torch.Tensor, torch.Tensor]:
    """The logits and codes C, the decorrelation and the independence term read
    (``loss.correlation_input``): slices of the one forward, or with evaluation
    codes a second forward of their rows; with ``model.class_whitening`` those
    rows also move the encoder's per-class statistics."""
    correlation_input = weights.correlation_input
    evaluation_codes = _reads_evaluation_codes(weights)
    rows = None
    if evaluation_codes or ctx.plain.encoder.z_whitening is not None:
        rows = (forward.training_rows if correlation_input == "training" else x_clean
                if correlation_input == "clean" else torch.cat([forward.training_rows, x_clean]))
    if evaluation_codes:
        encoder = ctx.plain.encoder
        with batch_norm_as(encoder, "evaluation"), ctx.accelerator.autocast():
            logits_c_input, z_c_input = encoder(rows)
        logits_c_input, z_c_input = logits_c_input.float(), z_c_input.float()
    elif correlation_input == "training":
        logits_c_input, z_c_input = forward.logits_y, forward.z
    elif correlation_input == "clean":
        logits_c_input, z_c_input = forward.logits_clean, forward.z_clean
    else:
        logits_c_input = torch.cat([forward.logits_y, forward.logits_clean])
        z_c_input = torch.cat([forward.z, forward.z_clean])
    track_class_whitening(ctx, rows, (logits_c_input, z_c_input) if evaluation_codes else None)
    return logits_c_input, z_c_input


def _critic_step(ctx: StepContext, critic_optimizer, forward: _Forward, z_c_input: torch.Tensor,
                 targets: torch.Tensor, weights) -> tuple[dict, _CodeGradients]:
    """D_z, D_y and C on leaf copies of the codes: one backward gives their own
    step and, at the leaves, the gradients the encoder's adversarial and
    decorrelation terms need. Returns the critics' losses, the fooling losses
    (for the log; their gradients are in the second value) and those gradients."""
    decorrelate, objective = weights.decorrelation > 0, weights.decorrelation_objective
    z, q, logits_y = forward.z, forward.q, forward.logits_y
    n = len(z)
    z_at_dz, q_at_dy, z_at_c = (code.detach().requires_grad_() for code in (z, q, z_c_input))
    real_z, (real_y, counts_y) = ctx.prior_z(n, z.device), ctx.prior_y(n, z.device)
    with ctx.accelerator.autocast():
        dz_logits = real_fake_logits(ctx.wrapped["d_z"], *ctx.conditioned(logits_y, real_z, z_at_dz))
        dy_logits = real_fake_logits(ctx.wrapped["d_y"], real_y, q_at_dy)
        c_logits = ctx.wrapped["correlation"](z_at_c).float()
    loss_dz = real_fake_bce(dz_logits, torch.ones(n, device=z.device))
    loss_dy = real_fake_bce(dy_logits, counts_y)
    loss_c = correlation_loss(c_logits, targets)
    fake_dz, fake_dy = dz_logits[-n:].detach(), dy_logits[-n:].detach()
    losses = {"discriminator_z": loss_dz, "discriminator_y": loss_dy, "correlation": loss_c,
              "adversarial_z": fooled_bce(fake_dz[:, None]),
              "adversarial_y": fooled_bce(fake_dy[:, None])}
    scale = _loss_scale(ctx)
    grad_decorrelation = None
    if decorrelate:
        losses["decorrelation"] = decorrelation_loss(c_logits, targets, objective)
        if objective != "maximize_ce":
            # Not C's loss negated: needs its own (input-gradient-only) pass back
            # through C, scaled as every fp16 backward is.
            (grad_decorrelation,) = torch.autograd.grad(losses["decorrelation"] * scale, z_at_c,
                                                        retain_graph=True)
            grad_decorrelation = grad_decorrelation / scale
    fp16 = _fp16_scaler(ctx) is not None
    if fp16:
        fooling_z, fooling_q = _fooling_pass(dz_logits, dy_logits, z_at_dz, q_at_dy, scale)
    ctx.step(critic_optimizer, loss_dz + loss_dy + loss_c)
    if not fp16:
        fooling_z = _fooling_gradient(z_at_dz.grad / scale, fake_dz, 2 * n)
        fooling_q = _fooling_gradient(q_at_dy.grad / scale, fake_dy, 2 * n)

    grad_z, grad_q = weights.adversarial_z * fooling_z, weights.adversarial_y * fooling_q
    if decorrelate:
        # maximize_ce is C's own loss negated, so its gradient is C's, reversed.
        grad_decorrelation = weights.decorrelation * (
            -z_at_c.grad / scale if objective == "maximize_ce" else grad_decorrelation)
    return losses, _CodeGradients(grad_z, grad_q, grad_decorrelation)


def _autoencoder_step(ctx: StepContext, autoencoder_optimizer, forward: _Forward, x_u: torch.Tensor,
                      y_l: torch.Tensor, z_c_input: torch.Tensor, targets: torch.Tensor,
                      gradients: _CodeGradients, weights) -> dict:
    """The encoder and decoder's one step: their own losses plus linear
    surrogates of the code terms, whose gradients the critics' backward gave."""
    z, q = forward.z, forward.q
    # C's codes are not the training codes z themselves: the decorrelation's
    # gradient reaches the encoder through a surrogate of their own.
    separate_codes = _reads_evaluation_codes(weights) or weights.correlation_input != "training"
    grad_z = gradients.z
    if gradients.decorrelation is not None and not separate_codes:
        grad_z = grad_z + gradients.decorrelation
    with ctx.accelerator.autocast():
        x_hat = ctx.wrapped["decoder"](q, z)
    losses = {"reconstruction": F.mse_loss(x_hat.float(), x_u),
              "supervised": F.cross_entropy(forward.logits_l, y_l)}
    # The code terms are linear surrogates: their gradients are grad_z and grad_q.
    total = (weights.reconstruction * losses["reconstruction"]
             + weights.supervised * losses["supervised"]
             + (z * grad_z).sum() + (q * gradients.q).sum())
    if weights.consistency > 0:
        losses["consistency"] = consistency_loss(forward.logits_y, forward.logits_clean)
        total = total + weights.consistency * losses["consistency"]
    if weights.vat > 0:
        losses["vat"] = consistency_loss(forward.logits_perturbed, forward.logits_clean)
        total = total + weights.vat * losses["vat"]
    if weights.independence > 0:
        losses["independence"] = normalised_hsic(z_c_input, class_rows(targets, ctx.num_classes))
        total = total + weights.independence * losses["independence"]
    if gradients.decorrelation is not None and separate_codes:
        # Through the concatenation, for both, into z and the clean codes; with
        # evaluation codes, through their own forward.
        total = total + (z_c_input * gradients.decorrelation).sum()
    ctx.step(autoencoder_optimizer, total)
    return losses
