"""Images per second through the whole training iteration (all phases, and
for daae the trainer's summing of the losses on the device): daae's
reference-order and fused steps against a plain port of the original loop
(reference_impl.py, which reads its losses with .item()), same process, same
data, same networks (the original's: daae's options that add critics or widen
them are timed in daae's cases only).

    python -m benchmarks.bench_step [--models mlp conv] [--precisions fp32 bf16]
                                    [--steps 30] [--repeats 5] [--config FILE]
                                    [--count-ops]

Writes benchmarks/results/bench_step-<device>.json and prints a table.
On a CUDA device two more daae cases run: each step replayed from one CUDA
graph (train.cuda_graph=true, daae/graphed.py).

--count-ops adds the operators each implementation dispatches per step (one
profiled step after the timing). On a GPU every one of them is at least one
kernel launch and a pass through Python and the dispatcher on the host: with
batches of 100 the step is bound by that count, not by arithmetic.
"""
from __future__ import annotations

import argparse
import logging
import sys

import torch

from benchmarks.common import machine, median, peak_memory, timed, write_result
from benchmarks.reference_impl import ReferenceTrainer
from daae.config import load_config
from daae.data import ImageSet, SemiSupervisedData
from daae.graphed import make_iteration
from daae.prepare import make_accelerator, prepare_training
from daae.tracker import LossTracker

log = logging.getLogger("bench_step")
MODELS = {"mlp": ["model.kind=mlp", "model.scale=1.0"], "conv": ["model.kind=conv", "model.scale=2.0"]}


def fake_mnist(count: int, seed: int = 0) -> SemiSupervisedData:
    """Speed does not depend on pixel values: random MNIST-shaped images."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (count, 1, 28, 28), dtype=torch.uint8, generator=generator)
    labels = torch.arange(count) % 10
    part = ImageSet(images, labels)
    return SemiSupervisedData(unlabelled=part, labelled=part.subset(torch.arange(100)),
                              validation=part.subset(torch.arange(100)), test=part.subset(torch.arange(100)))


def ops_per_step(step, steps: int = 2) -> float:
    """Operators dispatched per call of ``step``: aten operators not called
    from inside another aten operator (forward and backward alike)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        for _ in range(steps):
            step()
    dispatched = [event for event in profiler.events() if event.name.startswith("aten::") and not (
        event.cpu_parent is not None and event.cpu_parent.name.startswith("aten::"))]
    return len(dispatched) / steps


def daae_rate(config, data, steps: int, repeats: int,
              count_ops: bool = False) -> tuple[float, torch.device, float | None]:
    # Each case compiles afresh, as its own run would: graphs of earlier cases
    # would otherwise fill the cache that the shared forward wrapper draws on.
    torch._dynamo.reset()
    accelerator = make_accelerator(config.train.mixed_precision, config.train.cuda_graph)
    setup = prepare_training(config, accelerator, data)
    iteration = make_iteration(setup, config)
    # The trainer's per-step work: the iteration and the losses summed on the device.
    tracker = LossTracker(accelerator.device)

    def train_step(i: int) -> None:
        epoch, step = divmod(i, setup.batches.steps_per_epoch)
        tracker.add(i, iteration(epoch + 1, step))

    def run():
        for i in range(steps):
            train_step(i)
        tracker.pop_means()  # one sync, as the trainer's log step does

    run()  # warm-up: allocator, first-call overheads, compilation, the graph's capture
    seconds = median([timed(run, accelerator.device) for _ in range(repeats)])
    ops = ops_per_step(lambda: train_step(0)) if count_ops else None
    return steps * config.train.batch_size * 2 / seconds, accelerator.device, ops


def reference_rate(config, data, device, steps: int, repeats: int,
                   count_ops: bool = False) -> tuple[float, float | None]:
    from daae.models import Networks

    torch.manual_seed(config.seed)
    # The original algorithm's networks: one plain C, D_z on z alone. daae's own
    # options (C ensembles, a standardised C, a class-conditional prior) stay on
    # daae's side of the comparison, which they are part of.
    model = config.model
    nets = Networks(model.kind, data.image_shape, data.num_classes, model.z_dim, model.scale,
                    model.adversary_hidden).to(device)
    dtype = torch.bfloat16 if config.train.mixed_precision == "bf16" else None
    unlabelled = data.unlabelled.images.float() / 255
    trainer = ReferenceTrainer(nets, unlabelled, unlabelled[:100], data.unlabelled.labels[:100],
                               device, config.train.batch_size, autocast_dtype=dtype)

    def run():
        for _ in range(steps):
            trainer.step()

    run()
    seconds = median([timed(run, device) for _ in range(repeats)])
    return steps * config.train.batch_size * 2 / seconds, ops_per_step(trainer.step) if count_ops else None


