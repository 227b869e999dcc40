"""Everything a short GPU lease is for, in one command that fits one device call.

    python3 -m benchmarks.device_session --data-root .device/mnist --out "$OUT"
        [--config configs/mnist_p100.yaml] [--seeds 0 1 2] [--arms on off]
        [--budget-s 360] [--bench-steps 50] [--skip-bench] [--set key=value ...]
        [--bench-compile reduce-overhead [--bench-compile-timeout-s 150]]
        [--tune-concurrency 1 8 --tune-trials 2 8 [--tune-timeout-s 240]]

1. bench_step on the device (MLP and conv, fp32 and bf16): daae's two step
   orders against the plain reference loop.
1a. With --bench-compile MODE, bench_step again for the MLP with
   train.compile=MODE (reduce-overhead: CUDA graphs, the lever for a step
   bound by kernel launches), its own JSON, stopped at its own timeout.
1b. With --tune-concurrency (Ray must import: the device image has none,
   ../shared/tools/pack-ray-for-device packs it), bench_tune at those levels
   of trials sharing the GPU, stopped at --tune-timeout-s with the levels it
   finished kept.
2. One `daae train` per seed and arm (``on``: the config as it is; ``off``:
   ``loss.decorrelation=0 loss.independence=0``), all at once on the one GPU:
   a step bound by kernel launches leaves the GPU idle between them, which
   other runs can use (not yet measured here; bench_tune measures it for
   trials).
   Runs still going at the deadline are stopped; their curves come back all
   the same, and their last checkpoints are evaluated on the test split.
3. Into --out, at most 8 files, none nested deeper than the machine returns:
   summary.md (`daae summary` of each arm's finished runs, the stopped ones
   listed), session.json (the commands, how long, exit codes, the machine), the bench_step
   and bench_tune JSONs, and runs.tar.gz (every run's config, metrics.json, events and logs; no
   checkpoints, which are too large to bring back).

Nothing here is GPU-only: tests/test_benchmarks.py runs it on a CPU with a
tiny config in under a minute, so the command is known to work before a
lease is spent on it.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

from benchmarks.bench_tune import trials_per_level
from daae.checkpoint import checkpoint_path
from daae.config import load_config

log = logging.getLogger("device_session")
ROOT = Path(__file__).resolve().parents[1]
# "off" removes both class-removing terms: the independence term alone also
# pushes the class out of z (docs/results.md "An independence term").
ARMS = {"on": [], "off": ["loss.decorrelation=0", "loss.independence=0"]}
STOPPED = "stopped at the deadline"
STOPPED_METRICS = "checkpoint_test.json"
RETURNED = ("config.yaml", "metrics.json", STOPPED_METRICS, "events.out.tfevents.*")


def _python(*args: str) -> list[str]:
    return [sys.executable, *args]


def stop_group(process: subprocess.Popen, grace_s: float = 30.0) -> None:
    """SIGTERM to the process's whole group, then SIGKILL to whatever of it is
    left: Ray's workers can outlive the driver and hold the GPU."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=grace_s)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def run_benchmark(out: Path, module: str, name: str, args: list[str], timeout_s: float) -> dict:
    """Runs benchmarks.<module> with its result JSON going straight into
    ``out`` (all of it, or what it wrote before the timeout). It runs in its
    own process group, so that stopping it also stops what it started (Ray)."""
    command = _python("-m", f"benchmarks.{module}", *args, "--name", name)
    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=ROOT, start_new_session=True,
                               env={**os.environ, "DAAE_BENCH_RESULTS": str(out)})
    try:
        code = process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        code = "timeout"
        stop_group(process)
    result = out / f"{name}.json"
    return {"command": command, "exit": code, "seconds": time.perf_counter() - started,
            "result": result.name if result.is_file() else None}


def machine_info() -> dict:
    """benchmarks.common.machine of the device, read in a child process once
    the runs are done: this process never initialises CUDA itself."""
    code = ("import json, torch; from benchmarks.common import machine; "
            "print(json.dumps(machine(torch.device('cuda' if torch.cuda.is_available() else 'cpu'))))")
    done = subprocess.run(_python("-c", code), cwd=ROOT, capture_output=True, text=True, timeout=120)
    if done.returncode:
        return {"error": done.stderr.strip().splitlines()[-1:]}
    return json.loads(done.stdout)


