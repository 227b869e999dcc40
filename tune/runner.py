"""Start, resume and finish a search: Ray, the Tuner, and the checks that
must pass before any trial starts."""
from __future__ import annotations

import logging
import os
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import ray
from ray import tune
from ray.tune.logger import TBXLoggerCallback
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.basic_variant import BasicVariantGenerator

from daae.schema import load_yaml_text

from .space import SearchError
from .spec import ARM_KEY, SAMPLE_KEY, SEARCH_FILE, SEED_KEY, SearchSpec, parse_search
from .storage import exists, is_remote, names, read_bytes, read_text, write_bytes, write_text
from .trial import TrialSetup, run_trial, trial_dirname

log = logging.getLogger(__name__)

# The search as it started, beside the search.yaml a user may edit before a
# resume. Where the folder lies is taken from the path resumed from.
STARTED_FILE = ".search_started.yaml"
RESUME_IGNORES = ("storage_path", "name")

# A trial that only drives distributed workers needs next to no CPU itself;
# Tune insists on some resource for every trial.
DRIVER_CPU = 0.01


@dataclass
class Outcome:
    experiment_path: str
    complete: bool
    files: dict[str, str] = field(default_factory=dict)
    rows: list = field(default_factory=list)


# ------------------------------------------------------------------------------ ray

def ensure_ray(address: Optional[str] = None) -> bool:
    """Connect to ``address`` (or $RAY_ADDRESS), else start Ray in-process.
    Returns whether this call started it (and so should shut it down)."""
    if ray.is_initialized():
        return False
    if address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=address)
    else:
        ray.init(include_dashboard=False)
    return True


def check_cluster(spec: SearchSpec) -> None:
    """Fail before any trial when the cluster can never place one."""
    r = spec.file.resources
    workers = r.num_workers
    bundle = {"CPU": r.cpu / workers, "GPU": r.gpu / workers}
    nodes = [node["Resources"] for node in ray.nodes() if node.get("Alive")]
    fits = [n for n in nodes if all(n.get(k, 0.0) >= v for k, v in bundle.items() if v)]
    totals = {k: sum(n.get(k, 0.0) for n in nodes) for k in ("CPU", "GPU")}
    what = (f"resources: a trial needs {r.cpu:g} CPU and {r.gpu:g} GPU"
            + (f" over {workers} workers" if workers > 1 else ""))
    have = f"the cluster has {totals['CPU']:g} CPU and {totals['GPU']:g} GPU"
    if not fits:
        raise SearchError(f"{what}, but no node can hold a "
                          f"{'worker' if workers > 1 else 'trial'} of {bundle}; {have}")
    if workers > 1 and (r.cpu + DRIVER_CPU > totals["CPU"] or r.gpu > totals["GPU"]):
        raise SearchError(f"{what}, more than {have}")


# ---------------------------------------------------------------------------- tuner

class NoTBXLogger(TBXLoggerCallback):
    """Stands in for Ray's TensorBoardX logger: each trial folder already holds
    the trainer's own event files, and results.write_hparams adds the hparams
    view, so Ray's duplicate ray/tune/* scalars would only clutter TensorBoard."""

    def __init__(self):
        pass

    def log_trial_start(self, trial):
        pass

    def log_trial_result(self, iteration, trial, result):
        pass

    def log_trial_end(self, trial, failed=False):
        pass


INTERRUPT_MARKER = ".fault_injection_interrupted"


class InterruptAfter(tune.Callback):
    """Test-only: SIGINT this driver once ``after_trials`` trials finished,
    which is what Ctrl+C does to an interactive search. Once per experiment
    (Tune pickles callbacks into its state, so a resumed search has it too)."""

    def __init__(self, after_trials: int, experiment_path: str):
        self.after_trials = after_trials
        self.marker = f"{experiment_path}/{INTERRUPT_MARKER}"
        self.finished = 0

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.finished += 1
        # Once per folder, wherever it has moved to since this callback was pickled.
        marker = (self.marker if is_remote(self.marker)
                  else f"{trial.storage.experiment_fs_path}/{INTERRUPT_MARKER}")
        if self.finished >= self.after_trials and not exists(marker):
            write_text(marker, "interrupted\n")
            log.warning("fault_injection.interrupt_after_trials: interrupting the search")
            os.kill(os.getpid(), signal.SIGINT)


def build_trainable(spec: SearchSpec, experiment_dir: Optional[str]):
    setup = TrialSetup(spec, experiment_dir)
    r = spec.file.resources
    if r.num_workers > 1:
        resources = {"cpu": DRIVER_CPU}
    else:
        resources = {"cpu": r.cpu, "gpu": r.gpu}
    return tune.with_resources(tune.with_parameters(run_trial, setup=setup), resources)


