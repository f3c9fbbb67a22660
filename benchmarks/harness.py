"""What every benchmark shares: interleaved timing, the environment it ran in, and the JSON report.

Each script in benchmarks/ prints one JSON object on stdout (progress goes to
stderr), built by `report`: the benchmark's own results beside the machine,
library versions, threads and load average, so two results can be compared
and a spread explained. Timing candidates side by side uses
`time_interleaved`: round-robin runs spread a shared machine's load evenly
over them, so their ratios stay meaningful while absolute times drift.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any


def synchronizer(device: Any = None) -> Callable[[], None]:
    """CUDA kernels are asynchronous: without a sync the clock measures launches, not work."""
    if device is not None and getattr(device, "type", str(device)) == "cuda":
        import torch

        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def time_interleaved(
    fns: dict[str, Callable[[], object]],
    *,
    warmup: int,
    repeats: int,
    sync: Callable[[], None] = lambda: None,
) -> dict[str, list[float]]:
    """Milliseconds per call for each function, run round-robin (a, b, c, a, b, c, ...) after ``warmup`` calls."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    sync()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync()
            start = time.perf_counter()
            fn()
            sync()
            samples[name].append((time.perf_counter() - start) * 1e3)
    return samples


def time_once(function: Callable[[], object]) -> float:
    """Wall-clock seconds of one call."""
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def summarise(samples_ms: Sequence[float]) -> dict[str, float | int]:
    """Median for the headline (robust to the odd preempted run); min/max/IQR show the spread."""
    ordered = sorted(samples_ms)
    quartiles = statistics.quantiles(ordered, n=4) if len(ordered) > 1 else [ordered[0]] * 3
    return {
        "median_ms": round(statistics.median(ordered), 3),
        "min_ms": round(ordered[0], 3),
        "max_ms": round(ordered[-1], 3),
        "iqr_ms": round(quartiles[2] - quartiles[0], 3),
        "repeats": len(ordered),
    }


def usable_cores() -> int:
    """Cores this process may run on (respects taskset/cgroup affinity, unlike os.cpu_count)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def load_average() -> list[float] | None:
    """1/5/15-minute load: on a shared machine it says how much of the spread is other people's work."""
    try:
        return [round(load, 2) for load in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def cpu_model_name() -> str:
    """The CPU's marketing name from /proc/cpuinfo where there is one (platform.processor() is often empty)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: Any = None) -> dict[str, object]:
    """Hardware, library versions and threads: what a reader needs to compare two results."""
    env: dict[str, object] = {
        "cpu": cpu_model_name(),
        "cpu_count": os.cpu_count(),
        "usable_cores": usable_cores(),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    if "torch" in sys.modules:  # only benchmarks that use torch pay for its import
        import torch

        env.update(torch=torch.__version__, torch_threads=torch.get_num_threads())
        if device is not None and str(device).startswith("cuda"):
            env.update(device_name=torch.cuda.get_device_name(device), cuda=torch.version.cuda)
    if device is not None:
        env["device"] = str(device)
    for module in ("faiss", "onnxruntime"):
        if module in sys.modules:
            env[module] = getattr(sys.modules[module], "__version__", "unknown")
    return env


def report(benchmark: str, results: dict[str, Any], *, started: float, device: Any = None) -> dict[str, Any]:
    """The JSON object a benchmark prints: its name, results, environment, load and wall time."""
    return {
        "benchmark": benchmark,
        **results,
        "environment": environment(device),
        "load_average": load_average(),
        "wall_s": round(time.perf_counter() - started, 1),
    }


def emit(result: dict[str, Any]) -> None:
    """Print the report on stdout, the only thing a benchmark writes there."""
    print(json.dumps(result, indent=2))


def log(name: str, message: str) -> None:
    """Progress to stderr: stdout carries only the JSON."""
    print(f"[{name}] {message}", file=sys.stderr, flush=True)