def graph_cases_run() -> bool:
    return torch.cuda.is_available()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["mlp", "conv"], choices=list(MODELS))
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--images", type=int, default=10000)
    parser.add_argument("--config", default=None,
                        help="a YAML config under the cases' overrides (default: the built-in defaults)")
    parser.add_argument("--count-ops", action="store_true",
                        help="also count the operators each implementation dispatches per step")
    parser.add_argument("--set", nargs="*", default=[], metavar="key=value",
                        help="config overrides for every case (e.g. model.adversary_hidden=64)")
    parser.add_argument("--name", default=None, help="result file name (default bench_step-<device>)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    data = fake_mnist(args.images)
    rows = []
    for model in args.models:
        for precision in args.precisions:
            mixed = "bf16" if precision == "bf16" else "no"
            common = ["data.name=mnist", *MODELS[model], f"train.mixed_precision={mixed}", *args.set]
            row = {"model": model, "precision": precision}
            # train.compile's runs (device_session --bench-compile) have no graphed case:
            # the graph holds the whole step and refuses compiled networks inside it.
            graphed = graph_cases_run() and load_config(args.config, common).train.compile == "no"
            modes = ["reference", "fused"] + (["reference_graph", "fused_graph"] if graphed else [])
            for mode in list(modes):
                step_mode, _, graph = mode.partition("_")
                config = load_config(args.config, [*common, f"train.step_mode={step_mode}",
                                                   f"train.cuda_graph={bool(graph)}"])
                try:
                    row[f"daae_{mode}_images_per_s"], device, ops = daae_rate(
                        config, data, args.steps, args.repeats, args.count_ops)
                except Exception as exc:
                    if not graph:
                        raise
                    # A capture that fails must not cost the eager figures of a short lease.
                    log.exception("%s %s: the CUDA graph case failed", model, precision)
                    row[f"daae_{mode}_error"] = f"{type(exc).__name__}: {exc}"
                    modes.remove(mode)
                    continue
                if ops is not None:
                    row[f"daae_{mode}_ops_per_step"] = ops
            row["reference_impl_images_per_s"], ops = reference_rate(
                config, data, device, args.steps, args.repeats, args.count_ops)
            if ops is not None:
                row["reference_impl_ops_per_step"] = ops
            for mode in modes:
                row[f"speedup_{mode}"] = row[f"daae_{mode}_images_per_s"] / row["reference_impl_images_per_s"]
            rows.append(row)
            log.info("%-5s %-5s reference impl %8.0f img/s | daae reference order %8.0f (x%.2f) "
                     "| daae fused %8.0f (x%.2f)", model, precision,
                     row["reference_impl_images_per_s"], row["daae_reference_images_per_s"],
                     row["speedup_reference"], row["daae_fused_images_per_s"], row["speedup_fused"])
            for mode in modes[2:]:
                log.info("%-11s daae %s as one CUDA graph %8.0f img/s (x%.2f)", "",
                         mode.partition("_")[0], row[f"daae_{mode}_images_per_s"],
                         row[f"speedup_{mode}"])
            if args.count_ops:
                log.info("%-11s operators per step: reference impl %.0f | daae reference order %.0f "
                         "| daae fused %.0f", "", row["reference_impl_ops_per_step"],
                         row["daae_reference_ops_per_step"], row["daae_fused_ops_per_step"])
            # Written after every row: a long run stopped early keeps what it measured.
            result = {"benchmark": "bench_step", "machine": machine(device), "steps": args.steps,
                      "config": args.config, "overrides": args.set, "repeats": args.repeats,
                      "batch_size": config.train.batch_size,
                      "note": f"images/s counts the unlabelled and the labelled batch "
                              f"(2 x {config.train.batch_size} per step)",
                      "rows": rows, "peak_memory": peak_memory(device)}
            path = write_result(args.name or f"bench_step-{device.type}", result)
    log.info("wrote %s", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
