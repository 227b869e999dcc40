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
from .config import CLASS_MAP_KEYS, Config, ConfigError, save_config, to_dict
from .data import load_data, to_float
from .evaluate import evaluate, fit_probes, tensorboard_tags
from .graphed import make_iteration
from .grids import reconstruction_grid, save_png
from .interrupt import StopRequest, TrainingInterrupted
from .optimizers import OPTIONAL_OPTIMIZERS, lr_factor, restore_optimizer, set_learning_rates
from .prepare import make_accelerator, prepare_training
from .runs import (CONFIG_FILE, LOCK_FILE, METRICS_FILE, config_changes, describe_changes,
                   model_changes, new_run_dir, record_resume, refuse_split_changes, write_json)
from .sample import tensorboard_generation
from .tracker import LossTracker, NonFiniteLossError

log = logging.getLogger(__name__)

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


# ------------------------------------------------------------------------- helpers

def _resolve_run_dir(config: Config, accelerator: Accelerator, run_dir, resume) -> Path:
    if resume is not None:
        # Before the data loads and the lock makes a folder: a mistyped path would leave one.
        resume = Path(resume)
        if not resume.is_dir():
            run_folder = resume.parent.parent
            hint = (f": {resume} is the checkpoint of {run_folder}, so pass {run_folder}"
                    if checkpoint.checkpoint_path(run_folder) == resume else "")
            raise ConfigError(f"--resume {resume}: not a run folder; pass the folder that daae train "
                              f"wrote (run.dir/run.name){hint}")
        return resume
    if run_dir is None:
        chosen = [str(new_run_dir(config))]
        broadcast_object_list(chosen)
        run_dir = chosen[0]
    run_dir = Path(run_dir)
    for folder, key in ((run_dir.parent, "run.dir"), (run_dir, "run.name")):
        if folder.exists() and not folder.is_dir():
            raise ConfigError(f"{folder} is a file, not a folder: choose another {key}")
    if checkpoint.checkpoint_path(run_dir).exists():
        raise ConfigError(f"run folder {run_dir} already holds a checkpoint: continue it with "
                          f"--resume {run_dir}, or choose another run.name")
    return run_dir


def _lock_run_dir(run_dir: Path):
    """An exclusive lock on the run folder for as long as the returned file
    stays open: a second process training the same folder (a resume started
    twice) would interleave checkpoints and event files."""
    import fcntl

    run_dir.mkdir(parents=True, exist_ok=True)
    handle = open(run_dir / LOCK_FILE, "w")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise ConfigError(f"another daae process is training {run_dir} (it holds {LOCK_FILE}): "
                          f"wait for it to end, or stop it first") from None
    except OSError as exc:  # a file system without locks: train unguarded, as before
        log.warning("cannot lock %s (%s): nothing stops a second process training it", run_dir, exc)
    return handle


def _gather_rows(accelerator: Accelerator, row: torch.Tensor) -> torch.Tensor:
    """Every process's ``row``, stacked in rank order, on the CPU."""
    if accelerator.num_processes == 1:
        return row[None].cpu()
    return accelerator.gather(row.to(accelerator.device)[None]).cpu()


def _float_buffers(nets) -> list[torch.Tensor]:
    return [buffer for buffer in nets.buffers() if buffer.is_floating_point()]


def _process_state(accelerator: Accelerator, nets, tracker: LossTracker, own_buffers: bool) -> dict:
    """What each process goes on with that the shared weights do not hold: its
    loss sums since the last log step (a stop between log steps would
    otherwise log a mean over fewer steps), and with ``own_buffers`` its
    batch-norm statistics, which differ across processes between the
    averagings at the scheduled checkpoints."""
    state = {"loss_sums": [{"names": list(names), "sums": _gather_rows(accelerator, sums), "count": count}
                           for names, sums, count in tracker.partial_sums()]}
    if own_buffers:
        # float64 holds every buffer dtype exactly.
        state["buffers"] = _gather_rows(accelerator, torch.cat(
            [buffer.detach().flatten().double() for buffer in _float_buffers(nets)]))
    return state


def _restore_process_state(state: dict, accelerator: Accelerator, nets, tracker: LossTracker) -> None:
    rank = accelerator.process_index
    for entry in state.get("loss_sums", []):
        if len(entry["sums"]) == accelerator.num_processes:
            tracker.restore(tuple(entry["names"]), entry["sums"][rank], entry["count"])
    rows = state.get("buffers")
    if rows is not None and len(rows) == accelerator.num_processes:
        buffers = _float_buffers(nets)
        values = rows[rank].split([buffer.numel() for buffer in buffers])
        for buffer, value in zip(buffers, values):
            buffer.copy_(value.view_as(buffer))


