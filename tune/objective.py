"""The search objective: validation accuracy, subject to the decorrelation
target (adversary and probe accuracy near chance, 1/K)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

from daae.config import CLASS_MAPPED_METRICS

# What train() reports for the validation split (daae.evaluate.evaluate).
# The class-whitened and class-Gaussianized probes only with
# eval.class_whitened_probes=true and eval.class_gaussianized_probes=true.
MAPPED_METRICS = CLASS_MAPPED_METRICS
VALIDATION_METRICS = ("accuracy", "adversary_accuracy", "probe_accuracy",
                      "linear_probe_accuracy", *MAPPED_METRICS, "recon_mse", "z_mean", "z_std",
                      "y_marginal_entropy", "labelled_accuracy", "cluster_accuracy")
# What a search may rank on: the metrics that lie in [0, 1] (accuracies, and
# the reconstruction's mean squared error of images and sigmoid outputs in
# [0, 1]), for which a trial that misses the target, scored ``value - 1 -
# distance``, stays below every trial that meets it.
RANKABLE_METRICS = ("accuracy", "adversary_accuracy", "probe_accuracy", "linear_probe_accuracy",
                    *MAPPED_METRICS, "recon_mse", "labelled_accuracy", "cluster_accuracy")
# The probes are trained only in the final evaluation unless
# eval.probes_during_training=true, so intermediate reports lack them.
FINAL_ONLY_METRICS = ("probe_accuracy", "linear_probe_accuracy", *MAPPED_METRICS)
# Classifier accuracies that have a chance level to aim for.
TARGETABLE_METRICS = ("adversary_accuracy", "probe_accuracy", "linear_probe_accuracy",
                      *MAPPED_METRICS)
# What a trial adds to each report.
TUNE_METRICS = ("score", "meets_target", "target_distance", "step", "final", "resumed_from_step")


@dataclass
class Target:
    tolerance: float = 0.05
    metrics: list[str] = field(default_factory=lambda: ["adversary_accuracy", "probe_accuracy"])
    # None: 1/K, with K read from what the trainer reports.
    chance: Optional[float] = None


@dataclass
class Objective:
    metric: str = "accuracy"
    mode: str = "max"  # max | min
    target: Target = field(default_factory=Target)

    def chance(self, metrics: dict) -> float:
        if self.target.chance is not None:
            return self.target.chance
        # The trainer reports log K as the entropy ceiling of q(y); reading K
        # from it keeps the objective right for any number of classes.
        return 1.0 / round(math.exp(metrics["y_marginal_entropy_max"]))

    def assess(self, metrics: dict) -> dict:
        """``score``, ``meets_target`` and ``target_distance`` for one report.

        The distance is how far the target metrics lie outside the tolerance
        band around chance, summed. A trial that misses the target scores
        ``value - 1 - distance``: below every feasible trial for a metric in
        [0, 1] (validation allows only those, RANKABLE_METRICS), and the
        nearer the target, the higher among the infeasible.
        Only target metrics present count, so an intermediate report (no
        probes yet) is judged on the adversary alone. The class-whitened
        and class-Gaussianized probes are the exception: absent where the
        probes ran, their map could not be fitted (a class predicted too rarely), which misses the
        target by 1 each, and ranked on, scores as the worst value and misses by 1.
        """
        chance = self.chance(metrics)
        probes_ran = "probe_accuracy" in metrics
        distance = sum(max(0.0, abs(metrics[name] - chance) - self.target.tolerance)
                       if name in metrics else 1.0
                       for name in self.target.metrics
                       if name in metrics or (probes_ran and name in MAPPED_METRICS))
        if self.metric in metrics:
            value = metrics[self.metric] if self.mode == "max" else -metrics[self.metric]
        else:
            value, distance = -1.0, distance + 1.0  # below any accuracy, either mode
        meets = distance == 0.0
        score = value if meets else value - 1.0 - distance
        return {"score": float(score), "meets_target": bool(meets), "target_distance": float(distance)}
