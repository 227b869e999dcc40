"""Checks of a parsed search (``tune.spec.parse_search`` runs them) before any
trial starts: each names the search-file key to fix."""
from __future__ import annotations

from daae.config import CLASS_MAP_KEYS, CLASS_MAP_METRICS
from daae.schema import ConfigError

from .objective import FINAL_ONLY_METRICS, RANKABLE_METRICS, TARGETABLE_METRICS, VALIDATION_METRICS
from .space import SearchError
from .spec import ARM_KEY, RESERVED_KEYS, SEED_KEY, Resources, SearchSpec


def _check_trainer_values(spec: SearchSpec) -> None:
    for key in [*spec.space, *(k for arm in spec.arms.values() for k in arm)]:
        if key in RESERVED_KEYS:
            raise SearchError(f"'{key}' cannot be searched: the search sets it for every trial")
        if key in CLASS_MAP_KEYS.values():
            # Reporting only, and a trial without it would drop a mapped target silently.
            raise SearchError(f"'{key}' cannot be searched: it changes what trials report, not how "
                              f"they train; set it under overrides")
    for key, dist in spec.space.items():
        for value in dist.candidates():
            try:
                spec.trainer_config({key: value})
            except ConfigError as exc:
                raise SearchError(f"space '{key}' value {value!r}: {exc}") from None
    for name in spec.arms or {}:
        try:
            spec.trainer_config({ARM_KEY: name})
        except ConfigError as exc:
            raise SearchError(f"arms '{name}': {exc}") from None
    # One combined sample too: keys can constrain each other.
    sample = {k: d.candidates()[0] for k, d in spec.space.items()}
    for name in spec.arms or [None]:
        try:
            spec.trainer_config({**sample, ARM_KEY: name})
        except ConfigError as exc:
            raise SearchError(f"space/arms combination {sample} (arm {name}): {exc}") from None


def validate(spec: SearchSpec) -> None:
    f = spec.file
    if not f.name or "/" in f.name or f.name.startswith("."):
        raise SearchError(f"name: '{f.name}' must be a plain folder name")
    for arm in spec.arms:
        # Each arm names its trials' folders (Ray refuses a '/'), and tells them apart.
        if not arm or "/" in arm:
            raise SearchError(f"arms: '{arm}' must be a non-empty name without '/' (it names each "
                              f"trial's folder); rename the arm")
    if f.num_samples < 1:
        raise SearchError(f"num_samples: must be at least 1, got {f.num_samples}")
    if f.metric not in VALIDATION_METRICS:
        raise SearchError(f"metric: nothing reports '{f.metric}'; the validation metrics are "
                          f"{', '.join(VALIDATION_METRICS)}")
    if f.metric not in RANKABLE_METRICS:
        raise SearchError(f"metric: '{f.metric}' is not bounded to [0, 1], so a trial that misses the "
                          f"target could outscore one that meets it; rank on one of "
                          f"{', '.join(RANKABLE_METRICS)}")
    if f.mode not in ("max", "min"):
        raise SearchError(f"mode: expected max or min, got '{f.mode}'")
    for name in f.target.metrics:
        if name not in TARGETABLE_METRICS:
            raise SearchError(f"target.metrics: '{name}' is not reported as a classifier accuracy; "
                              f"choose from {', '.join(TARGETABLE_METRICS)}")
    if not 0 <= f.target.tolerance <= 1:
        raise SearchError(f"target.tolerance: must be in [0, 1], got {f.target.tolerance}")
    if f.target.chance is not None and not 0 < f.target.chance < 1:
        raise SearchError(f"target.chance: must be in (0, 1), got {f.target.chance}")
    if f.max_failures < -1:
        raise SearchError("max_failures: must be -1 (retry forever), 0 or more")
    if f.keep_checkpoints < 1:
        raise SearchError("keep_checkpoints: must be at least 1 (trials resume from it)")
    if f.max_concurrent_trials is not None and f.max_concurrent_trials < 1:
        raise SearchError("max_concurrent_trials: must be at least 1, or null")
    if ARM_KEY in spec.space:
        raise SearchError(f"space: '{ARM_KEY}' is reserved for the arms mapping")
    if f.seeds is not None:
        _check_seeds(spec)
    _check_resources(f.resources)
    _check_trainer_values(spec)
    _check_schedule(spec)


def _check_seeds(spec: SearchSpec) -> None:
    seeds = spec.file.seeds
    if not seeds or len(set(seeds)) != len(seeds):
        raise SearchError(f"seeds: expected a list of distinct trainer seeds, got {seeds!r}")
    # Each trial's seed comes from `seeds`; another would be overwritten unseen.
    setting = [where for where, keys in [("space", spec.space), ("overrides", spec.file.overrides), *(
        (f"arms '{name}'", arm) for name, arm in (spec.arms or {}).items())] if SEED_KEY in keys]
    if setting:
        raise SearchError(f"seeds: {' and '.join(setting)} also set{'s' if len(setting) == 1 else ''} "
                          f"'{SEED_KEY}'; list the trainer seeds under seeds only")
    if spec.file.scheduler.kind != "none":
        raise SearchError("seeds: a configuration is ranked on all its seeds at their last step, and "
                          "ASHA would stop them one by one; set scheduler.kind: none, or drop seeds")
    for seed in seeds:
        try:
            spec.trainer_config({SEED_KEY: seed})
        except ConfigError as exc:
            raise SearchError(f"seeds: {seed!r}: {exc}") from None


