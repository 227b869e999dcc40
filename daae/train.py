"""train(config): the one training function behind `daae train` and every Tune trial."""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Optional

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list

from . import checkpoint
from .config import Config, ConfigError, save_config, to_dict
from .data import load_data, to_float
from .evaluate import evaluate, fit_probes, tensorboard_tags
from .graphed import make_iteration
from .grids import reconstruction_grid, save_png
from .optimizers import OPTIONAL_OPTIMIZERS, lr_factor, restore_optimizer, set_learning_rates
from .prepare import make_accelerator, prepare_training
from .sample import tensorboard_generation
from .runs import CONFIG_FILE, METRICS_FILE, config_changes, new_run_dir, record_resume, write_json

log = logging.getLogger(__name__)

LOSS_NAMES = ("reconstruction", "discriminator_z", "discriminator_y", "adversarial_z",
              "adversarial_y", "supervised", "correlation", "decorrelation", "consistency", "vat",
              "independence")


class NonFiniteLossError(RuntimeError):
    """A loss became NaN or infinite; the run stops before writing another checkpoint."""


@dataclass
class Hooks:
    """Callbacks for code that drives train() (Ray Tune); called on the main process."""
    on_evaluation: Optional[Callable[[int, dict], None]] = None  # (step, validation metrics)
    on_checkpoint: Optional[Callable[[int, Path], None]] = None  # (step, checkpoint file)


# ------------------------------------------------------------------------ iteration

def planned_steps(config: Config, steps_per_epoch: int) -> int:
    """All epochs, or train.max_steps when that comes first."""
    total = config.train.epochs * steps_per_epoch
    return total if config.train.max_steps is None else min(total, config.train.max_steps)


class LossTracker:
    """Sums losses on the device and remembers the first non-finite step of
    each, so that the host only syncs when it logs or checkpoints. A step's
    losses go in as one stacked vector: five operators a step, however many
    losses (one at a time took 67 for the shipped configs' eleven, more host
    time than a CUDA-graphed iteration's single replay)."""

    NEVER = torch.iinfo(torch.long).max

    def __init__(self, device):
        self.device = device
        # Keyed by the loss names a step returns, in its order (the set changes
        # when a term starts): sums since the last pop, steps summed, and each
        # loss's first non-finite step (NEVER if none).
        self.sums: dict[tuple, torch.Tensor] = {}
        self.counts: dict[tuple, int] = {}
        self.first_bad: dict[tuple, torch.Tensor] = {}

    def add(self, step: int, losses: dict) -> None:
        names = tuple(losses)
        values = torch.stack(tuple(losses.values()))
        if names not in self.sums:
            self.sums[names] = torch.zeros(len(names), device=self.device)
            self.counts[names] = 0
            self.first_bad[names] = torch.full((len(names),), self.NEVER, dtype=torch.long,
                                               device=self.device)
        self.sums[names] += values
        self.counts[names] += 1
        first_bad = self.first_bad[names]
        self.first_bad[names] = torch.where(torch.isfinite(values), first_bad,
                                            first_bad.clamp_max(step))

    def check(self) -> None:
        """Raises on every process when a loss went non-finite on any: one
        process stopping alone would leave the others waiting in their next
        collective (until NCCL's timeout, under a launcher that does not kill them)."""
        first_bads = _across_processes(self.first_bad, torch.distributed.ReduceOp.MIN)
        bad = [(step, name) for names, first_bad in first_bads.items()
               for step, name in zip(first_bad.tolist(), names) if step != self.NEVER]
        if bad:
            step, name = min(bad)
            raise NonFiniteLossError(f"the {name} loss became non-finite at step {step}")

    def pop_means(self) -> dict[str, float]:
        """Each loss's mean since the last call, over every process's batches
        (every process has run the same steps)."""
        totals: dict[str, float] = {}
        counts: dict[str, int] = {}
        processes = _process_count()
        all_sums = _across_processes(self.sums, torch.distributed.ReduceOp.SUM)
        for names, sums in all_sums.items():
            if self.counts[names] == 0:
                continue
            for name, total in zip(names, sums.tolist()):
                totals[name] = totals.get(name, 0.0) + total
                counts[name] = counts.get(name, 0) + self.counts[names] * processes
        for sums in self.sums.values():
            sums.zero_()
        self.counts = dict.fromkeys(self.counts, 0)
        return {name: totals[name] / counts[name] for name in sorted(totals, key=LOSS_NAMES.index)}


