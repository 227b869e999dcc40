"""Shared by the benchmarks: the machine they ran on, medians, result files."""
from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import time
from pathlib import Path

import torch

# DAAE_BENCH_RESULTS redirects the results, as device_session does into what comes back.
RESULTS = Path(os.environ.get("DAAE_BENCH_RESULTS") or Path(__file__).resolve().parent / "results")


def _cpuinfo() -> dict[str, str]:
    """The first processor's entries of /proc/cpuinfo (empty where there is none)."""
    entries = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if not line.strip():
                break
            key, _, value = line.partition(":")
            entries[key.strip()] = value.strip()
    except OSError:
        pass
    return entries


def machine(device: torch.device) -> dict:
    cpuinfo = _cpuinfo()
    # A VM names its CPU vaguely ("AMD EPYC"); family and model tell the
    # generations apart, and the vector unit PyTorch's CPU kernels use decides
    # their speed (and their rounding): sessions here have had AVX2 and AVX-512.
    info = {"cpu": cpuinfo.get("model name") or platform.processor() or platform.machine(),
            "cpu_family_model": f"{cpuinfo.get('cpu family', '?')}/{cpuinfo.get('model', '?')}",
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(), "device": str(device)}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(function, device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    function()
    synchronize(device)
    return time.perf_counter() - start


def median(values: list[float]) -> float:
    return statistics.median(values)


def peak_memory(device: torch.device) -> dict:
    peak = {"host_max_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if device.type == "cuda":
        peak["gpu_max_allocated_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    return peak


def write_result(name: str, data: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    # Written whole or not at all: a benchmark stopped mid-write keeps its last result.
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(partial, path)
    return path