def param_space(spec: SearchSpec) -> dict:
    if spec.file.seeds:
        # Drawn here, once, and crossed with the seeds as a grid: Tune would
        # draw afresh for every seed of a grid over seeds alone.
        samples = [{"index": i, "values": values} for i, values in enumerate(spec.sampled_configs())]
        space = {SAMPLE_KEY: tune.grid_search(samples), SEED_KEY: tune.grid_search(list(spec.file.seeds))}
    else:
        space = {key: dist.to_tune() for key, dist in spec.space.items()}
    if spec.arms:
        space[ARM_KEY] = tune.grid_search(list(spec.arms))
    return space


def expected_trials(spec: SearchSpec) -> int:
    """Tune's count: every grid point (arms included) times num_samples, and
    with ``seeds`` that times the number of seeds."""
    count = spec.file.num_samples * max(len(spec.arms), 1) * len(spec.file.seeds or [0])
    for dist in spec.space.values():
        if dist.kind == "grid":
            count *= len(dist.args)
    return count


def _dirname(trial) -> str:
    return trial_dirname(trial.trial_id, trial.config)


def build_tuner(spec: SearchSpec):

    f = spec.file
    scheduler = None
    if f.scheduler.kind == "asha":
        scheduler = ASHAScheduler(time_attr="step", max_t=spec.asha_max_t(),
                                  grace_period=f.scheduler.grace_period,
                                  reduction_factor=f.scheduler.reduction_factor,
                                  brackets=f.scheduler.brackets)
    callbacks = [NoTBXLogger()]
    if f.fault_injection.interrupt_after_trials:
        callbacks.append(InterruptAfter(f.fault_injection.interrupt_after_trials,
                                        spec.experiment_path))
    tune_config = tune.TuneConfig(
        metric="score", mode="max", num_samples=1 if f.seeds else f.num_samples, scheduler=scheduler,
        # Tune ignores max_concurrent_trials with a search algorithm instance.
        search_alg=BasicVariantGenerator(random_state=f.seed,
                                         max_concurrent=f.max_concurrent_trials or 0),
        trial_dirname_creator=_dirname, trial_name_creator=_dirname)
    run_config = tune.RunConfig(
        name=f.name, storage_path=f.storage_path, callbacks=callbacks,
        failure_config=tune.FailureConfig(max_failures=f.max_failures),
        checkpoint_config=tune.CheckpointConfig(num_to_keep=f.keep_checkpoints),
        sync_config=tune.SyncConfig(sync_artifacts=is_remote(f.storage_path)),
        verbose=1)
    experiment_dir = None if is_remote(f.storage_path) else spec.experiment_path
    return tune.Tuner(build_trainable(spec, experiment_dir), param_space=param_space(spec),
                      tune_config=tune_config, run_config=run_config)


# --------------------------------------------------------------------------- search

def _finish(spec: SearchSpec, grid) -> Outcome:
    from .results import write_outputs

    path = spec.experiment_path
    # Judged on the state saved on disk, which is what a resume continues:
    # after an interrupt, trials that were still running are unfinished there,
    # though Tune has already stopped them in memory. Trials held back by
    # max_concurrent_trials do not exist yet at all, hence the expected count.
    saved = tune.ExperimentAnalysis(path).trials
    done = sum(t.status in ("TERMINATED", "ERROR") for t in saved)
    expected = expected_trials(spec)
    if done < expected:
        log.warning("the search stopped with %d of %d trials done; continue it with "
                    "`daae tune --resume %s`", done, expected, path)
        return Outcome(path, complete=False)
    files, rows = write_outputs(spec, grid)
    return Outcome(path, complete=True, files=files, rows=rows)


def run_search(spec: SearchSpec, *, address: Optional[str] = None,
               check_resources: bool = True) -> Outcome:
    path = spec.experiment_path
    if exists(f"{path}/{SEARCH_FILE}"):
        raise SearchError(f"the experiment folder {path} already holds a search: continue it with "
                          f"`daae tune --resume {path}`, or set name=... or storage_path=...")
    started = ensure_ray(address)
    try:
        if check_resources:
            check_cluster(spec)
        text = spec.to_yaml()
        write_text(f"{path}/{SEARCH_FILE}", text)
        write_text(f"{path}/{STARTED_FILE}", text)
        log.info("search %s: results in %s", spec.name, path)
        grid = build_tuner(spec).fit()
        return _finish(spec, grid)
    finally:
        if started:
            ray.shutdown()


