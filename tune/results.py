"""What a finished search leaves in its experiment folder: the ranked trial
table (CSV + Markdown), the per-arm mean ± std table of an ablation, the best
configuration as a ``daae train`` YAML, and a TensorBoard hparams summary in
every trial folder."""
from __future__ import annotations

import csv
import io
import logging
import math
from pathlib import Path
from typing import Any, Optional

import yaml

from daae.config import to_dict
from daae.evaluate import tensorboard_tags
from daae.summary import markdown_table, mean_std

from .objective import MAPPED_METRICS
from .spec import ARM_KEY, SEED_KEY, SearchSpec, trial_params
from .storage import is_remote, write_text

log = logging.getLogger(__name__)

TRIALS_CSV, TRIALS_MD = "trials.csv", "trials.md"
ARMS_CSV, ARMS_MD = "arms.csv", "arms.md"
CONFIGS_CSV, CONFIGS_MD = "configs.csv", "configs.md"
# A search with `seeds`: the index of a trial's sampled configuration.
CONFIG_COLUMN = "config"
BEST_CONFIG = "best_config.yaml"
METRIC_COLUMNS = ("score", "meets_target", "target_distance", "accuracy", "adversary_accuracy",
                  "adversary_floor", "probe_accuracy", "linear_probe_accuracy", *MAPPED_METRICS,
                  "labelled_accuracy", "cluster_accuracy", "recon_mse", "z_mean", "z_std",
                  "y_marginal_entropy", "step")
ARM_METRICS = ("accuracy", "adversary_accuracy", "adversary_floor", "probe_accuracy",
               "linear_probe_accuracy", *MAPPED_METRICS, "recon_mse")
PERCENT = ("accuracy", "adversary_accuracy", "adversary_floor", "probe_accuracy",
           "linear_probe_accuracy", *MAPPED_METRICS, "labelled_accuracy")


def collect(spec: SearchSpec, grid) -> list[dict]:
    """One row per trial, best first: finished trials by score, then trials
    that stopped early (ASHA; no final evaluation) deepest first, then failed
    ones. Scores of trials stopped at different steps are not comparable: a
    trial ASHA let run longer outranked its rivals at every rung before."""
    rows = []
    for result in grid:
        metrics = result.metrics or {}
        params, sample = trial_params(result.config or {})
        if result.error is not None:
            status = "error"
        elif metrics.get("final"):
            status = "finished"
        else:
            status = "stopped"
        row = {"trial": Path(str(result.path)).name, "status": status}
        if spec.arms:
            row[ARM_KEY] = params.get(ARM_KEY)
        if sample is not None:
            row |= {CONFIG_COLUMN: sample, SEED_KEY: params.get(SEED_KEY)}
        row |= {key: params.get(key) for key in spec.space}
        row |= {key: metrics.get(key) for key in METRIC_COLUMNS}
        row["_params"], row["_path"] = params, str(result.path)
        rows.append(row)
    order = {"finished": 0, "stopped": 1, "error": 2}

    def best_first(row):
        reached = row["step"] if row["status"] == "stopped" and row["step"] is not None else 0
        score = row["score"] if row["score"] is not None else -math.inf
        return order[row["status"]], -reached, -score

    rows.sort(key=best_first)
    for rank, row in enumerate(rows, 1):
        row["rank"] = rank
    return _without_unreported(rows, MAPPED_METRICS)


def _without_unreported(rows: list[dict], optional) -> list[dict]:
    """Drops the columns of ``optional`` that no row has a value for: the
    class-mapped probes exist only in searches that turned them on."""
    for key in [k for k in optional if all(row.get(k) is None for row in rows)]:
        for row in rows:
            row.pop(key, None)
    return rows


def _visible(row: dict) -> dict:
    return {"rank": row["rank"], **{k: v for k, v in row.items() if not k.startswith("_") and k != "rank"}}


def _format(key: str, value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}" if key not in METRIC_COLUMNS else f"{value:.4f}"
    return str(value)


def to_csv(rows: list[dict]) -> str:
    if not rows:
        return ""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def to_markdown(rows: list[dict], formatter=_format) -> str:
    return markdown_table(rows, formatter) if rows else "(no trials)\n"


# ------------------------------------------------------------------------------ arms

def _aggregate(row: dict, done: list[dict], out_of: int) -> dict:
    """Mean and sample standard deviation (n-1) of each of ARM_METRICS over
    ``done`` (finished trials), and how many of them meet the target, out of
    ``out_of`` trials."""
    for name in ARM_METRICS:
        values = [r[name] for r in done if r.get(name) is not None]
        row[f"{name}_mean"], row[f"{name}_std"] = mean_std(values) if values else (None, None)
    row["meets_target"] = f"{sum(bool(r['meets_target']) for r in done)}/{out_of}"
    return row