def _average_buffers(accelerator: Accelerator, nets) -> None:
    """Make batch-norm statistics equal on every rank. DDP copies rank 0's buffers
    at each wrapped forward, but the frozen-network forwards of the phases
    update each rank's statistics locally."""
    if accelerator.num_processes == 1:
        return
    for buffer in _float_buffers(nets):
        torch.distributed.all_reduce(buffer)
        buffer /= accelerator.num_processes


def _checkpoint_state(config, nets, optimizers, step, generator_states, processes,
                      run_seconds) -> dict:
    rng = {"generators": generator_states, "torch": torch.get_rng_state()}
    return {"format": checkpoint.FORMAT_VERSION, "config": to_dict(config), "step": step,
            "train_seconds": run_seconds,
            "networks": nets.state_dict(),
            "optimizers": {name: opt.state_dict() for name, opt in optimizers.items()},
            "rng": rng, "processes": processes}


def _restore(state: dict, changes: dict, nets, optimizers, generator, tracker, accelerator,
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
            f"keep it as the run had it (or above 0 at a different weight), or start a new run "
            f"(one in train.step_mode=fused can switch it)")
    if missing:
        raise checkpoint.CheckpointError(
            f"{path} was written with other optimizers ({', '.join(sorted(state['optimizers']))}); "
            f"keep train.step_mode as it was when the run started")
    try:
        nets.load_state_dict(state["networks"])
    except RuntimeError as exc:
        changed = describe_changes(model_changes(changes))
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
        # A copy: a row of the stacked states is a view at an offset, which
        # the CPU generator's set_state reads out of bounds (a segfault on rank 1).
        generator.set_state(states[accelerator.process_index].clone())
    else:
        log.warning("checkpoint has %d random streams for %d processes; reseeding",
                    len(states), accelerator.num_processes)
    torch.set_rng_state(state["rng"]["torch"])
    # Absent from checkpoints written before it: the loss means then restart at the resume.
    _restore_process_state(state.get("processes", {}), accelerator, nets, tracker)
    return int(state["step"]), state.get("train_seconds")


# --------------------------------------------------------------------------- train

def _warn_unmapped(probes, step: int) -> None:
    for name, error in (probes.map_errors if probes is not None else {}).items():
        log.warning("step %d: no class-%s probes (%s): %s", step, name, CLASS_MAP_KEYS[name], error)


def train(config: Config, *, resume: str | Path | None = None, run_dir: str | Path | None = None,
          hooks: Hooks | None = None) -> dict:
    """Train one model; returns the final metrics (also written to metrics.json).

    ``resume`` continues the run folder's last checkpoint; ``run_dir`` fixes
    the folder (Tune trials) instead of one named from ``config.run``.
    """
    accelerator = make_accelerator(config.train.mixed_precision, config.train.cuda_graph)
    if config.train.mixed_precision == "fp16" and accelerator.device.type == "cpu":
        raise ConfigError("train.mixed_precision=fp16 needs a GPU; use bf16 on CPU")
    run_dir = _resolve_run_dir(config, accelerator, run_dir, resume)
    if resume is not None:  # config.yaml says where the run is, whichever --config named it
        config = replace(config, run=replace(config.run, dir=str(run_dir.parent), name=run_dir.name))
    # What can fail on the config or the data fails before the folder is made or locked.
    data = load_data(config.data, config.seed)
    setup = prepare_training(config, accelerator, data)
    run_lock = _lock_run_dir(run_dir) if accelerator.is_main_process else None
    try:
        return _train_in(run_dir, config, accelerator, data, setup, resume, hooks or Hooks())
    finally:  # an error too lets the folder go
        if run_lock is not None:
            run_lock.close()


