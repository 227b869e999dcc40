"""A trial that needs several workers (GPUs): a ``ray.train.torch.TorchTrainer``
whose workers each run ``train(config)``; Accelerate inside picks up the
process group Ray Train sets up.

The trainer calls its hooks on the main process only, but Ray Train's
``ray.train.report`` is collective (every worker must call it). So rank 0
sends its evaluations and checkpoint bytes through a Ray queue to this trial's
function, which reports them to Tune like a single-process trial; the
checkpoint travels as bytes because the workers may sit on other nodes than
the trial function, and so, at each evaluation and when training stops, do
the run folder's other files (TensorBoard events, images, metrics), which Tune
uploads from the trial function's node only.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import threading
import uuid
from pathlib import Path

from daae.atomic import atomic_write
from daae.checkpoint import checkpoint_path
from daae.config import Config, from_dict, to_dict
from daae.train import LOCK_FILE

from .spec import Resources
from .trial import Reporter

INNER_RUN_PREFIX = "workers-"  # Ray Train's folder for the inner trainer, inside the run folder
_NOT_SHIPPED = ("checkpoints", LOCK_FILE)


def scaling_config(resources: Resources):
    from ray.train import ScalingConfig

    workers = resources.num_workers
    per_worker = {"CPU": resources.cpu / workers}
    if resources.gpu:
        per_worker["GPU"] = resources.gpu / workers
    # Every worker on one node (NCCL within a machine). That node need not be
    # the trial function's: rank 0 then ships the run folder to it (RunFolderShipper).
    return ScalingConfig(num_workers=workers, use_gpu=resources.gpu > 0,
                         resources_per_worker=per_worker, placement_strategy="STRICT_PACK")


def build_trainer(config: Config, run_dir: Path, resume_bytes, channel, resources: Resources,
                  storage_path: str, driver_node: str | None = None):
    """``driver_node``: the Ray node of the trial function, which rank 0 sends
    the run folder to when it trains elsewhere; None: never (a shared run folder)."""
    from ray.train import FailureConfig, RunConfig
    from ray.train.torch import TorchTrainer

    loop_config = {"config": to_dict(config), "run_dir": str(run_dir),
                   "resume": resume_bytes, "channel": channel, "driver_node": driver_node}
    # Tune retries the whole trial from its own checkpoint; a second retry
    # layer inside Ray Train would resume from a checkpoint Tune never saw.
    run_config = RunConfig(name=f"{INNER_RUN_PREFIX}{uuid.uuid4().hex[:8]}",
                           storage_path=storage_path, failure_config=FailureConfig(max_failures=0))
    return TorchTrainer(worker_loop, train_loop_config=loop_config,
                        scaling_config=scaling_config(resources), run_config=run_config)


def worker_loop(loop_config: dict) -> None:
    """What each Ray Train worker runs."""
    import ray.train
    import torch

    from daae.train import Hooks, train

    if not torch.cuda.is_available():
        # Accelerate treats a multi-process CPU run as distributed only when told so.
        os.environ["ACCELERATE_USE_CPU"] = "true"
    config = from_dict(loop_config["config"])
    run_dir = Path(loop_config["run_dir"])
    channel = loop_config["channel"]
    resume = loop_config["resume"]
    if resume is not None:
        # Every rank loads the checkpoint, and ranks may sit on different nodes.
        atomic_write(checkpoint_path(run_dir), lambda handle: handle.write(resume))
    hooks = Hooks()
    shipper = None
    if ray.train.get_context().get_world_rank() == 0:
        if loop_config["driver_node"] not in (None, _node_id()):
            shipper = RunFolderShipper(run_dir, channel)

        def on_evaluation(step, metrics):
            # The files first: Tune uploads the trial folder at reports, and a
            # trial ASHA stops never reaches the end of train().
            if shipper:
                shipper.ship()
            channel.put(("evaluation", step, metrics))

        hooks = Hooks(on_evaluation=on_evaluation, on_checkpoint=lambda step, path: channel.put(
            ("checkpoint", step, Path(path).read_bytes())))
    try:
        if resume is not None:
            train(config, resume=run_dir, hooks=hooks)
        else:
            train(config, run_dir=run_dir, hooks=hooks)
    finally:
        if shipper:
            shipper.ship()  # what came after the last evaluation: metrics.json, the closed events


def _node_id() -> str:
    import ray

    return ray.get_runtime_context().get_node_id()


class RunFolderShipper:
    """Rank 0's side when it trains on another node than the trial function:
    sends the run folder's files that changed since the last call."""

    def __init__(self, run_dir: Path, channel):
        self.run_dir, self.channel = Path(run_dir), channel
        self.sent: dict[str, tuple[int, int]] = {}

    def ship(self) -> None:
        changed = {}
        for relative, path in _run_folder_paths(self.run_dir):
            stat = path.stat()
            if self.sent.get(relative) != (stat.st_size, stat.st_mtime_ns):
                changed[relative] = path.read_bytes()
                self.sent[relative] = (stat.st_size, stat.st_mtime_ns)
        if changed:
            self.channel.put(("files", None, changed))


