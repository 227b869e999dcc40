"""The optimizers of a training step and their learning-rate schedule."""
from __future__ import annotations

import torch

from .config import Config


# Reference mode builds these only when their loss weight is above 0.
OPTIONAL_OPTIMIZERS = {"consistency": "loss.consistency", "vat": "loss.vat",
                       "independence": "loss.independence"}


def build_optimizers(nets, config: Config) -> dict[str, torch.optim.Optimizer]:
    """One Adam per phase (reference) or per side (fused), in a fixed order."""
    train, loss = config.train, config.loss

    def adam(params, weight: float = 1.0, lr_scale: float = 1.0):
        lr = train.lr * lr_scale * (
            weight if train.weights_scale_lr and train.step_mode == "reference" else 1.0)
        # fused: one kernel for all parameters instead of several per tensor (CPU and GPU).
        optimizer = torch.optim.Adam(params, lr=lr, betas=(train.adam_beta1, train.adam_beta2),
                                     fused=True)
        for group in optimizer.param_groups:
            group["base_lr"] = lr
        return optimizer

    enc, dec = nets.encoder, nets.decoder
    if train.step_mode == "fused":
        discriminators = [*nets.d_z.parameters(), *nets.d_y.parameters()]
        # C gets a group of its own only when its rate differs: runs without
        # the option keep the optimizer (and checkpoints) they always had.
        if train.correlation_lr_scale == 1.0:
            critics = adam([*discriminators, *nets.correlation.parameters()])
        else:
            critics = adam(discriminators)
            correlation_lr = critics.param_groups[0]["base_lr"] * train.correlation_lr_scale
            critics.add_param_group({"params": list(nets.correlation.parameters()),
                                     "lr": correlation_lr, "base_lr": correlation_lr})
        return {"autoencoder": adam([*enc.parameters(), *dec.parameters()]), "critics": critics}
    optimizers = {
        "reconstruction": adam([*enc.parameters(), *dec.parameters()], loss.reconstruction),
        "discriminators": adam([*nets.d_z.parameters(), *nets.d_y.parameters()]),
        "adversarial_z": adam(enc.z_branch_parameters(), loss.adversarial_z),
        "adversarial_y": adam(enc.y_branch_parameters(), loss.adversarial_y),
        "supervised": adam(enc.y_branch_parameters(), loss.supervised),
        "correlation": adam(nets.correlation.parameters(), lr_scale=train.correlation_lr_scale),
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


def restore_optimizer(optimizer: torch.optim.Optimizer, saved: dict) -> None:
    """Adam's moments from a checkpoint, the hyperparameters of the config
    being resumed with (an override such as train.lr=... must win). The
    parameters may be grouped otherwise than when it was saved (e.g.
    train.correlation_lr_scale changed on resume): the moments are indexed by
    position across groups, so the same parameters in the same order fit."""
    configured = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    if len(saved["param_groups"]) != len(optimizer.param_groups):
        current = optimizer.state_dict()["param_groups"]
        if (sum(len(g["params"]) for g in saved["param_groups"])
                != sum(len(g["params"]) for g in current)):
            raise ValueError("the checkpoint holds another number of parameters than this model")
        saved = {"state": saved["state"], "param_groups": current}
    optimizer.load_state_dict(saved)
    for group, settings in zip(optimizer.param_groups, configured):
        group.update(settings)