def train_commands(args, runs_dir: Path) -> dict[str, list[str]]:
    return {f"{arm}-seed{seed}": _python(
                "-m", "daae", "train", "--config", args.config, f"data.root={args.data_root}",
                f"seed={seed}", f"run.dir={runs_dir}", f"run.name={arm}-seed{seed}",
                "run.progress_bar=false", *args.set, *ARMS[arm])
            for arm in args.arms for seed in args.seeds}


def start_runs(commands: dict[str, list[str]], runs_dir: Path) -> dict[str, subprocess.Popen]:
    runs = {}
    for name, command in commands.items():
        with open(runs_dir / f"{name}.log", "w") as log_file:  # the child keeps its own handle
            runs[name] = subprocess.Popen(command, cwd=ROOT, stdout=log_file, stderr=subprocess.STDOUT)
    return runs


def wait_for(runs: dict[str, subprocess.Popen], deadline: float) -> dict[str, object]:
    """Exit code of each run, or STOPPED."""
    for process in runs.values():
        try:
            process.wait(timeout=max(deadline - time.perf_counter(), 0.0))
        except subprocess.TimeoutExpired:
            pass
    codes = {}
    for name, process in runs.items():
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            codes[name] = STOPPED
        else:
            codes[name] = process.returncode
    return codes


def evaluate_stopped(runs_dir: Path, names: list[str]) -> dict[str, dict]:
    """`daae eval`'s test metrics of each stopped run's last checkpoint (no
    generation checks), written beside it as checkpoint_test.json."""
    from daae.config import CLASS_MAP_KEYS
    from daae.evaluate import evaluate_run
    from daae.whitening import WhiteningError

    results = {}
    for name in names:
        if checkpoint_path(runs_dir / name).exists():
            try:
                results[name] = evaluate_run(runs_dir / name, generation=False)
            except WhiteningError:
                # A run stopped early can predict a class too rarely to map
                # (eval.class_whitened_probes, eval.class_gaussianized_probes):
                # its raw figures still count.
                results[name] = evaluate_run(runs_dir / name, generation=False,
                                             overrides=[f"{key}=false" for key in CLASS_MAP_KEYS.values()])
            (runs_dir / name / STOPPED_METRICS).write_text(json.dumps(results[name], indent=2) + "\n")
    return results


def summarize_arms(arms: list[str], runs_dir: Path, codes: dict, stopped: dict) -> str:
    from daae.summary import markdown, summarize

    sections = []
    for arm in arms:
        names = sorted(n for n in codes if n.startswith(f"{arm}-"))
        finished = [runs_dir / n for n in names if (runs_dir / n / "metrics.json").is_file()]
        text = markdown(summarize(finished), arm) if finished else f"{arm}: no run finished\n"
        for name in (n for n in names if runs_dir / n not in finished):
            code = codes[name]
            text += f"\n- {name}: {code if code == STOPPED else f'exit {code}'}"
            if name in stopped:
                m = stopped[name]
                text += (f"; its last checkpoint (step {m['step']}): test error "
                         f"{100 * (1 - m['test_accuracy']):.2f} %, adversary {100 * m['adversary_accuracy']:.2f} %, "
                         f"probe {100 * m['probe_accuracy']:.2f} %")
        sections.append(text + "\n")
    return "\n".join(sections)