def _process_count() -> int:
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    return torch.distributed.get_world_size() if distributed else 1


def _across_processes(tensors: dict, op) -> dict:
    """``tensors`` reduced with ``op`` over the processes, in one collective;
    the same dict when there is one process. Every process holds the same keys
    in the same order: they come from the same steps."""
    if _process_count() == 1 or not tensors:
        return tensors
    flat = torch.cat(list(tensors.values()))
    torch.distributed.all_reduce(flat, op=op)
    return dict(zip(tensors, flat.split([len(t) for t in tensors.values()])))


# ------------------------------------------------------------------------- helpers

def _resolve_run_dir(config: Config, accelerator: Accelerator, run_dir, resume) -> Path:
    if resume is not None:
        return Path(resume)
    if run_dir is None:
        chosen = [str(new_run_dir(config))]
        broadcast_object_list(chosen)
        run_dir = chosen[0]
    run_dir = Path(run_dir)
    if checkpoint.checkpoint_path(run_dir).exists():
        raise ConfigError(f"run folder {run_dir} already holds a checkpoint: continue it with "
                          f"--resume {run_dir}, or choose another run.name")
    return run_dir


def _gather_generator_states(accelerator: Accelerator, generator: torch.Generator) -> torch.Tensor:
    state = generator.get_state()
    if accelerator.num_processes == 1:
        return state[None]
    return accelerator.gather(state.to(accelerator.device)[None]).cpu()


def _average_buffers(accelerator: Accelerator, nets) -> None:
    """Make batch-norm statistics equal on every rank. DDP copies rank 0's buffers
    at each wrapped forward, but the frozen-network forwards of the phases
    update each rank's statistics locally."""
    if accelerator.num_processes == 1:
        return
    for buffer in nets.buffers():
        if buffer.is_floating_point():
            torch.distributed.all_reduce(buffer)
            buffer /= accelerator.num_processes


def _checkpoint_state(config, nets, optimizers, step, generator_states, run_seconds) -> dict:
    rng = {"generators": generator_states, "torch": torch.get_rng_state()}
    return {"format": checkpoint.FORMAT_VERSION, "config": to_dict(config), "step": step,
            "train_seconds": run_seconds,
            "networks": nets.state_dict(),
            "optimizers": {name: opt.state_dict() for name, opt in optimizers.items()},
            "rng": rng}


def _restore(state: dict, changes: dict, nets, optimizers, generator, accelerator,
             path) -> tuple[int, float | None]:
    """The step to go on from and the run's training seconds up to it (None
    from a checkpoint written before daae recorded them). ``changes``: the
    resume's config changes (``runs.config_changes``), to name the model keys
    when the weights do not fit."""
    missing = set(optimizers) ^ set(state["optimizers"])
    if missing and missing <= set(OPTIONAL_OPTIMIZERS):
        switched = "; ".join(
            f"{OPTIONAL_OPTIMIZERS[name]} is "
            f"{'above 0' if name in optimizers else '0'} here, "
            f"{'above 0' if name in state['optimizers'] else '0'} in the checkpoint"
            for name in sorted(missing))
        raise checkpoint.CheckpointError(
            f"{path} does not fit this run's optimizers: {switched}. With train.step_mode=reference "
            f"such a term has its own optimizer, so it cannot be switched on or off on resume: "
            f"keep it as the run had it (or above 0 at a different weight), or use "
            f"train.step_mode=fused, or start a new run")
    if missing:
        raise checkpoint.CheckpointError(
            f"{path} was written with other optimizers ({', '.join(sorted(state['optimizers']))}); "
            f"keep train.step_mode as it was when the run started")
    try:
        nets.load_state_dict(state["networks"])
    except RuntimeError as exc:
        written = state.get("config", {}).get("model", {})
        # Each value as an override would spell it (JSON: false, not False).
        changed = "; ".join(f"{key} is {json.dumps(now)} here, {json.dumps(before)} in the checkpoint"
                            for key, (before, now) in changes.items()
                            if key.startswith("model.") and key.partition(".")[2] in written)
        if changed:
            raise checkpoint.CheckpointError(
                f"{path} does not fit this model: {changed}. Resume with the model the run "
                f"started with (drop those overrides).") from None
        raise checkpoint.CheckpointError(f"{path} does not fit this model: {exc}") from None
    for name, optimizer in optimizers.items():
        try:
            restore_optimizer(optimizer, state["optimizers"][name])
        except ValueError as exc:
            raise checkpoint.CheckpointError(f"{path}: optimizer {name!r}: {exc}") from None
    states = state["rng"]["generators"]
    if len(states) == accelerator.num_processes:
        generator.set_state(states[accelerator.process_index])
    else:
        log.warning("checkpoint has %d random streams for %d processes; reseeding",
                    len(states), accelerator.num_processes)
    torch.set_rng_state(state["rng"]["torch"])
    return int(state["step"]), state.get("train_seconds")


