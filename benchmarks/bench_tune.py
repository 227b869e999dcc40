"""Trials per hour of one fixed small search when 1, 2, 4 or 8 trials share
one GPU (fractional GPUs), with the GPU's utilisation and peak memory.

    python -m benchmarks.bench_tune [--concurrency 1 2 4 8] [--trials 16 | --trials N1 N2 ...]
                                    [--set overrides.train.max_steps=500 ...]

The search is configs/tune/smoke.yaml's path through Ray Tune (trials, reports,
checkpoints) on MNIST-shaped synthetic data with the paper's MLP, no early
stopping, every trial the same length; each concurrency level runs it with
resources.gpu = 1/c and at most c trials at once. Without a GPU it shares the
CPUs the same way (resources.cpu = CPUs/c), which says little about GPUs but
keeps the benchmark runnable anywhere. Ray must be installed (`pip install
-e '.[tune]'`; for the GPU machine see ../shared/tools/pack-ray-for-device).

--trials gives every level the same number of trials, or one number per
level: trials per hour compare across levels whatever the counts, so a short
lease can run fewer trials one at a time than it packs eight at once.

Writes benchmarks/results/bench_tune-<device>.json (or --name) after each
level, so a run stopped part-way keeps the levels it finished, and logs a table.
"""
from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from benchmarks.common import machine, write_result

log = logging.getLogger("bench_tune")
SEARCH = Path(__file__).resolve().parents[1] / "configs" / "tune" / "smoke.yaml"
# The paper's MLP on 28x28 synthetic images: the size of a real MNIST trial.
TRIAL = ["overrides.data.synthetic_image_size=28", "overrides.data.synthetic_train_size=20000",
         "overrides.model.scale=1.0", "overrides.model.adversary_hidden=1000",
         "overrides.train.batch_size=100", "overrides.train.max_steps=400",
         "overrides.train.step_mode=fused", "overrides.run.eval_every=200",
         "overrides.run.checkpoint_every=200", "overrides.run.log_every=100"]


class Sampler:
    """Samples GPU utilisation and memory (nvidia-smi) and the machine's used
    host memory in a background thread while a search runs."""

    def __init__(self, period_s: float = 0.5):
        self.period_s, self.samples, self._stop = period_s, [], threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _gpu(self) -> tuple[float, float] | None:
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu,memory.used",
                                  "--format=csv,noheader,nounits", "--id=0"],
                                 capture_output=True, text=True, timeout=10).stdout
            utilisation, memory = (float(v) for v in out.strip().split(","))
            return utilisation, memory
        except (OSError, ValueError, subprocess.SubprocessError):
            return None

    def _loop(self) -> None:
        import psutil  # a Ray dependency

        while not self._stop.is_set():
            self.samples.append((self._gpu(), psutil.virtual_memory().used / 2**20))
            self._stop.wait(self.period_s)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def summary(self, host_baseline_mib: float) -> dict:
        gpu = [s[0] for s in self.samples if s[0] is not None]
        host = [s[1] for s in self.samples]
        return {"gpu_utilisation_mean_pct": sum(u for u, _ in gpu) / len(gpu) if gpu else None,
                "gpu_memory_peak_mib": max(m for _, m in gpu) if gpu else None,
                "host_memory_peak_above_idle_mib": max(host) - host_baseline_mib if host else None}


def run_level(concurrency: int, trials: int, storage: Path, overrides: list[str], on_gpu: bool) -> dict:
    import psutil
    import ray

    from tune import load_search
    from tune.runner import run_search

    cpus = ray.cluster_resources().get("CPU", os.cpu_count())
    share = {"resources.gpu": 1 / concurrency if on_gpu else 0,
             "resources.cpu": max(cpus / concurrency, 0.01) if not on_gpu else 1}
    cli = [f"name=c{concurrency}", f"storage_path={storage}", f"num_samples={trials}",
           "scheduler.kind=none", f"max_concurrent_trials={concurrency}",
           *(f"{k}={v:g}" for k, v in share.items()), *TRIAL, *overrides]
    spec = load_search(SEARCH, cli)
    baseline = psutil.virtual_memory().used / 2**20
    with Sampler() as sampler:
        started = time.perf_counter()
        outcome = run_search(spec)
        seconds = time.perf_counter() - started
    if not outcome.complete:
        raise RuntimeError(f"the search at concurrency {concurrency} did not finish: {outcome.experiment_path}")
    return {"concurrency": concurrency, "trials": trials, "seconds": seconds,
            "trials_per_hour": trials * 3600 / seconds, **share, **sampler.summary(baseline)}


def trials_per_level(concurrency: list[int], trials: list[int],
                     options: tuple[str, str] = ("--concurrency", "--trials")) -> list[int]:
    """One trial count per concurrency level, from one count for all or one
    each; ValueError naming ``options`` (the caller's flags) otherwise."""
    levels_flag, trials_flag = options
    if len(trials) not in (1, len(concurrency)):
        raise ValueError(f"{trials_flag}: give one number, or one per {levels_flag} level "
                         f"({len(concurrency)}), not {len(trials)}")
    if any(t < 1 for t in trials):
        raise ValueError(f"{trials_flag}: each level needs at least 1 trial")
    return trials * len(concurrency) if len(trials) == 1 else list(trials)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", nargs="+", type=int, default=[1, 2, 4, 8])
    parser.add_argument("--trials", nargs="+", type=int, default=[16],
                        help="trials per level: one number for all, or one per --concurrency level")
    parser.add_argument("--set", nargs="*", default=[], metavar="key=value",
                        help="search overrides, e.g. overrides.train.max_steps=1000")
    parser.add_argument("--name", default=None, help="result file name (default bench_tune-<device>)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if any(c < 1 for c in args.concurrency):
        parser.error("--concurrency: each level must be at least 1")
    try:
        trials = trials_per_level(args.concurrency, args.trials)
    except ValueError as exc:
        parser.error(str(exc))

    import ray

    from tune.runner import ensure_ray

    on_gpu = torch.cuda.is_available()
    device = torch.device("cuda" if on_gpu else "cpu")
    result = {"benchmark": "bench_tune", "machine": machine(device), "search": str(SEARCH.name),
              "trial_overrides": TRIAL + args.set, "rows": []}
    rows = result["rows"]
    with tempfile.TemporaryDirectory(prefix="bench_tune-") as storage:
        started = ensure_ray()
        try:
            for concurrency, level_trials in zip(args.concurrency, trials):
                row = run_level(concurrency, level_trials, Path(storage), args.set, on_gpu)
                rows.append(row)
                row["speedup_vs_first"] = row["trials_per_hour"] / rows[0]["trials_per_hour"]
                path = write_result(args.name or f"bench_tune-{device.type}", result)
                log.info("%d at once: %.0f s for %d trials = %.1f trials/h (x%.2f), GPU %s %% busy; %s",
                         concurrency, row["seconds"], row["trials"], row["trials_per_hour"],
                         row["speedup_vs_first"], "n/a" if row["gpu_utilisation_mean_pct"] is None
                         else f"{row['gpu_utilisation_mean_pct']:.0f}", path)
        finally:
            if started:
                ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
