"""One training iteration: the batches it draws, the loss weights in force,
and the phases (reference order) or the fused step it runs."""
from __future__ import annotations

import dataclasses

import torch

from . import fused, phases
from .config import Config, LossConfig
from .data import DeviceBatches, random_shift


def weights_at_epoch(loss: LossConfig, epoch: int) -> LossConfig:
    """The loss weights in force at ``epoch``: a term with a start epoch
    (``loss.<term>_start_epoch``; the independence term shares the
    decorrelation's) weighs 0 before it, so each step until then is exactly
    the step without it (for VAT: no power iteration, no perturbed rows, and
    no clean rows that only VAT would read). Evaluation codes for C
    (``loss.correlation_batch_norm``) wait for their start epoch the same
    way, reading training codes until then."""
    starts = {"decorrelation": loss.decorrelation_start_epoch,
              "independence": loss.decorrelation_start_epoch, "vat": loss.vat_start_epoch}
    waiting = {term: 0.0 for term, start in starts.items()
               if getattr(loss, term) > 0 and epoch < start}
    if loss.correlation_batch_norm == "evaluation" and epoch < loss.correlation_batch_norm_start_epoch:
        waiting["correlation_batch_norm"] = "training"
    return dataclasses.replace(loss, **waiting) if waiting else loss


def training_iteration(ctx: phases.StepContext, optimizers: dict, batches: DeviceBatches,
                       epoch: int, step_in_epoch: int, config: Config) -> dict:
    if config.train.compile == "reduce-overhead":
        # CUDA graph outputs of the previous iteration may now be overwritten.
        torch.compiler.cudagraph_mark_step_begin()
    return iteration_on_batch(ctx, optimizers, batches, batches.unlabelled_batch(epoch, step_in_epoch),
                              weights_at_epoch(config.loss, epoch), config)


def iteration_on_batch(ctx: phases.StepContext, optimizers: dict, batches: DeviceBatches,
                       x_u: torch.Tensor, loss: LossConfig, config: Config) -> dict:
    """The iteration after its unlabelled batch ``x_u`` is drawn, with the
    loss weights ``loss``: everything else it does stays on the device, so a
    CUDA graph can hold it (daae.graphed)."""
    x_l, y_l = batches.labelled_batch(ctx.generator)
    # The unshifted batch, before the shift below moves it.
    x_clean = x_u if phases.reads_clean_images(loss) else None
    x_u = random_shift(x_u, config.data.max_shift, ctx.generator)
    x_l = random_shift(x_l, config.data.max_shift, ctx.generator)
    if config.train.step_mode == "fused":
        return fused.fused_step(ctx, optimizers["autoencoder"], optimizers["critics"], x_u, x_l,
                                y_l, loss, x_clean)
    out = {}
    if loss.reconstruction > 0:
        out |= phases.reconstruction_phase(ctx, optimizers["reconstruction"], x_u, loss.reconstruction)
    out |= phases.discriminator_phase(ctx, optimizers["discriminators"], x_u)
    if loss.adversarial_z > 0:
        out |= phases.adversarial_z_phase(ctx, optimizers["adversarial_z"], x_u, loss.adversarial_z)
    if loss.adversarial_y > 0:
        out |= phases.adversarial_y_phase(ctx, optimizers["adversarial_y"], x_u, loss.adversarial_y)
    if loss.supervised > 0:
        out |= phases.supervised_phase(ctx, optimizers["supervised"], x_l, y_l, loss.supervised)
    if loss.consistency > 0:
        out |= phases.consistency_phase(ctx, optimizers["consistency"], x_u, x_clean,
                                        loss.consistency)
    if loss.vat > 0:
        out |= phases.virtual_adversarial_phase(ctx, optimizers["vat"], x_clean, loss.vat,
                                                loss.vat_epsilon)
    def rows():  # fresh noise for each phase, as the reference draws it
        return phases.correlation_rows(ctx, x_u, x_clean, loss.correlation_input)

    out |= phases.correlation_phase(ctx, optimizers["correlation"], rows(), loss.correlation_target,
                                    loss.correlation_batch_norm)
    if loss.decorrelation > 0:
        out |= phases.decorrelation_phase(ctx, optimizers["decorrelation"], rows(), loss.decorrelation,
                                          loss.decorrelation_objective, loss.correlation_target,
                                          loss.correlation_batch_norm)
    if loss.independence > 0:
        out |= phases.independence_phase(ctx, optimizers["independence"], rows(), loss.independence,
                                         loss.correlation_target, loss.correlation_batch_norm)
    return out
