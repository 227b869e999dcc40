"""`daae summary`: mean ± std over finished runs (one per seed) of the figures a
results table reports, read from each run's metrics.json.

    daae summary runs/p100/on_s0 runs/p100/on_s1 runs/p100/on_s2 [--label "on"] [--json]

Test figures are read only to report: selection happens on validation. The
mean ± std and the Markdown table are also what a search's arms.md is made of.

With ``--at STEP ...`` or ``--between FIRST LAST`` it reads the validation
figures that training wrote to TensorBoard at its evaluations instead, so runs
can be compared at the same step, finished or not:

    daae summary runs/p100/s0 runs/p100/s1 runs/p100/s2 --at 25000 40000
    daae summary runs/p100/s0 runs/p100/s1 runs/p100/s2 --between 25500 30000
"""
from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Callable

from .config import CLASS_MAPPED_METRICS, ConfigError
from .runs import METRICS_FILE, RESUMES_FILE, read_resumes

# Metrics that runs written before they existed lack (or hold as null): their column reads "–".
OPTIONAL = {"adversary_floor", "run_train_seconds", *CLASS_MAPPED_METRICS}
# Columns of the Markdown tables left out when no run has them (only with
# eval.class_whitened_probes or eval.class_gaussianized_probes), "–" when some
# runs lack them; the JSON keeps them.
SHOWN_WHEN_REPORTED = set(CLASS_MAPPED_METRICS)
# (column, split, metric, scale, decimals); scale "error" reports 100 - 100 * accuracy;
# decimals None: whole numbers when every value is one, else one decimal.
COLUMNS = (
    ("test error %", "test", "accuracy", "error", 2),
    ("adversary %", "test", "adversary_accuracy", 100.0, 2),
    ("adversary floor %", "test", "adversary_floor", 100.0, 2),
    ("probe %", "test", "probe_accuracy", 100.0, 2),
    ("linear probe %", "test", "linear_probe_accuracy", 100.0, 2),
    ("class-whitened probe %", "test", "class_whitened_probe_accuracy", 100.0, 2),
    ("class-whitened linear probe %", "test", "class_whitened_linear_probe_accuracy", 100.0, 2),
    ("class-Gaussianized probe %", "test", "class_gaussianized_probe_accuracy", 100.0, 2),
    ("class-Gaussianized linear probe %", "test", "class_gaussianized_linear_probe_accuracy", 100.0, 2),
    ("recon mse", "test", "recon_mse", 1.0, 4),
    ("validation accuracy %", "validation", "accuracy", 100.0, 2),
    ("epochs", None, "epoch", 1.0, None),
    ("training s", None, "train_seconds", 1.0, 0),
    # the run's whole training time across the stretches it was resumed through
    ("run training s", None, "run_train_seconds", 1.0, 0),
)


def mean_std(values) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1); no spread for a single value."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def markdown_table(rows: list[dict], formatter: Callable[[str, object], str]) -> str:
    """A Markdown table with the first row's keys as its header."""
    header = list(rows[0])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(formatter(k, row[k]) for k in header) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _read_metrics(run_dir: Path) -> dict:
    path = run_dir / METRICS_FILE
    if not path.is_file():
        raise ConfigError(f"{path} not found: {run_dir} is not a finished `daae train` run "
                          f"(metrics.json is written at the end of training)")
    again = _write_again(run_dir)
    try:
        metrics = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path} is not valid JSON ({exc}): {again}") from None
    if not isinstance(metrics, dict):
        raise ConfigError(f"{path} holds a {type(metrics).__name__}, not the mapping of metrics "
                          f"daae train writes: {again}")
    entries = read_resumes(run_dir, f"restore it, or move it aside to summarize {run_dir} "
                                    f"without the check that it is not still resuming")
    if entries and _still_resuming(path, metrics, entries, again):
        raise ConfigError(f"{run_dir} was resumed at step {entries[-1]['step']} and has not finished "
                          f"since: its metrics.json is from step {metrics.get('step')}. Wait for it, "
                          f"or read its evaluations so far with --at STEP or --between FIRST LAST")
    return metrics


def _write_again(run_dir: Path) -> str:
    # Only training writes metrics.json (daae eval prints its figures), so a
    # damaged one comes back only by training the last stretch again.
    return f"resume the run to write it again (daae train --resume {run_dir}), or leave {run_dir} out"