def load_experiment(path: str) -> SearchSpec:
    path = path.rstrip("/")
    if not is_remote(path):
        path = str(Path(path).expanduser().resolve())
    if not exists(f"{path}/{SEARCH_FILE}"):
        raise SearchError(f"{path} is not a daae search folder: it has no {SEARCH_FILE} "
                          f"(pass storage_path/name of a search)")
    saved = _read_saved(path, SEARCH_FILE, f"put it back as it was ({STARTED_FILE} beside it, where "
                                          f"there is one, holds the search as it started)")
    if isinstance(saved, dict) and exists(f"{path}/{STARTED_FILE}"):  # older searches have none
        _check_unchanged(path, saved, _read_saved(path, STARTED_FILE,
                                                  "delete it to resume without this check"))
    spec = parse_search(saved, source=None)
    # The folder may have moved since the search started.
    spec.file.storage_path, spec.file.name = path.rsplit("/", 1)
    return spec


def _read_saved(path: str, name: str, fix: str):
    import yaml

    try:
        return load_yaml_text(read_text(f"{path}/{name}"), f"{path}/{name}")
    except yaml.YAMLError as exc:
        raise SearchError(f"{path}/{name} is not valid YAML ({exc}); {fix}") from None


def _check_unchanged(path: str, saved: dict, started: dict) -> None:
    """Tune restores the trials it has drawn, with their resources and its
    run settings, from its own state: a search.yaml edited since would build
    some trial's config from other values than it was drawn with (an arm gone
    fails on every try, forever under ``max_failures: -1``), be half applied
    (a trial's distributed workers) or be ignored."""
    if not isinstance(started, dict):
        raise SearchError(f"{path}/{STARTED_FILE} should hold the search as it started, as daae "
                          f"wrote it; delete it to resume without this check")
    changed = sorted(key for key in {*saved, *started} - set(RESUME_IGNORES)
                     if saved.get(key) != started.get(key))
    if changed:
        raise SearchError(
            f"{path}/{SEARCH_FILE} has changed since the search started: {', '.join(changed)}. A "
            f"resume continues the search as it started (Tune keeps its trials, their resources "
            f"and its settings): put those keys back as in {path}/{STARTED_FILE}, or start a new "
            f"search")


# What Tune's BasicVariantGenerator saves its state as (cloudpickle, despite the name).
SEARCHER_STATE = "basic-variant-state-*.json"


def _repoint_searcher(path: str) -> None:
    """Tune points the trials it restores at the folder resumed from, but the
    trials its searcher has still to create (held back by max_concurrent_trials)
    take the storage saved in the searcher's state: after a move each would
    fail to set up storage at the old place. The state is pointed at ``path``,
    as Tune's TuneController._restore_trials does for its trials."""
    import ray.cloudpickle as cloudpickle
    from ray.train._internal.storage import get_fs_and_path

    storage_path, name = path.rsplit("/", 1)
    fs, fs_path = get_fs_and_path(storage_path)
    fs_path = Path(fs_path).as_posix()
    for state_name in names(path, SEARCHER_STATE):
        state_file = f"{path}/{state_name}"
        state = cloudpickle.loads(read_bytes(state_file))
        try:
            storages = [iterator.unresolved_spec["storage"] for iterator in state["_iterators"]]
            moved = [s for s in storages if (s.storage_fs_path, s.experiment_dir_name) != (fs_path, name)]
        except (AttributeError, KeyError, TypeError):
            # A warning, not a refusal: a search that has not moved resumes as Tune restores it.
            log.warning("%s: this Ray saves its searcher's state in a form daae does not know, so "
                        "it cannot be pointed at %s; if the search has moved since it started, "
                        "trials it has still to create will fail: resume it from where it was "
                        "started", state_file, path)
            continue
        if moved:
            for storage in moved:
                storage.storage_filesystem, storage.storage_fs_path = fs, fs_path
                storage.experiment_dir_name = name
            write_bytes(state_file, cloudpickle.dumps(state))
            log.info("the search moved: its searcher's saved state now points at %s", path)


def resume_search(path: str, *, address: Optional[str] = None) -> Outcome:
    """Continue an interrupted search: unfinished and errored trials resume
    from their last checkpoints, finished ones are kept as they are."""
    spec = load_experiment(path)
    started = ensure_ray(address)
    try:
        if not tune.Tuner.can_restore(spec.experiment_path):
            raise SearchError(f"{spec.experiment_path} holds no Tune experiment state to resume "
                              f"(did the search start any trial?)")
        _repoint_searcher(spec.experiment_path)
        experiment_dir = None if is_remote(spec.experiment_path) else spec.experiment_path
        tuner = tune.Tuner.restore(spec.experiment_path,
                                   trainable=build_trainable(spec, experiment_dir),
                                   resume_unfinished=True, resume_errored=True)
        return _finish(spec, tuner.fit())
    finally:
        if started:
            ray.shutdown()
