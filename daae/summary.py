"""`daae summary`: mean ± std over finished runs (one per seed) of the figures a
results table reports, read from each run's metrics.json.

    daae summary runs/p100/on_s0 runs/p100/on_s1 runs/p100/on_s2 [--label "on"] [--json]

Test figures are read only to report: selection happens on validation.
"""
from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

from .config import ConfigError
from .runs import METRICS_FILE

# (column, split, metric, scale): percentages for accuracies, error = 100 - accuracy.
COLUMNS = (
    ("test error %", "test", "accuracy", "error"),
    ("adversary %", "test", "adversary_accuracy", 100.0),
    ("probe %", "test", "probe_accuracy", 100.0),
    ("linear probe %", "test", "linear_probe_accuracy", 100.0),
    ("recon mse", "test", "recon_mse", 1.0),
    ("validation accuracy %", "validation", "accuracy", 100.0),
    ("epochs", None, "epoch", 1.0),
    ("training s", None, "train_seconds", 1.0),
)


def _read_metrics(run_dir: Path) -> dict:
    path = run_dir / METRICS_FILE
    if not path.is_file():
        raise ConfigError(f"{path} not found: {run_dir} is not a finished `daae train` run "
                          f"(metrics.json is written at the end of training)")
    return json.loads(path.read_text())


def _value(metrics: dict, split, name, scale, path) -> float:
    source = metrics if split is None else metrics.get(split)
    if source is None or name not in source:
        where = f"{split}/{name}" if split else name
        fix = " (the run had eval.final_test=false)" if split == "test" else ""
        raise ConfigError(f"{path} has no {where}{fix}")
    value = source[name]
    return 100.0 * (1.0 - value) if scale == "error" else scale * value


def summarize(run_dirs) -> dict:
    """{"runs": n, column: {"mean", "std", "values"}}; std is the sample std (0 for one run)."""
    if not run_dirs:
        raise ConfigError("daae summary needs at least one run folder")
    rows = [(Path(d), _read_metrics(Path(d))) for d in run_dirs]
    summary = {"runs": len(rows)}
    for column, split, name, scale in COLUMNS:
        values = [_value(m, split, name, scale, d / METRICS_FILE) for d, m in rows]
        summary[column] = {"mean": statistics.fmean(values),
                           "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                           "values": values}
    return summary


def _cell(column: str, stats: dict) -> str:
    digits = 4 if column == "recon mse" else 0 if column == "training s" else 2
    if column == "epochs":
        digits = 0 if all(float(v).is_integer() for v in stats["values"]) else 1
    if math.isnan(stats["mean"]):
        return "–"
    if len(stats["values"]) == 1:  # one run has no spread to report
        return f"{stats['mean']:.{digits}f}"
    return f"{stats['mean']:.{digits}f} ± {stats['std']:.{digits}f}"


def markdown(summary: dict, label: str) -> str:
    header = ["runs", "n", *(column for column, *_ in COLUMNS)]
    row = [label, str(summary["runs"]), *(_cell(column, summary[column]) for column, *_ in COLUMNS)]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header), "| " + " | ".join(row) + " |"]
    return "\n".join(lines)
