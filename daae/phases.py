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

    def prior_y(self, count: int, device) -> torch.Tensor:
        labels = torch.randint(self.num_classes, (count,), generator=self.generator, device=device)
        return F.one_hot(labels, self.num_classes).float()

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


def _real_fake_bce(critic: nn.Module, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    # One forward over [real; fake]: DDP allows one forward per backward, and
    # the critics have no batch norm, so concatenating changes nothing else.
    logits = critic(torch.cat([real, fake])).float().squeeze(1)
    targets = torch.cat([torch.ones(len(real), device=logits.device),
                         torch.zeros(len(fake), device=logits.device)])
    return F.binary_cross_entropy_with_logits(logits, targets)


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
        loss_z = _real_fake_bce(ctx.wrapped["d_z"], ctx.prior_z(len(x), x.device), z.float())
        loss_y = _real_fake_bce(ctx.wrapped["d_y"], ctx.prior_y(len(x), x.device),
                                logits_y.float().softmax(1))
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


def correlation_phase(ctx: StepContext, optimizer, x: torch.Tensor, target_kind: str):
    with torch.no_grad(), ctx.accelerator.autocast():
        logits_y, z = ctx.plain.encoder(ctx.noisy(x))
    targets = correlation_targets(logits_y, target_kind)
    with ctx.accelerator.autocast():
        logits_c = ctx.wrapped["correlation"](z.float())
    loss = F.cross_entropy(logits_c.float(), targets)
    ctx.step(optimizer, loss)
    return {"correlation": loss.detach()}


def decorrelation_phase(ctx: StepContext, optimizer, x: torch.Tensor, weight: float,
                        objective: str, target_kind: str):
    with frozen(ctx.plain.correlation), ctx.accelerator.autocast():
        logits_y, z = ctx.wrapped["encoder"](ctx.noisy(x))
        logits_c = ctx.plain.correlation(z)
    loss = decorrelation_loss(logits_c, correlation_targets(logits_y, target_kind), objective)
    ctx.step(optimizer, weight * loss)
    return {"decorrelation": loss.detach()}


# ------------------------------------------------------------------- fused step

def fused_step(ctx: StepContext, autoencoder_optimizer, critic_optimizer,
               x_u: torch.Tensor, x_l: torch.Tensor, y_l: torch.Tensor, weights,
               decorrelate: bool, objective: str, target_kind: str):
    """All six losses from one encoder forward over [x_u; x_l].

    The critics (D_z, D_y, C) first take their step on the detached codes;
    then the encoder and decoder take one step on the weighted sum of their
    losses, judged by the freshly updated critics.
    """
    n = len(x_u)
    with ctx.accelerator.autocast():
        logits_all, z_all = ctx.wrapped["encoder"](ctx.noisy(torch.cat([x_u, x_l])))
    logits_y, z, logits_l = logits_all[:n].float(), z_all[:n].float(), logits_all[n:].float()
    q = logits_y.softmax(1)
    targets = correlation_targets(logits_y, target_kind)

    with ctx.accelerator.autocast():
        loss_dz = _real_fake_bce(ctx.wrapped["d_z"], ctx.prior_z(n, x_u.device), z.detach())
        loss_dy = _real_fake_bce(ctx.wrapped["d_y"], ctx.prior_y(n, x_u.device), q.detach())
        loss_c = F.cross_entropy(ctx.wrapped["correlation"](z.detach()).float(), targets)
    ctx.step(critic_optimizer, loss_dz + loss_dy + loss_c)

    plain = ctx.plain
    with frozen(plain.d_z, plain.d_y, plain.correlation), ctx.accelerator.autocast():
        x_hat = ctx.wrapped["decoder"](q, z)
        loss_rec = F.mse_loss(x_hat.float(), x_u)
        loss_gz = _fooled_bce(plain.d_z(z))
        loss_gy = _fooled_bce(plain.d_y(q))
        loss_sup = F.cross_entropy(logits_l, y_l)
        total = (weights.reconstruction * loss_rec + weights.adversarial_z * loss_gz
                 + weights.adversarial_y * loss_gy + weights.supervised * loss_sup)
        losses = {"reconstruction": loss_rec, "discriminator_z": loss_dz,
                  "discriminator_y": loss_dy, "adversarial_z": loss_gz, "adversarial_y": loss_gy,
                  "supervised": loss_sup, "correlation": loss_c}
        if decorrelate:
            loss_dec = decorrelation_loss(plain.correlation(z), targets, objective)
            total = total + weights.decorrelation * loss_dec
            losses["decorrelation"] = loss_dec
    ctx.step(autoencoder_optimizer, total)
    return {name: value.detach() for name, value in losses.items()}