def _train_in(run_dir: Path, config: Config, accelerator: Accelerator, data, setup, resume,
              hooks: Hooks) -> dict:
    """train()'s work, in the run folder it resolved and locked."""
    device = accelerator.device
    main = accelerator.is_main_process
    nets, optimizers, generator, batches = setup.nets, setup.optimizers, setup.generator, setup.batches
    iteration = make_iteration(setup, config)

    # Training seconds of the stretches this run resumed through, each up to
    # its last checkpoint (steps after it are trained again, and timed again).
    step, earlier_seconds = 0, 0.0
    ckpt_path = checkpoint.checkpoint_path(run_dir)
    tracker = LossTracker(device)
    if resume is not None:
        state = checkpoint.load(ckpt_path)
        changes = config_changes(state.get("config", {}), config)
        refuse_split_changes(changes, f"{ckpt_path} does not fit this resume",
                             "which a run keeps: resume without changing them, or start a new run")
        step, earlier_seconds = _restore(state, changes, nets, optimizers, generator, tracker,
                                         accelerator, ckpt_path)
        del state  # the weights are in the networks now; no second copy for the whole run
        log.info("resumed %s at step %d%s", run_dir, step, "".join(
            f"; {key}: {json.dumps(before)} -> {json.dumps(after)}"
            for key, (before, after) in changes.items()))
    total_steps = planned_steps(config, batches.steps_per_epoch)

    writer = None
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        # metrics.json records the count, so that `daae summary` can tell a
        # finished resume from one still running without file times, which a copy resets.
        resumes = 0
        if resume is not None:  # before config.yaml: a record it cannot extend stops the run first
            resumes = record_resume(run_dir, step, changes)
        save_config(config, run_dir / CONFIG_FILE)
        # Left by a process killed while it wrote a checkpoint (the lock says none writes now).
        for stale in ckpt_path.parent.glob(f".{ckpt_path.name}.*.tmp"):
            stale.unlink()
        from torch.utils.tensorboard import SummaryWriter
        # purge_step: TensorBoard drops what the stopped stretch logged after the
        # checkpoint, which this one logs again.
        writer = SummaryWriter(str(run_dir), purge_step=step + 1 if resume is not None else None)
    grid_images = to_float(data.validation.images[:8]).to(device)
    images_per_step = 2 * config.train.batch_size * accelerator.num_processes

    def run_seconds(seconds: float) -> float | None:
        """The whole run's training time, given this process's ``seconds``."""
        return None if earlier_seconds is None else earlier_seconds + seconds

    def save_checkpoint(seconds: float):
        """``seconds``: this process's training time up to the step saved."""
        tracker.check()
        # Read before the averaging: where the uninterrupted run would not
        # average (a stop, or the end, off the evaluation and checkpoint
        # steps), each process goes on with its own statistics.
        own_buffers = (accelerator.num_processes > 1 and step % config.run.eval_every != 0
                       and step % config.run.checkpoint_every != 0)
        processes = _process_state(accelerator, nets, tracker, own_buffers)
        _average_buffers(accelerator, nets)
        states = _gather_rows(accelerator, generator.get_state())
        if main:
            checkpoint.save_atomic(_checkpoint_state(config, nets, optimizers, step, states, processes,
                                                     run_seconds(seconds)), ckpt_path)
            if hooks.on_checkpoint:
                hooks.on_checkpoint(step, ckpt_path)
        accelerator.wait_for_everyone()

    def write_grids():
        grid = reconstruction_grid(nets, grid_images)
        writer.add_image("images/reconstructions", grid, step)
        save_png(grid, run_dir / "images" / f"reconstructions_{step:07d}.png")
        # The ten classes decoded with a few styles: the "random" grid.
        tensorboard_generation(writer, nets, data, step, seed=config.seed,
                               images_dir=run_dir / "images")

    def periodic_evaluation():
        tracker.check()
        _average_buffers(accelerator, nets)
        if main:
            periodic = replace(config.eval, probe_epochs=config.eval.probe_epochs_during_training)
            probes = (fit_probes(nets, data.train_images(), periodic, data.num_classes, device, config.seed)
                      if config.eval.probes_during_training else None)
            metrics = evaluate(nets, data.validation, data.labelled, periodic, data.num_classes,
                               device, probes)
            _warn_unmapped(probes, step)
            for tag, value in tensorboard_tags("val", metrics).items():
                writer.add_scalar(tag, value, step)
            write_grids()
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

    stop = StopRequest.install()
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
            # Every step alone; with several processes at log steps, where they agree.
            if ((accelerator.num_processes == 1 or step % config.run.log_every == 0)
                    and step < total_steps and stop.requested(device, accelerator.num_processes)):
                if step % config.run.checkpoint_every:  # not written just now
                    save_checkpoint(trained_seconds)
                raise TrainingInterrupted(f"stopped by {stop.signal_name} at step {step}, with a "
                                          f"checkpoint there: go on with daae train --resume {run_dir}")
    except NonFiniteLossError as exc:
        last = f"the last good checkpoint is {ckpt_path}" if ckpt_path.exists() else "no checkpoint was written"
        raise NonFiniteLossError(f"{exc} ({last}, left intact); lower train.lr or the loss "
                                 f"weights, or try train.mixed_precision=no") from None
    finally:
        stop.restore()
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
        _warn_unmapped(probes, step)
        for name, error in probes.map_errors.items():  # why metrics.json lacks that pair
            result[f"class_{name}_error"] = error
        result["validation"] = evaluate(nets, data.validation, data.labelled, config.eval,
                                        data.num_classes, device, probes)
        if config.eval.final_test:
            result["test"] = evaluate(nets, data.test, data.labelled, config.eval,
                                      data.num_classes, device, probes)
        for split_name, short in (("validation", "val"), ("test", "test")):
            for tag, value in tensorboard_tags(short, result.get(split_name, {})).items():
                writer.add_scalar(tag, value, step)
        write_grids()  # the trained model's, also when the run is shorter than run.eval_every
        if hooks.on_evaluation:
            hooks.on_evaluation(step, result["validation"])
        write_json({**result, "resumes": resumes}, run_dir / METRICS_FILE)
        writer.close()
    accelerator.wait_for_everyone()
    return result