def _still_resuming(path: Path, metrics: dict, entries: list[dict], again: str) -> bool:
    """Whether metrics.json predates the run's last resume: a resume writes
    resumes.yaml as it starts, metrics.json only as it ends."""
    counted = metrics.get("resumes")
    if isinstance(counted, int):  # how many resumes the run had when it wrote metrics.json
        return counted < len(entries)
    # A metrics.json from before that count: file times, which a copy may reset.
    if not isinstance(metrics.get("step"), int):
        raise ConfigError(f"{path} has no step, which daae train writes: {again}")
    return (entries[-1]["step"] >= metrics["step"]
            and (path.parent / RESUMES_FILE).stat().st_mtime_ns > path.stat().st_mtime_ns)


def _value(metrics: dict, split, name, scale, path) -> float | None:
    """The column's value of one run; None for an OPTIONAL metric it lacks."""
    source = metrics if split is None else metrics.get(split)
    if source is not None and not isinstance(source, dict):
        raise ConfigError(f"{path}: its {split} holds a {type(source).__name__}, not the mapping of "
                          f"metrics daae train writes: {_write_again(path.parent)}")
    if name in OPTIONAL and (source is None or source.get(name) is None):
        return None
    if source is None or name not in source:
        where = f"{split}/{name}" if split else name
        fix = ""
        if split == "test":
            at = f"--at {metrics['step']}" if isinstance(metrics.get("step"), int) else "--at STEP"
            fix = (f" (the run had eval.final_test=false): read its test figures with daae eval "
                   f"--checkpoint {path.parent} --split test, or compare the runs on validation "
                   f"with daae summary RUN ... {at}")
        raise ConfigError(f"{path} has no {where}{fix}")
    value = source[name]
    return 100.0 * (1.0 - value) if scale == "error" else scale * value


def _check_run_dirs(run_dirs) -> None:
    if not run_dirs:
        raise ConfigError("daae summary needs at least one run folder")
    seen = {}
    for run_dir in run_dirs:
        folder = Path(run_dir).resolve()
        if folder in seen:
            raise ConfigError(f"{seen[folder]} and {run_dir} are the same run folder, which would count "
                              f"as two runs: name each run once")
        seen[folder] = run_dir


def summarize(run_dirs) -> dict:
    """{"runs": n, column: {"mean", "std", "values"}}; std is the sample std (0 for one run)."""
    _check_run_dirs(run_dirs)
    rows = [(Path(d), _read_metrics(Path(d))) for d in run_dirs]
    summary = {"runs": len(rows)}
    for column, split, name, scale, _ in COLUMNS:
        values = [_value(m, split, name, scale, d / METRICS_FILE) for d, m in rows]
        summary[column] = _column_stats(values)
    return summary


def _column_stats(values) -> dict:
    """{"mean", "std", "values"} over the runs; no mean or std when a run lacks the
    figure (its value None)."""
    if None in values:
        return {"mean": None, "std": None, "values": values}
    mean, std = mean_std(values)
    return {"mean": mean, "std": std, "values": values}


# The selection split's figures that training writes at each evaluation (`run.eval_every`):
# (column, metric, required). The probes are there only with
# eval.probes_during_training, so runs without them read "–".
VALIDATION_COLUMNS = (
    ("validation accuracy %", "accuracy", True),
    ("validation adversary %", "adversary_accuracy", True),
    ("validation MLP probe %", "probe_accuracy", False),
    ("validation linear probe %", "linear_probe_accuracy", False),
    ("validation class-whitened MLP probe %", "class_whitened_probe_accuracy", False),
    ("validation class-whitened linear probe %", "class_whitened_linear_probe_accuracy", False),
    ("validation class-Gaussianized MLP probe %", "class_gaussianized_probe_accuracy", False),
    ("validation class-Gaussianized linear probe %", "class_gaussianized_linear_probe_accuracy", False),
)


def _shown(summaries: list[dict], columns: list[tuple[str, str]]) -> set[str]:
    """Of ``columns`` ((column, metric) pairs), those a Markdown table shows."""
    return {column for column, metric in columns
            if metric not in SHOWN_WHEN_REPORTED
            or any(value is not None for summary in summaries for value in summary[column]["values"])}