def pack_runs(runs_dir: Path, archive: Path) -> None:
    with tarfile.open(archive, "w:gz") as tar:
        for path in sorted(runs_dir.rglob("*")):
            if path.is_file() and (path.suffix == ".log" or any(path.match(p) for p in RETURNED)):
                tar.add(path, arcname=path.relative_to(runs_dir.parent))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", required=True, help="folder holding the MNIST .gz files")
    parser.add_argument("--out", required=True, help="where the results go ($OUT on the device)")
    parser.add_argument("--config", default=str(ROOT / "configs" / "mnist_p100.yaml"))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--arms", nargs="+", choices=list(ARMS), default=["on", "off"])
    parser.add_argument("--budget-s", type=float, default=360.0,
                        help="wall-clock seconds for the training runs (default 360)")
    parser.add_argument("--bench-steps", type=int, default=50)
    parser.add_argument("--bench-timeout-s", type=float, default=120.0)
    parser.add_argument("--skip-bench", action="store_true")
    parser.add_argument("--bench-compile", nargs="*", default=[],
                        choices=["default", "reduce-overhead", "max-autotune"],
                        help="also bench_step the MLP with train.compile at each of these modes")
    parser.add_argument("--bench-compile-timeout-s", type=float, default=150.0,
                        help="timeout of each --bench-compile benchmark, compilation included")
    parser.add_argument("--tune-concurrency", nargs="*", type=int, default=[],
                        help="bench_tune's levels (e.g. 1 8); none (the default) skips it")
    parser.add_argument("--tune-trials", nargs="+", type=int, default=[8],
                        help="bench_tune's trials: one number for every level, or one per level")
    parser.add_argument("--tune-timeout-s", type=float, default=240.0)
    parser.add_argument("--tune-set", nargs="*", default=[], metavar="key=value",
                        help="bench_tune's search overrides (overrides.train.max_steps=...)")
    parser.add_argument("--set", nargs="*", default=[], metavar="key=value",
                        help="trainer overrides for every run")
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # The runs start in the repository root: paths given from elsewhere must still hold.
    args.config, args.data_root = str(Path(args.config).resolve()), str(Path(args.data_root).resolve())
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    # A bad config or override fails here, before any run starts.
    config = load_config(args.config, [f"data.root={args.data_root}", *args.set])
    if config.data.name == "mnist" and not (Path(args.data_root) / "train-images-idx3-ubyte.gz").is_file():
        parser.error(f"--data-root {args.data_root} holds no train-images-idx3-ubyte.gz: copy "
                     f"MNIST's four .gz files there (and carry that folder to the device)")
    if args.tune_concurrency:
        try:  # bench_tune's own check, before the lease's minutes go to anything
            trials_per_level(args.tune_concurrency, args.tune_trials, ("--tune-concurrency", "--tune-trials"))
        except ValueError as exc:
            parser.error(str(exc))
        if importlib.util.find_spec("ray") is None:
            parser.error("--tune-concurrency needs Ray, which this Python cannot import: run "
                         "../shared/tools/pack-ray-for-device here, carry [\".device\"] and unpack it on "
                         "the device first (benchmarks/README.md, A GPU lease in one call), or leave --tune-concurrency out")
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    runs_dir = out / "runs"
    runs_dir.mkdir(exist_ok=True)
    session = {"config": args.config, "seeds": args.seeds, "arms": args.arms, "set": args.set,
               "budget_s": args.budget_s}

    bench_step_args = ["--steps", str(args.bench_steps), "--repeats", "3"]
    if not args.skip_bench:
        log.info("bench_step")
        session["bench_step"] = run_benchmark(out, "bench_step", "bench_step-device", bench_step_args,
                                              args.bench_timeout_s)
    for mode in args.bench_compile:
        log.info("bench_step, train.compile=%s", mode)
        session[f"bench_step_compile_{mode}"] = run_benchmark(
            out, "bench_step", f"bench_step-device-compile-{mode}",
            [*bench_step_args, "--models", "mlp", "--set", f"train.compile={mode}"],
            args.bench_compile_timeout_s)
    if args.tune_concurrency:
        log.info("bench_tune")
        session["bench_tune"] = run_benchmark(
            out, "bench_tune", "bench_tune-device",
            ["--concurrency", *map(str, args.tune_concurrency), "--trials", *map(str, args.tune_trials),
             *(["--set", *args.tune_set] if args.tune_set else [])], args.tune_timeout_s)
    commands = train_commands(args, runs_dir)
    log.info("training %d runs for at most %.0f s", len(commands), args.budget_s)
    started = time.perf_counter()
    codes = wait_for(start_runs(commands, runs_dir), started + args.budget_s)
    session.update(training_seconds=time.perf_counter() - started, runs=codes, commands=commands)
    stopped = evaluate_stopped(runs_dir, [n for n, code in codes.items() if code == STOPPED])
    session["machine"] = machine_info()  # what the bench JSONs record too, for the training runs
    (out / "summary.md").write_text(summarize_arms(args.arms, runs_dir, codes, stopped))
    (out / "session.json").write_text(json.dumps(session, indent=2, sort_keys=True, default=str) + "\n")
    pack_runs(runs_dir, out / "runs.tar.gz")
    shutil.rmtree(runs_dir)  # only the archive goes back: the machine returns two folder levels
    log.info("%s", (out / "summary.md").read_text())
    return 0 if all(code == 0 for code in codes.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