def _unreported_spreads(rows: list[dict]) -> list[dict]:
    return _without_unreported(rows, [f"{name}_{part}" for name in MAPPED_METRICS
                                      for part in ("mean", "std")])


def arm_rows(spec: SearchSpec, rows: list[dict]) -> list[dict]:
    """Mean and sample standard deviation (n-1) per arm over its finished
    trials (the seeds), one row per arm in the YAML's order."""
    out = []
    for arm in spec.arms:
        done = [r for r in rows if r.get(ARM_KEY) == arm and r["status"] == "finished"]
        out.append(_aggregate({"arm": arm, "n": len(done)}, done, len(done)))
    return _unreported_spreads(out)


def config_rows(spec: SearchSpec, rows: list[dict]) -> list[dict]:
    """A search with ``seeds``: one row per sampled configuration (and arm),
    best first. A configuration is judged on all its seeds: it meets the target
    only if every seed finished and meets it, and ranks on the mean score of
    its seeds, those that meet the target first. A configuration whose seeds
    did not all finish ranks after every one whose seeds did."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row.get(ARM_KEY), row[CONFIG_COLUMN]), []).append(row)
    out = []
    for (arm, index), members in groups.items():
        done = [r for r in members if r["status"] == "finished"]
        scores = [r["score"] for r in done if r["score"] is not None]
        complete = len(scores) == len(spec.file.seeds)
        row = {CONFIG_COLUMN: index, **({"arm": arm} if spec.arms else {}),
               **{key: members[0].get(key) for key in spec.space},
               "n": len(done), "score_mean": sum(scores) / len(scores) if scores else None,
               "meets_target_on_every_seed": complete and all(bool(r["meets_target"]) for r in done)}
        # Out of every listed seed: a seed that failed has not met the target.
        row = _aggregate(row, done, len(spec.file.seeds))
        row["_params"] = {k: v for k, v in done[0]["_params"].items() if k != SEED_KEY} if done else None
        row["_complete"] = complete
        out.append(row)
    out.sort(key=lambda r: (not r["_complete"], not r["meets_target_on_every_seed"],
                            -(r["score_mean"] if r["score_mean"] is not None else -math.inf)))
    for rank, row in enumerate(out, 1):
        row["rank"] = rank
    return _unreported_spreads(out)


def configs_markdown(spec: SearchSpec, rows: list[dict]) -> str:
    table = []
    for row in rows:
        cells = {"rank": row["rank"], CONFIG_COLUMN: row[CONFIG_COLUMN],
                 **({"arm": row["arm"]} if spec.arms else {}),
                 **{key: _format(key, row[key]) for key in spec.space}, "n": row["n"],
                 "mean score": "" if row["score_mean"] is None else f"{row['score_mean']:.4f}"}
        table.append(cells | _spread_cells(row))
    return to_markdown(table, lambda key, value: str(value))


def _spread_cells(row: dict) -> dict:
    cells = {}
    for name in ARM_METRICS:
        if f"{name}_mean" not in row:
            continue
        mean, std = row[f"{name}_mean"], row[f"{name}_std"]
        scale, unit = (100.0, " %") if name in PERCENT else (1.0, "")
        cells[f"{name}{unit}"] = "" if mean is None else (
            f"{mean * scale:.2f} ± {std * scale:.2f}" if scale != 1 else f"{mean:.4f} ± {std:.4f}")
    cells["meets target"] = row["meets_target"]
    return cells


def arms_markdown(rows: list[dict]) -> str:
    table = [{"arm": row["arm"], "n": row["n"]} | _spread_cells(row) for row in rows]
    return to_markdown(table, lambda key, value: str(value))


# ----------------------------------------------------------------------- best config

def best_config_yaml(spec: SearchSpec, row: dict) -> str:
    config = spec.trainer_config(row["_params"], for_trial=False)
    searched = {k: row["_params"][k] for k in row["_params"]}
    if "score_mean" in row:  # a configuration of a search with seeds, not one trial
        judged = (f"# Best configuration {row[CONFIG_COLUMN]} of search '{spec.name}' over seeds "
                  f"{spec.file.seeds} (mean score {row['score_mean']:.4f}, mean validation accuracy "
                  f"{row['accuracy_mean']:.4f}, meets target on every seed: "
                  f"{row['meets_target_on_every_seed']}, {row['meets_target']}).\n"
                  f"# Its seed is the base config's; train each with seed=N.\n")
    else:
        judged = (f"# Best trial {row['trial']} of search '{spec.name}' (score {row['score']:.4f}, "
                  f"validation accuracy {row['accuracy']:.4f}, meets target: "
                  f"{bool(row['meets_target'])}).\n")
    header = (judged + f"# Searched values: {searched}\n"
              f"# Train it with: daae train --config {BEST_CONFIG}\n")
    return header + yaml.safe_dump(to_dict(config), sort_keys=False)


# --------------------------------------------------------------------------- hparams

def _hparam_value(value: Any):
    if isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def write_hparams(spec: SearchSpec, row: dict) -> None:
    """An hparams session in the trial's own folder, beside the trainer's
    scalars, so `tensorboard --logdir <experiment>` lists every trial in its
    hparams view with the searched values and its final metrics."""
    from torch.utils.tensorboard import SummaryWriter
    from torch.utils.tensorboard.summary import hparams

    folder = Path(row["_path"])
    if is_remote(row["_path"]) or not folder.is_dir() or row["score"] is None:
        return
    for old in folder.glob("events.out.tfevents.*.hparams"):
        old.unlink()  # a resumed search writes them again
    params = {k: _hparam_value(v) for k, v in row["_params"].items()}
    params["status"] = row["status"]
    measured = {k: row[k] for k in ("accuracy", "adversary_accuracy", "probe_accuracy",
                                    "linear_probe_accuracy", *MAPPED_METRICS, "recon_mse")
                if row.get(k) is not None}
    # The trainer's own tags, so the hparams view reads its scalars.
    metric_tags = tensorboard_tags("val", measured)
    own = {"tune/score": row["score"], "tune/meets_target": float(bool(row["meets_target"]))}
    own = {k: v for k, v in own.items() if v is not None}
    # Listing a key's values lets the hparams view filter on them; TensorBoard
    # wants them of the trial's own type.
    domains = {k: [_hparam_value(v) for v in d.args] for k, d in spec.space.items()
               if d.kind in ("choice", "grid")}
    if spec.arms:
        domains[ARM_KEY] = list(spec.arms)
    discrete = {k: values for k, values in domains.items()
                if k in params and all(type(v) is type(params[k]) for v in values)}
    exp, start, end = hparams(params, {**metric_tags, **own}, discrete)
    with SummaryWriter(str(folder), filename_suffix=".hparams") as writer:
        for summary in (exp, start, end):
            writer.file_writer.add_summary(summary)
        for tag, value in own.items():
            writer.add_scalar(tag, value, row["step"] or 0)


# ---------------------------------------------------------------------------- writer

def write_outputs(spec: SearchSpec, grid) -> tuple[dict[str, str], list[dict]]:
    rows = collect(spec, grid)
    base = spec.experiment_path
    visible = [_visible(r) for r in rows]
    files = {TRIALS_CSV: to_csv(visible), TRIALS_MD: to_markdown(visible)}
    if spec.arms:
        arms = arm_rows(spec, rows)
        files[ARMS_CSV] = to_csv(arms)
        files[ARMS_MD] = arms_markdown(arms)
    if spec.file.seeds:
        configs = config_rows(spec, rows)
        files[CONFIGS_CSV] = to_csv([_visible(r) for r in configs])
        files[CONFIGS_MD] = configs_markdown(spec, configs)
        best: Optional[dict] = next((r for r in configs if r["_complete"]), None)
    else:
        best = next((r for r in rows if r["status"] == "finished"), None)
    if best is not None:
        files[BEST_CONFIG] = best_config_yaml(spec, best)
    else:
        log.warning("no %s, so there is no best configuration",
                    "configuration finished on every seed" if spec.file.seeds else "trial finished")
    paths = {}
    for name, text in files.items():
        write_text(f"{base}/{name}", text)
        paths[name] = f"{base}/{name}"
    for row in rows:
        try:
            write_hparams(spec, row)
        except (OSError, TypeError, ValueError) as exc:  # a summary is not worth failing a finished search
            log.warning("no hparams summary for %s: %s", row["trial"], exc)
    if best is not None and not best.get("meets_target_on_every_seed", best["meets_target"]):
        log.warning("no %s meets the decorrelation target (tolerance %.3f); the best configuration "
                    "is the one nearest to it", "configuration on every seed" if spec.file.seeds
                    else "finished trial", spec.file.target.tolerance)
    return paths, rows
