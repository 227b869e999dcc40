"""Time and epochs to reach target test accuracies on MNIST with 100 labels,
decorrelation on.

    python -m benchmarks.bench_accuracy [--config configs/mnist_mlp.yaml] [--set key=value ...]
                                        [--targets 0.95 0.98] [--budget-s S] [--eval-every 250]

It trains with the trainer's own iteration (daae.graphed.make_iteration,
learning-rate drops, decorrelation start) and, every --eval-every steps, stops
the clock to measure test accuracy and the adversary's accuracy. On a GPU it
runs until every target is reached or the config's epochs are done; on CPU
(or with --budget-s) it stops after that many seconds of training and reports
the accuracy reached. A benchmark, not model selection: configs are chosen on
validation elsewhere (tune/).

Writes benchmarks/results/bench_accuracy-<device>.json (or --name) and logs a summary.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import torch

from benchmarks.common import machine, peak_memory, synchronize, write_result
from daae.config import load_config
from daae.data import load_data
from daae.evaluate import evaluate
from daae.graphed import make_iteration
from daae.optimizers import set_learning_rates
from daae.prepare import make_accelerator, prepare_training
from daae.tracker import LossTracker
from daae.train import planned_steps

log = logging.getLogger("bench_accuracy")
CPU_BUDGET_S = 600.0
DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "mnist_mlp.yaml"


def first_reaching(curve: list[dict], target: float) -> dict | None:
    for point in curve:
        if point["test_accuracy"] >= target:
            return {key: point[key] for key in ("train_seconds", "epoch", "step")}
    return None


def run(config, targets: list[float], budget_s: float | None, eval_every: int) -> dict:
    accelerator = make_accelerator(config.train.mixed_precision, config.train.cuda_graph)
    device = accelerator.device
    data = load_data(config.data, config.seed)
    setup = prepare_training(config, accelerator, data)
    iteration = make_iteration(setup, config)
    steps_per_epoch = setup.batches.steps_per_epoch
    total_steps = planned_steps(config, steps_per_epoch)
    tracker = LossTracker(device)
    curve, clock, step = [], 0.0, 0
    while step < total_steps and (budget_s is None or clock < budget_s):
        synchronize(device)
        started = time.perf_counter()
        for _ in range(min(eval_every, total_steps - step)):
            epoch, in_epoch = divmod(step, steps_per_epoch)
            if in_epoch == 0:
                set_learning_rates(setup.optimizers, epoch, config)
            tracker.add(step, iteration(epoch, in_epoch))
            step += 1
        synchronize(device)
        clock += time.perf_counter() - started
        tracker.check()
        metrics = evaluate(setup.nets, data.test, data.labelled, config.eval, data.num_classes, device)
        curve.append({"step": step, "epoch": step / steps_per_epoch, "train_seconds": clock,
                      "test_accuracy": metrics["accuracy"],
                      "adversary_accuracy": metrics["adversary_accuracy"]})
        log.info("step %6d  epoch %6.2f  %8.1f s  test accuracy %.4f  adversary %.3f", step,
                 step / steps_per_epoch, clock, metrics["accuracy"], metrics["adversary_accuracy"])
        if budget_s is None and all(first_reaching(curve, t) for t in targets):
            break
    return {"machine": machine(device), "curve": curve,
            "targets": {f"{t:g}": first_reaching(curve, t) for t in targets},
            "final": curve[-1] if curve else None,
            "images_per_second": step * 2 * config.train.batch_size / max(clock, 1e-9),
            "peak_memory": peak_memory(device)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(DEFAULT_CONFIG))
    parser.add_argument("--set", nargs="*", default=[], metavar="key=value",
                        help="config overrides (e.g. data.root=... train.step_mode=fused)")
    parser.add_argument("--targets", nargs="+", type=float, default=[0.95, 0.98])
    parser.add_argument("--budget-s", type=float, default=None,
                        help=f"seconds of training (default: none on GPU, {CPU_BUDGET_S:g} on CPU)")
    parser.add_argument("--eval-every", type=int, default=250)
    parser.add_argument("--name", default=None, help="result file name (default bench_accuracy-<device>)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    config = load_config(args.config, args.set)
    if config.loss.decorrelation <= 0:
        parser.error("this benchmark measures the decorrelated model: keep loss.decorrelation > 0")
    budget = args.budget_s
    if budget is None and not torch.cuda.is_available():
        budget = CPU_BUDGET_S
    result = run(config, args.targets, budget, args.eval_every)
    result.update(benchmark="bench_accuracy", config=args.config, overrides=args.set,
                  budget_s=budget, eval_every=args.eval_every)
    device = result["machine"]["device"].split(":")[0]
    path = write_result(args.name or f"bench_accuracy-{device}", result)
    for target, reached in result["targets"].items():
        log.info("target %s: %s", target, "not reached" if reached is None else
                 f"{reached['train_seconds']:.1f} s, {reached['epoch']:.2f} epochs")
    log.info("wrote %s", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
