"""One Tune trial: the very same ``daae.train.train(config)`` as ``daae train``,
with hooks that report validation metrics and checkpoints to Tune.

A trial checkpoints through Tune (``ray.tune.Checkpoint`` made from the
trainer's ``checkpoints/`` folder) and, when Tune restarts it after a failure,
puts that checkpoint back and continues with ``train(config, resume=...)``.
"""
from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from daae.atomic import atomic_write
from daae.checkpoint import checkpoint_path
from daae.config import Config

from .objective import Objective
from .spec import ARM_KEY, SEED_KEY, SearchSpec, trial_params

log = logging.getLogger(__name__)

STEP_FILE = "tune_step.json"  # beside last.pt, so a restored checkpoint says its step
CRASH_MARKER = ".fault_injection_crashed"


def trial_dirname(trial_id: str, config: dict) -> str:
    """The trial's folder name, also TensorBoard's run name: short, and
    computable inside the trial from its id and Tune config alone."""
    params, sample = trial_params(config)
    parts = [str(trial_id)]
    if params.get(ARM_KEY):
        parts.append(str(params[ARM_KEY]))
    if sample is not None:
        parts.append(f"c{sample}-seed{params[SEED_KEY]}")
    return "-".join(parts)


@dataclass
class TrialSetup:
    """What every trial needs besides its sampled params (picklable)."""
    spec: SearchSpec
    # Local experiment folder: trials write their run folder straight into
    # their Tune trial folder. None (remote storage): they write into Tune's
    # per-trial working directory, which Tune syncs as artifacts.
    experiment_dir: Optional[str]

    def run_dir(self, trial_id: str, config: dict) -> Path:
        if self.experiment_dir is None:
            return Path.cwd()
        return Path(self.experiment_dir) / trial_dirname(trial_id, config)


class Reporter:
    """Turns the trainer's hooks into ``ray.tune.report`` calls.

    The trainer evaluates and then checkpoints at the same step inside its
    loop, but checkpoints and then evaluates at the end. Either way the two
    arrive back to back, and they are reported together so that every
    checkpoint Tune keeps carries the metrics of its step. A checkpoint that
    arrives first marks the final evaluation, which waits for ``finish()``
    (after train() returns): a scheduler may stop the trial as soon as it sees
    the last step, and the trainer still has its metrics.json and event files
    to write.
    """

    def __init__(self, objective: Objective, config: Config, resumed_from: int,
                 report: Callable[[dict, Optional[Path]], None],
                 crash_once_at_step: Optional[int] = None, marker_dir: Optional[Path] = None):
        self.objective = objective
        self.checkpoint_every = config.run.checkpoint_every
        self.resumed_from = resumed_from
        self._report = report
        self.crash_once_at_step = crash_once_at_step
        self.marker_dir = marker_dir
        self.pending_metrics: Optional[tuple[int, dict]] = None
        self.pending_checkpoint: Optional[tuple[int, Path]] = None
        self.final: Optional[tuple[int, dict, Path]] = None

    def on_evaluation(self, step: int, metrics: dict) -> None:
        if self.pending_checkpoint and self.pending_checkpoint[0] == step:
            _, path = self.pending_checkpoint
            self.pending_checkpoint = None
            self.final = (step, metrics, path)
        elif step % self.checkpoint_every == 0:
            self.pending_metrics = (step, metrics)
        else:
            self._emit(step, metrics, None, final=False)

    def on_checkpoint(self, step: int, path: Path) -> None:
        text = json.dumps({"step": step})
        atomic_write(Path(path).parent / STEP_FILE, lambda handle: handle.write(text), binary=False)
        if self.pending_metrics and self.pending_metrics[0] == step:
            _, metrics = self.pending_metrics
            self.pending_metrics = None
            self._emit(step, metrics, Path(path), final=False)
        else:
            self.pending_checkpoint = (step, Path(path))

    def finish(self) -> None:
        if self.final is None:
            raise RuntimeError("the trainer returned without its final checkpoint and evaluation")
        step, metrics, path = self.final
        self.final = None
        self._emit(step, metrics, path, final=True)

    def _emit(self, step: int, metrics: dict, checkpoint: Optional[Path], final: bool) -> None:
        result = {k: float(v) for k, v in metrics.items()}
        result |= self.objective.assess(result)
        result |= {"step": step, "final": final, "resumed_from_step": self.resumed_from}
        self._report(result, checkpoint)
        if checkpoint is not None:
            self._maybe_crash(step)

    def _maybe_crash(self, step: int) -> None:
        if self.crash_once_at_step is None or step < self.crash_once_at_step:
            return
        marker = self.marker_dir / CRASH_MARKER
        if marker.exists():
            return
        marker.write_text(str(step))
        raise RuntimeError(f"fault_injection.crash_once_at_step: crashing once after the checkpoint "
                           f"at step {step}")


def tune_report(result: dict, checkpoint: Optional[Path]) -> None:
    import ray.tune

    if checkpoint is None:
        ray.tune.report(result)
    else:
        ray.tune.report(result, checkpoint=ray.tune.Checkpoint.from_directory(str(checkpoint.parent)))


def restore_checkpoint(run_dir: Path) -> int:
    """Put Tune's latest checkpoint of this trial where the trainer resumes
    from; returns its step, or 0 for a fresh start (which also clears a
    checkpoint an earlier attempt wrote but never reported)."""
    import ray.tune

    target = checkpoint_path(run_dir)
    checkpoint = ray.tune.get_checkpoint()
    if checkpoint is None:
        if target.exists():
            target.unlink()
        return 0
    target.parent.mkdir(parents=True, exist_ok=True)
    with checkpoint.as_directory() as folder:
        source = Path(folder)
        if source.resolve() != target.parent.resolve():
            with open(source / target.name, "rb") as restored:
                atomic_write(target, lambda handle: shutil.copyfileobj(restored, handle))
        step = json.loads((source / STEP_FILE).read_text())["step"]
    log.info("trial resumes from its checkpoint at step %d", step)
    return int(step)


def run_trial(params: dict, setup: TrialSetup) -> None:
    """The Tune function trainable."""
    import ray.tune

    from daae.train import Hooks, train

    spec = setup.spec
    config = spec.trainer_config(trial_params(params)[0])
    run_dir = setup.run_dir(ray.tune.get_context().get_trial_id(), params)
    run_dir.mkdir(parents=True, exist_ok=True)
    resumed_from = restore_checkpoint(run_dir)
    reporter = Reporter(spec.objective, config, resumed_from, tune_report,
                        spec.file.fault_injection.crash_once_at_step, run_dir)
    if spec.file.resources.num_workers > 1:
        from .distributed import train_distributed

        train_distributed(config, run_dir, resumed_from > 0, reporter, spec.file.resources,
                          run_dir_shared=setup.experiment_dir is not None)
        return
    hooks = Hooks(on_evaluation=reporter.on_evaluation, on_checkpoint=reporter.on_checkpoint)
    if resumed_from:
        train(config, resume=run_dir, hooks=hooks)
    else:
        train(config, run_dir=run_dir, hooks=hooks)
    reporter.finish()