def _run_folder_paths(run_dir: Path):
    """What the trainer wrote into ``run_dir`` (config, metrics, TensorBoard
    events, images), by relative path; not the checkpoints, which travel on
    their own, nor Ray Train's state of the inner trainer."""
    for path in sorted(run_dir.rglob("*")):
        top = path.relative_to(run_dir).parts[0]
        if path.is_file() and top not in _NOT_SHIPPED and not top.startswith(INNER_RUN_PREFIX):
            yield str(path.relative_to(run_dir)), path


def write_run_folder_files(run_dir: Path, files: dict[str, bytes]) -> None:
    for relative, data in files.items():
        atomic_write(Path(run_dir) / relative, lambda handle, data=data: handle.write(data))


def train_distributed(config: Config, run_dir: Path, resume: bool, reporter: Reporter,
                      resources: Resources, run_dir_shared: bool) -> None:
    """Run the trial's workers and relay what rank 0 sends to ``reporter``.
    ``run_dir_shared``: the run folder is on storage every node sees (not a
    bucket), so rank 0 writes it in place wherever it runs; shipped copies
    would replace files its writers still append to."""
    from ray.util.queue import Empty, Queue

    resume_bytes = checkpoint_path(run_dir).read_bytes() if resume else None
    # No CPU of its own: it must fit beside this trial in the trial's tiny placement group.
    channel = Queue(actor_options={"num_cpus": 0})
    # Ray Train keeps its own run state inside the trial folder, out of the way.
    trainer = build_trainer(config, run_dir, resume_bytes, channel, resources, str(run_dir),
                            driver_node=None if run_dir_shared else _node_id())
    outcome: dict = {}

    def fit():
        try:
            trainer.fit()
        except BaseException as exc:  # re-raised in the trial's thread below
            outcome["error"] = exc

    # fit() blocks, and the reports must come from the trial's own thread.
    runner = threading.Thread(target=fit, name="torch-trainer", daemon=True)
    runner.start()
    staging = Path(tempfile.mkdtemp(prefix="daae-trial-")) / "checkpoints"
    staging.mkdir()
    try:
        while True:
            try:
                kind, step, payload = channel.get(timeout=1.0)
            except Empty:
                if runner.is_alive() or not channel.empty():
                    continue
                break
            if kind == "evaluation":
                reporter.on_evaluation(step, payload)
            elif kind == "files":
                # Rank 0 trains on another node and wrote its run folder there;
                # with a bucket Tune uploads this node's trial folder only (at
                # reports), so the files come here.
                write_run_folder_files(run_dir, payload)
            else:
                target = atomic_write(staging / "last.pt", lambda handle: handle.write(payload))
                reporter.on_checkpoint(step, target)
        runner.join()
        if "error" in outcome:
            raise outcome["error"]
        reporter.finish()
    finally:
        # Tune has copied every reported checkpoint into its storage by now.
        shutil.rmtree(staging.parent, ignore_errors=True)
