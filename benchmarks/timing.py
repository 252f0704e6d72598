"""Timing and peak-memory helpers shared by the benchmark scripts (imported as ``timing`` from ``benchmarks/``).

Times are wall seconds around each call, with the device synchronised after it; ``interleaved_times`` alternates the
calls round by round so that drift (other load, clocks) hits all of them alike.
"""

from __future__ import annotations

import resource
import statistics
import time
from typing import Callable

import torch


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA); nothing on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_times(fns: dict[str, Callable[[], object]], device: torch.device, repeats: int,
                      warmup: int) -> dict[str, list[float]]:
    """Wall times of each ``fn()``, ``repeats`` per name, measured in alternating rounds after ``warmup`` rounds."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    sync(device)
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[k].append(time.perf_counter() - t0)
    return times


def median_times(fns: dict[str, Callable[[], object]], device: torch.device, repeats: int,
                 warmup: int) -> dict[str, float]:
    """Median of :func:`interleaved_times` per name."""
    return {k: statistics.median(v) for k, v in interleaved_times(fns, device, repeats, warmup).items()}


def median_time(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int) -> float:
    """Median wall time of ``fn()`` in seconds."""
    return median_times({"fn": fn}, device, repeats, warmup)["fn"]


def peak_mb(device: torch.device) -> float:
    """Peak memory in MiB: CUDA's allocated peak since :func:`reset_peak`, or the process's peak resident memory."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB → MiB (process lifetime)


def reset_peak(device: torch.device) -> None:
    """Start a new CUDA peak (the CPU's peak resident memory cannot be reset)."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_of(fn: Callable[[], object], device: torch.device) -> float:
    """Peak memory (MiB, as :func:`peak_mb`) of one ``fn()`` call, from a fresh CUDA peak."""
    reset_peak(device)
    fn()
    sync(device)
    return peak_mb(device)
