"""Meters for what a run reports: peak memory, wall time, the machine and the software it ran on."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import resource
import sys
import time

import torch


def status_kib(field: str) -> int | None:
    """A /proc/self/status memory field (VmRSS, VmHWM, ...) in KiB; None where there is no such file or field."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


class PeakMemoryMeter:
    """Peak memory of the work between `start()` and `peak_bytes()`.

    GPU: torch.cuda.max_memory_allocated after reset_peak_memory_stats (tensors only).
    CPU: the kernel's peak resident set size (VmHWM), reset at start through /proc/self/clear_refs; where
    that is not possible, the process's lifetime peak RSS (ru_maxrss), which then includes model loading.
    """

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.name = ""
        self.baseline_bytes = 0  # what was already in use at start (weights, libraries)

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.baseline_bytes = int(torch.cuda.memory_allocated(self.device))
            self.name = "torch.cuda.max_memory_allocated (GPU tensors, reset at training start)"
            return
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.name = "peak RSS of the process during training (VmHWM, reset at training start)"
            self.baseline_bytes = (status_kib("VmRSS") or 0) * 1024
        except OSError:
            self.name = "peak RSS of the process over its lifetime (ru_maxrss; includes loading)"

    def peak_bytes(self) -> int:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return int(torch.cuda.max_memory_allocated(self.device))
        hwm = status_kib("VmHWM") if "VmHWM" in self.name else None
        if hwm is not None:
            return hwm * 1024
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class Stopwatch:
    def __init__(self) -> None:
        self.started = time.perf_counter()

    def seconds(self) -> float:
        return time.perf_counter() - self.started


def versions() -> dict[str, str]:
    out = {"python": sys.version.split()[0]}
    for package in ("readapt", "torch", "transformers", "accelerate", "safetensors", "scikit-learn", "scipy"):
        try:
            out[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            out[package] = "not installed"
    return out


def machine() -> dict[str, str | int]:
    description = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count() or 0,
        "torch_threads": torch.get_num_threads(),
    }
    try:
        with open("/proc/meminfo") as f:
            description["memory_kib"] = int(f.readline().split()[1])
    except OSError:
        pass
    if torch.cuda.is_available():
        description["gpu"] = torch.cuda.get_device_name(0)
    return description
