"""What every benchmark here shares: the machine line printed first, and interleaved timing.

The scripts run as `python bench/<script>.py`, which puts this folder on sys.path.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from typing import Callable, Mapping


def machine_line(versions: str) -> str:
    """Usable CPU cores, torch threads, the GPU or none, and the given library versions."""
    import torch

    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"machine: {platform.machine()} {platform.system()}, {cpus} usable CPU cores "
            f"(os.cpu_count {os.cpu_count()}), torch threads {torch.get_num_threads()}, {gpu}; "
            f"python {platform.python_version()}, {versions}")


def interleaved_medians(functions: Mapping[str, Callable[[], object]], repeats: int,
                        clock: Callable[[], float] = time.perf_counter) -> dict[str, float]:
    """Median seconds of each function, after one warm-up call each (file cache,
    first-call allocations). Every round runs every function once, in turn, so a
    busy shared machine slows all of them alike.

    `clock`: wall-clock by default; `time.process_time` counts this process's
    CPU seconds, which with one torch thread on a machine busy with other work
    measures the work done rather than the wait for a free core."""
    for function in functions.values():
        function()
    times: dict[str, list[float]] = {name: [] for name in functions}
    for _ in range(repeats):
        for name, function in functions.items():
            start = clock()
            function()
            times[name].append(clock() - start)
    return {name: statistics.median(values) for name, values in times.items()}