def _run_series(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """{metric: [(step, value), ...]} of the run's validation evaluations."""
    from .curves import read_scalars
    from .evaluate import tensorboard_tags

    # The trainer's own metric-to-tag mapping, turned around: {tag: metric}.
    metrics = tensorboard_tags("val", {metric: metric for _, metric, _ in VALIDATION_COLUMNS})
    if not run_dir.is_dir() or not any(run_dir.rglob("events.out.tfevents.*")):
        raise ConfigError(f"{run_dir}: no TensorBoard event files (not a `daae train` run folder)")
    try:
        runs = read_scalars(run_dir, list(metrics))
    except ConfigError:  # its message names daae curves' flags
        raise ConfigError(f"{run_dir}: never evaluated yet (run.eval_every sets how often)") from None
    if len(runs) != 1:
        raise ConfigError(f"{run_dir} holds the events of {len(runs)} runs ({', '.join(runs)}): "
                          f"name each run folder")
    return {metrics[tag]: points for tag, points in next(iter(runs.values())).items()}


def _window_mean(series, first: int, last: int) -> tuple[float, int] | None:
    """100 × the mean of the values at steps first..last, and how many there were."""
    values = [value for step, value in series if first <= step <= last]
    return (100.0 * statistics.fmean(values), len(values)) if values else None


def summarize_steps(run_dirs, windows) -> list[dict]:
    """For each window, a step (``--at``) or a (first, last) pair (``--between``),
    each run's mean of its validation evaluations at steps first..last (the one
    step of an ``--at``), then mean ± std over the runs: {"runs", "first_step",
    "last_step", "evaluations" (per run), column: {"mean", "std", "values"}}.
    Each run's events are read once."""
    _check_run_dirs(run_dirs)
    # A bad window is named by the flag it came with: `--between -5 -5` is not an --at.
    for window in windows:
        if isinstance(window, int):
            if window < 0:
                raise ConfigError(f"--at {window}: expected a step >= 0")
        elif not 0 <= window[0] <= window[1]:
            raise ConfigError(f"--between {window[0]} {window[1]}: expected 0 <= FIRST <= LAST")
    windows = [(window, window) if isinstance(window, int) else tuple(window) for window in windows]
    runs = [(Path(run_dir), _run_series(Path(run_dir))) for run_dir in run_dirs]
    summaries = []
    for first, last in windows:
        where = f"step {first}" if first == last else f"steps {first}-{last}"
        summary = {"runs": len(runs), "first_step": first, "last_step": last}
        for column, metric, required in VALIDATION_COLUMNS:
            found = [_window_mean(series.get(metric, []), first, last) for _, series in runs]
            for (run_dir, series), read in zip(runs, found):
                if read is None and required:
                    steps = [step for step, _ in series.get(metric, [])]
                    span = (f"evaluated at steps {steps[0]}-{steps[-1]}" if steps
                            else "never evaluated")
                    raise ConfigError(f"{run_dir}: no validation evaluation at {where} ({span}; "
                                      f"run.eval_every sets how often)")
            counts = [0 if read is None else read[1] for read in found]
            if metric == "accuracy":
                summary["evaluations"] = counts
            # A column may rest on fewer evaluations than the accuracy (the probes
            # only at the final evaluations of runs without probes during training).
            summary[column] = {**_column_stats([None if read is None else read[0] for read in found]),
                               "evaluations": counts}
        summaries.append(summary)
    return summaries


def markdown_steps(summaries: list[dict], label: str) -> str:
    """One table row per window: mean ± std (each run's value)."""
    def cell(stats, evaluations):
        if stats["mean"] is None:
            return "–"
        each = " / ".join(f"{value:.2f}" for value in stats["values"])
        text = _cell(stats, 2) + (f" ({each})" if len(stats["values"]) > 1 else "")
        if stats["evaluations"] != evaluations:
            text += (f" [at {'/'.join(map(str, stats['evaluations']))} of "
                     f"{'/'.join(map(str, evaluations))} evaluations]")
        return text

    shown = _shown(summaries, [(column, metric) for column, metric, _ in VALIDATION_COLUMNS])
    rows = []
    for summary in summaries:
        first, last = summary["first_step"], summary["last_step"]
        rows.append({"runs": label, "n": str(summary["runs"]),
                     "steps": str(first) if first == last else f"{first}-{last}",
                     **{column: cell(summary[column], summary["evaluations"])
                        for column, *_ in VALIDATION_COLUMNS if column in shown}})
    return markdown_table(rows, lambda key, value: value)


def _cell(stats: dict, decimals) -> str:
    if stats["mean"] is None or math.isnan(stats["mean"]):
        return "–"
    if decimals is None:
        decimals = 0 if all(float(v).is_integer() for v in stats["values"]) else 1
    if len(stats["values"]) == 1:  # one run has no spread to report
        return f"{stats['mean']:.{decimals}f}"
    return f"{stats['mean']:.{decimals}f} ± {stats['std']:.{decimals}f}"


def markdown(summary: dict, label: str) -> str:
    shown = _shown([summary], [(column, metric) for column, _, metric, *_ in COLUMNS])
    row = {"runs": label, "n": str(summary["runs"]),
           **{column: _cell(summary[column], decimals) for column, *_, decimals in COLUMNS
              if column in shown}}
    return markdown_table([row], lambda key, value: value)
