"""The optimizers of a training step and their learning-rate schedule."""
from __future__ import annotations

import torch

from .config import Config


def build_optimizers(nets, config: Config) -> dict[str, torch.optim.Optimizer]:
    """One Adam per phase (reference) or per side (fused), in a fixed order."""
    train, loss = config.train, config.loss

    def adam(params, weight: float = 1.0):
        lr = train.lr * (weight if train.weights_scale_lr and train.step_mode == "reference" else 1.0)
        # fused: one kernel for all parameters instead of several per tensor (CPU and GPU).
        optimizer = torch.optim.Adam(params, lr=lr, betas=(train.adam_beta1, train.adam_beta2),
                                     fused=True)
        for group in optimizer.param_groups:
            group["base_lr"] = lr
        return optimizer

    enc, dec = nets.encoder, nets.decoder
    if train.step_mode == "fused":
        return {"autoencoder": adam([*enc.parameters(), *dec.parameters()]),
                "critics": adam([*nets.d_z.parameters(), *nets.d_y.parameters(),
                                 *nets.correlation.parameters()])}
    optimizers = {
        "reconstruction": adam([*enc.parameters(), *dec.parameters()], loss.reconstruction),
        "discriminators": adam([*nets.d_z.parameters(), *nets.d_y.parameters()]),
        "adversarial_z": adam(enc.z_branch_parameters(), loss.adversarial_z),
        "adversarial_y": adam(enc.y_branch_parameters(), loss.adversarial_y),
        "supervised": adam(enc.y_branch_parameters(), loss.supervised),
        "correlation": adam(nets.correlation.parameters()),
        "decorrelation": adam(enc.z_branch_parameters(), loss.decorrelation),
    }
    if loss.consistency > 0:
        # Only when used, so that checkpoints of runs without it keep resuming.
        optimizers["consistency"] = adam(enc.y_branch_parameters(), loss.consistency)
    if loss.vat > 0:
        optimizers["vat"] = adam(enc.y_branch_parameters(), loss.vat)
    if loss.independence > 0:
        optimizers["independence"] = adam(enc.z_branch_parameters(), loss.independence)
    return optimizers


CRITIC_OPTIMIZERS = ("critics", "discriminators", "correlation")  # fused; reference


def lr_factor(epoch: int, config: Config, critic: bool = False) -> float:
    milestones = config.train.lr_milestones
    if critic and config.train.critic_lr_milestones is not None:
        milestones = config.train.critic_lr_milestones
    drops = sum(1 for milestone in milestones if epoch >= milestone)
    return config.train.lr_decay ** drops


def set_learning_rates(optimizers: dict, epoch: int, config: Config) -> None:
    for name, optimizer in optimizers.items():
        factor = lr_factor(epoch, config, critic=name in CRITIC_OPTIMIZERS)
        for group in optimizer.param_groups:
            group["lr"] = group["base_lr"] * factor