# --------------------------------------------------------------------------- train

def _warn_unwhitened(probes, step: int) -> None:
    if probes is not None and probes.whitening_error:
        log.warning("step %d: no class-whitened probes (eval.class_whitened_probes): %s",
                    step, probes.whitening_error)


def train(config: Config, *, resume: str | Path | None = None, run_dir: str | Path | None = None,
          hooks: Hooks | None = None) -> dict:
    """Train one model; returns the final metrics (also written to metrics.json).

    ``resume`` continues the run folder's last checkpoint; ``run_dir`` fixes
    the folder (Tune trials) instead of one named from ``config.run``.
    """
    hooks = hooks or Hooks()
    accelerator = make_accelerator(config.train.mixed_precision, config.train.cuda_graph)
    device = accelerator.device
    if config.train.mixed_precision == "fp16" and device.type == "cpu":
        raise ConfigError("train.mixed_precision=fp16 needs a GPU; use bf16 on CPU")
    run_dir = _resolve_run_dir(config, accelerator, run_dir, resume)
    main = accelerator.is_main_process

    data = load_data(config.data, config.seed)
    setup = prepare_training(config, accelerator, data)
    nets, optimizers, generator, batches = setup.nets, setup.optimizers, setup.generator, setup.batches
    iteration = make_iteration(setup, config)

    # Training seconds of the stretches this run resumed through, each up to
    # its last checkpoint (steps after it are trained again, and timed again).
    step, earlier_seconds = 0, 0.0
    ckpt_path = checkpoint.checkpoint_path(run_dir)
    if resume is not None:
        state = checkpoint.load(ckpt_path)
        changes = config_changes(state.get("config", {}), config)
        step, earlier_seconds = _restore(state, changes, nets, optimizers, generator, accelerator,
                                         ckpt_path)
        del state  # the weights are in the networks now; no second copy for the whole run
        log.info("resumed %s at step %d%s", run_dir, step, "".join(
            f"; {key}: {json.dumps(before)} -> {json.dumps(after)}"
            for key, (before, after) in changes.items()))
    total_steps = planned_steps(config, batches.steps_per_epoch)

    writer = None
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        if resume is not None:  # before config.yaml: a record it cannot extend stops the run first
            record_resume(run_dir, step, changes)
        save_config(config, run_dir / CONFIG_FILE)
        from torch.utils.tensorboard import SummaryWriter
        writer = SummaryWriter(str(run_dir))
    grid_images = to_float(data.validation.images[:8]).to(device)
    tracker = LossTracker(device)
    images_per_step = 2 * config.train.batch_size * accelerator.num_processes

    def run_seconds(seconds: float) -> float | None:
        """The whole run's training time, given this process's ``seconds``."""
        return None if earlier_seconds is None else earlier_seconds + seconds

    def save_checkpoint(seconds: float):
        """``seconds``: this process's training time up to the step saved."""
        tracker.check()
        _average_buffers(accelerator, nets)
        states = _gather_generator_states(accelerator, generator)
        if main:
            checkpoint.save_atomic(_checkpoint_state(config, nets, optimizers, step, states,
                                                     run_seconds(seconds)), ckpt_path)
            if hooks.on_checkpoint:
                hooks.on_checkpoint(step, ckpt_path)
        accelerator.wait_for_everyone()

    def periodic_evaluation():
        tracker.check()
        _average_buffers(accelerator, nets)
        if main:
            periodic = replace(config.eval, probe_epochs=config.eval.probe_epochs_during_training)
            probes = (fit_probes(nets, data.train_images(), periodic, data.num_classes, device, config.seed)
                      if config.eval.probes_during_training else None)
            metrics = evaluate(nets, data.validation, data.labelled, periodic, data.num_classes,
                               device, probes)
            _warn_unwhitened(probes, step)
            for tag, value in tensorboard_tags("val", metrics).items():
                writer.add_scalar(tag, value, step)
            grid = reconstruction_grid(nets, grid_images)
            writer.add_image("images/reconstructions", grid, step)
            save_png(grid, run_dir / "images" / f"reconstructions_{step:07d}.png")
            # The ten classes decoded with a few styles: the "random" grid.
            tensorboard_generation(writer, nets, data, step, seed=config.seed,
                                   images_dir=run_dir / "images")
            # A Tune scheduler may kill this process right after the hook.
            writer.flush()
            if hooks.on_evaluation:
                hooks.on_evaluation(step, metrics)
        accelerator.wait_for_everyone()

    from tqdm.auto import tqdm
    # disable=None: tqdm draws only on a terminal; into a redirected log it
    # would write a line per refresh for the whole run.
    progress = tqdm(total=total_steps, initial=step,
                    disable=None if main and config.run.progress_bar else True,
                    desc="train", dynamic_ncols=True)
    steps_timed, excluded_seconds = 0, 0.0  # evaluation and checkpoints are not training time
    loop_started = time.perf_counter()

    def training_seconds() -> float:
        return max(time.perf_counter() - loop_started - excluded_seconds, 1e-9)

    try:
        while step < total_steps:
            epoch, step_in_epoch = divmod(step, batches.steps_per_epoch)
            if step_in_epoch == 0 or steps_timed == 0:
                set_learning_rates(optimizers, epoch, config)
            losses = iteration(epoch, step_in_epoch)
            step += 1  # counted as TensorBoard and checkpoints count it
            tracker.add(step, losses)
            steps_timed += 1
            progress.update(1)
            if step % config.run.log_every == 0 or step == total_steps:
                tracker.check()
                means = tracker.pop_means()
                if main:
                    for name, value in means.items():
                        writer.add_scalar(f"loss/{name}", value, step)
                    writer.add_scalar("train/lr_factor", lr_factor(epoch, config), step)
                    if config.train.critic_lr_milestones is not None:
                        writer.add_scalar("train/critic_lr_factor",
                                          lr_factor(epoch, config, critic=True), step)
                    writer.add_scalar("train/epoch", epoch, step)
                    writer.add_scalar("perf/images_per_second",
                                      steps_timed * images_per_step / training_seconds(), step)
                    progress.set_postfix({k: f"{v:.3f}" for k, v in means.items()
                                          if k in ("reconstruction", "supervised", "correlation")})
            trained_seconds = training_seconds()
            paused = time.perf_counter()
            if step % config.run.eval_every == 0 and step < total_steps:
                periodic_evaluation()
            if step % config.run.checkpoint_every == 0 and step < total_steps:
                save_checkpoint(trained_seconds)
            excluded_seconds += time.perf_counter() - paused
    except NonFiniteLossError as exc:
        last = f"the last good checkpoint is {ckpt_path}" if ckpt_path.exists() else "no checkpoint was written"
        raise NonFiniteLossError(f"{exc} ({last}, left intact); lower train.lr or the loss "
                                 f"weights, or try train.mixed_precision=no") from None
    finally:
        progress.close()

    train_seconds = training_seconds()
    save_checkpoint(train_seconds)
    result = {"step": step, "epoch": step / batches.steps_per_epoch, "run_dir": str(run_dir),
              "train_seconds": train_seconds,
              "run_train_seconds": run_seconds(train_seconds),
              "images_per_second": steps_timed * images_per_step / train_seconds}
    if main:
        # One fit scored on both splits: it would be the same fit each time.
        probes = fit_probes(nets, data.train_images(), config.eval, data.num_classes, device,
                            config.seed)
        _warn_unwhitened(probes, step)
        if probes.whitening_error:  # why metrics.json lacks the whitened pair
            result["class_whitened_error"] = probes.whitening_error
        result["validation"] = evaluate(nets, data.validation, data.labelled, config.eval,
                                        data.num_classes, device, probes)
        if config.eval.final_test:
            result["test"] = evaluate(nets, data.test, data.labelled, config.eval,
                                      data.num_classes, device, probes)
        for split_name, short in (("validation", "val"), ("test", "test")):
            for tag, value in tensorboard_tags(short, result.get(split_name, {})).items():
                writer.add_scalar(tag, value, step)
        if hooks.on_evaluation:
            hooks.on_evaluation(step, result["validation"])
        write_json(result, run_dir / METRICS_FILE)
        writer.close()
    accelerator.wait_for_everyone()
    return result