def _check_resources(r: Resources) -> None:
    if r.cpu <= 0:
        raise SearchError(f"resources.cpu: must be positive, got {r.cpu}")
    if r.gpu < 0:
        raise SearchError(f"resources.gpu: must be 0 or more, got {r.gpu}")
    if r.gpu > 1 and r.gpu != int(r.gpu):
        raise SearchError(f"resources.gpu: {r.gpu} GPUs: more than one GPU per trial must be a whole "
                          f"number (one per distributed worker); fractions are for sharing one GPU")
    if r.workers is not None:
        if r.workers < 1:
            raise SearchError(f"resources.workers: must be at least 1, got {r.workers}")
        # Workers sharing a GPU would share one device too, which NCCL refuses.
        if r.gpu > 0 and (r.gpu > 1 or r.workers > 1) and r.workers != r.gpu:
            raise SearchError(f"resources.workers: {r.workers} workers for {r.gpu:g} GPUs; "
                              f"a distributed trial uses one whole GPU per worker (set "
                              f"resources.gpu={r.workers}, or gpu: 0 for CPU workers)")


def _check_schedule(spec: SearchSpec) -> None:
    f, s = spec.file, spec.file.scheduler
    config = spec.trainer_config({k: d.candidates()[0] for k, d in spec.space.items()})
    if config.run.checkpoint_every % config.run.eval_every:
        raise SearchError(
            f"run.checkpoint_every ({config.run.checkpoint_every}) must be a multiple of "
            f"run.eval_every ({config.run.eval_every}) in a search: each checkpoint is reported to "
            f"Tune with the evaluation at its step")
    if f.metric in FINAL_ONLY_METRICS and not config.eval.probes_during_training:
        raise SearchError(f"metric: '{f.metric}' is reported only when a trial ends; set "
                          f"overrides.eval.probes_during_training=true to rank on it")
    # Unreported, a target metric would silently drop out of the target.
    for where, name in [("metric", f.metric)] + [("target.metrics", m) for m in f.target.metrics]:
        for class_map, metrics in CLASS_MAP_METRICS.items():
            if name in metrics and class_map not in config.eval.class_maps():
                raise SearchError(f"{where}: '{name}' is reported only with the class-{class_map} "
                                  f"probes; set overrides.{CLASS_MAP_KEYS[class_map]}=true")
    if config.train.mixed_precision == "fp16" and f.resources.gpu == 0:
        raise SearchError("train.mixed_precision=fp16 needs a GPU but resources.gpu is 0")
    if s.kind not in ("asha", "none"):
        raise SearchError(f"scheduler.kind: expected asha or none, got '{s.kind}'")
    if s.kind == "none":
        return
    searched = [where for where, keys in [("space", spec.space), *(
        (f"arms '{name}'", arm) for name, arm in (spec.arms or {}).items())] if "train.max_steps" in keys]
    if s.max_t is None and searched:
        raise SearchError(f"scheduler.max_t: set it (in steps): {' and '.join(searched)} set "
                          f"train.max_steps, so ASHA cannot take its rungs' end from it")
    max_t = spec.asha_max_t()
    if s.max_t is not None:
        _check_lengths_fit(spec, s.max_t)
    if max_t is None:
        raise SearchError("scheduler.max_t: set it (in steps) or set train.max_steps, so ASHA "
                          "knows where its rungs end")
    if not 1 <= s.grace_period <= max_t:
        raise SearchError(f"scheduler.grace_period: must be in [1, max_t={max_t}], got {s.grace_period}")
    if s.reduction_factor <= 1:
        raise SearchError(f"scheduler.reduction_factor: must be above 1, got {s.reduction_factor}")
    if s.brackets < 1:
        raise SearchError(f"scheduler.brackets: must be at least 1, got {s.brackets}")
    if s.grace_period < config.run.eval_every:
        raise SearchError(f"scheduler.grace_period ({s.grace_period} steps) is shorter than "
                          f"run.eval_every ({config.run.eval_every}): ASHA would decide before the "
                          f"first evaluation")


def _check_lengths_fit(spec: SearchSpec, max_t: int) -> None:
    # ASHA stops a trial at max_t, before a longer trial's final evaluation:
    # it would never finish, and the search would have no best config.
    searched = spec.space.get("train.max_steps")
    lengths = {}
    for name in spec.arms or [None]:
        for value in searched.candidates() if searched else [None]:
            params = {ARM_KEY: name} if value is None else {ARM_KEY: name, "train.max_steps": value}
            steps = spec.trainer_config(params).train.max_steps
            # None: the length follows from the data (train.epochs); only Tune sees it.
            if steps is not None and steps > max_t:
                where = ("space 'train.max_steps'" if value is not None
                         else f"arms '{name}'" if name is not None and "train.max_steps" in spec.arms[name]
                         else "the base config and overrides")
                lengths.setdefault(steps, where)
    if lengths:
        longest = max(lengths)
        raise SearchError(f"scheduler.max_t ({max_t}) is below train.max_steps ({longest}, from "
                          f"{lengths[longest]}): ASHA would stop every such trial at step {max_t}, "
                          f"before its final evaluation, so none would finish; raise "
                          f"scheduler.max_t to {longest} or more, or lower train.max_steps")
