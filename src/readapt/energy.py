"""Energy used by a piece of work, from the best counter the machine offers.

Meters, in order of preference:

- CUDA device: NVML's cumulative energy counter of the GPU board (`nvmlDeviceGetTotalEnergyConsumption`,
  millijoules; Volta and newer). Counts the whole board, including other processes on the same GPU.
- CPU (or a CUDA device whose NVML counter cannot be read): RAPL package counters through the Linux
  powercap interface (`/sys/class/powercap/intel-rapl:*/energy_uj`, microjoules, summed over packages;
  Intel and recent AMD). Counts the whole package, including other processes. Often root-only.
- Otherwise an *estimate*: CPU-seconds (user + system) of this process and its waited-for children, times
  a stated power per busy core (ESTIMATED_WATTS_PER_BUSY_CORE, or $READAPT_CPU_WATTS_PER_CORE).
  Readings from this meter have measured=False and a meter name beginning with "estimated:".

Usage::

    meter = EnergyMeter(device)
    meter.start()
    ...  # the work
    reading = meter.stop()  # EnergyReading(joules, meter, measured, detail)
"""

from __future__ import annotations

import contextlib
import os
import resource
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from readapt.errors import ConfigError

# Power charged per fully busy core by the estimate. 10 W is a round figure for one core of a current
# server or desktop CPU under load (package power divided by core count); it is a guess, and says so.
ESTIMATED_WATTS_PER_BUSY_CORE = 10.0
WATTS_ENV_VAR = "READAPT_CPU_WATTS_PER_CORE"

# Module-level so that tests can point it at a fake tree.
POWERCAP_ROOT = Path("/sys/class/powercap")

# RAPL counters wrap after max_energy_range_uj (about 262 kJ: minutes at full load), so they are read at
# least this often; each interval then holds at most one wrap.
DEFAULT_POLL_SECONDS = 30.0


@dataclass(frozen=True)
class EnergyReading:
    joules: float
    meter: str  # which counter, e.g. "nvml:total_energy_consumption (GPU board, NVIDIA H100)"
    measured: bool  # False: an estimate, not a reading of a hardware counter
    detail: str  # why this meter was chosen, what it covers and what it leaves out


class _CounterUnavailable(Exception):
    """This counter cannot be read here; the message says why."""


class _NvmlCounter:
    """NVML's total-energy counter of one GPU board (64-bit millijoules: never wraps in practice)."""

    measured = True
    can_wrap = False

    def __init__(self, cuda_index: int):
        try:
            import pynvml
        except ImportError as exc:
            raise _CounterUnavailable(f"pynvml is not importable ({exc})") from exc
        self._nvml = pynvml
        try:
            pynvml.nvmlInit()
        except Exception as exc:  # NVMLError subclasses and driver load failures alike
            raise _CounterUnavailable(f"nvmlInit failed ({exc})") from exc
        try:
            self._handle, how_found = _nvml_handle(pynvml, cuda_index)
            name = pynvml.nvmlDeviceGetName(self._handle)
            name = name.decode() if isinstance(name, bytes) else str(name)
            pynvml.nvmlDeviceGetTotalEnergyConsumption(self._handle)  # fails here if unsupported
        except Exception as exc:
            self.close()
            raise _CounterUnavailable(f"NVML energy counter not readable for cuda:{cuda_index} ({exc})") from exc
        self.name = f"nvml:total_energy_consumption (GPU board, {name})"
        self.detail = (
            f"GPU cuda:{cuda_index} found in NVML {how_found}; whole-board energy, including any other "
            "process on this GPU; CPU and host memory not counted"
        )

    def read(self) -> int:
        return int(self._nvml.nvmlDeviceGetTotalEnergyConsumption(self._handle))

    def joules_between(self, earlier: int, later: int) -> float:
        return (later - earlier) / 1000.0

    def close(self) -> None:
        # Shutting down is best effort: the reading is already taken.
        with contextlib.suppress(Exception):
            self._nvml.nvmlShutdown()


def _nvml_handle(pynvml: Any, cuda_index: int) -> tuple[Any, str]:
    """NVML handle of the GPU that torch calls cuda:<cuda_index>, and how it was matched."""
    # torch's UUID names the same board NVML sees, whatever CUDA_VISIBLE_DEVICES and CUDA_DEVICE_ORDER say.
    uuid = _torch_gpu_uuid(cuda_index)
    if uuid is not None:
        return pynvml.nvmlDeviceGetHandleByUUID(uuid), f"by UUID {uuid}"
    visible = [entry.strip() for entry in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if entry.strip()]
    if cuda_index < len(visible):
        entry = visible[cuda_index]
        if entry.startswith(("GPU-", "MIG-")):
            return pynvml.nvmlDeviceGetHandleByUUID(entry), f"by UUID {entry} from CUDA_VISIBLE_DEVICES"
        # A number here is a CUDA ordinal; it matches NVML's numbering when CUDA_DEVICE_ORDER=PCI_BUS_ID.
        return pynvml.nvmlDeviceGetHandleByIndex(int(entry)), f"as NVML index {entry} from CUDA_VISIBLE_DEVICES"
    return pynvml.nvmlDeviceGetHandleByIndex(cuda_index), f"as NVML index {cuda_index}"


def _torch_gpu_uuid(cuda_index: int) -> str | None:
    try:
        if not torch.cuda.is_available():
            return None
        uuid = str(torch.cuda.get_device_properties(cuda_index).uuid)
    except Exception:  # older torch without .uuid, or a device torch cannot open
        return None
    return uuid if uuid.startswith(("GPU-", "MIG-")) else f"GPU-{uuid}"


class _RaplCounter:
    """Sum of the RAPL package-domain counters under the powercap tree (microjoules, each wraps)."""

    measured = True
    can_wrap = True

    def __init__(self, powercap_root: Path):
        if not powercap_root.is_dir():
            raise _CounterUnavailable(f"{powercap_root} not found")
        packages: dict[str, tuple[Path, int]] = {}
        # Top-level zones "intel-rapl:N" are packages (or psys); subzones "intel-rapl:N:M" are core, uncore,
        # dram and are already inside their package. Names dedupe zones the tree lists twice.
        for zone in sorted(powercap_root.glob("intel-rapl:*")):
            try:
                name = (zone / "name").read_text().strip()
            except OSError:
                continue
            if not name.startswith("package") or name in packages:
                continue
            try:
                max_range = int((zone / "max_energy_range_uj").read_text())
                int((zone / "energy_uj").read_text())
            except PermissionError as exc:
                raise _CounterUnavailable(f"RAPL counter not readable ({exc.strerror}: {zone / 'energy_uj'})") from exc
            except (OSError, ValueError) as exc:
                raise _CounterUnavailable(f"RAPL zone {zone} unreadable ({exc})") from exc
            packages[name] = (zone / "energy_uj", max_range)
        if not packages:
            raise _CounterUnavailable(f"no RAPL package domain under {powercap_root}")
        self._packages = list(packages.values())
        self.name = f"rapl:package (sum of {len(self._packages)} packages)"
        self.detail = (
            f"RAPL package domains {', '.join(sorted(packages))} under {powercap_root}; whole CPU packages, "
            "including any other process on them; GPU not counted"
        )

    def read(self) -> list[int]:
        return [int(path.read_text()) for path, _ in self._packages]

    def joules_between(self, earlier: list[int], later: list[int]) -> float:
        total_uj = 0
        for (_, max_range), before, after in zip(self._packages, earlier, later, strict=True):
            # A counter that went down wrapped past max_energy_range_uj (polling keeps it to one wrap).
            total_uj += after - before if after >= before else after + max_range - before
        return total_uj / 1e6

    def close(self) -> None:
        pass


class _CpuTimeEstimate:
    """Not a meter: CPU-seconds of this process and its children times an assumed power per busy core."""

    measured = False
    can_wrap = False

    def __init__(self, watts_per_core: float, why_no_counter: str):
        self.watts_per_core = watts_per_core
        self.name = f"estimated: CPU-seconds x {watts_per_core!r} W per busy core (no RAPL or NVML counter readable)"
        self.detail = (
            f"{why_no_counter}; CPU time is user+system of this process and of its children that have "
            f"exited and been waited for (getrusage); the wattage is an assumption (set ${WATTS_ENV_VAR})"
        )

    def read(self) -> float:
        own = resource.getrusage(resource.RUSAGE_SELF)
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime

    def joules_between(self, earlier: float, later: float) -> float:
        return (later - earlier) * self.watts_per_core

    def close(self) -> None:
        pass


def estimated_watts_per_core() -> float:
    """The estimate's power per busy core: $READAPT_CPU_WATTS_PER_CORE, else ESTIMATED_WATTS_PER_BUSY_CORE."""
    raw = os.environ.get(WATTS_ENV_VAR)
    if raw is None or not raw.strip():
        return float(ESTIMATED_WATTS_PER_BUSY_CORE)
    try:
        watts = float(raw)
    except ValueError:
        watts = -1.0
    if not watts > 0 or watts == float("inf"):
        raise ConfigError(f"${WATTS_ENV_VAR} must be a positive number of watts, got {raw!r}")
    return watts


def _cuda_index(device: torch.device) -> int:
    if device.index is not None:
        return device.index
    try:
        return torch.cuda.current_device() if torch.cuda.is_available() else 0
    except Exception:
        return 0


def _choose_counter(device: torch.device) -> _NvmlCounter | _RaplCounter | _CpuTimeEstimate:
    why_not: list[str] = []
    if device.type == "cuda":
        try:
            return _NvmlCounter(_cuda_index(device))
        except _CounterUnavailable as exc:
            why_not.append(f"NVML: {exc}")
    try:
        counter: _RaplCounter | _CpuTimeEstimate = _RaplCounter(POWERCAP_ROOT)
    except _CounterUnavailable as exc:
        why_not.append(f"RAPL: {exc}")
        counter = _CpuTimeEstimate(estimated_watts_per_core(), "; ".join(why_not))
    else:
        if why_not:
            counter.detail = f"{'; '.join(why_not)}; {counter.detail}"
    if device.type == "cuda":
        # The work ran on a GPU this meter cannot see: say so where the meter name is shown, not only in detail.
        counter.name = f"{counter.name[:-1]}; GPU energy not counted)"
    return counter


class EnergyMeter:
    """Energy of the work between start() and stop(); see the module docstring for the meters."""

    def __init__(self, device: torch.device | str = "cpu", poll_seconds: float | None = DEFAULT_POLL_SECONDS):
        self.device = torch.device(device)
        self.poll_seconds = poll_seconds
        self._counter: _NvmlCounter | _RaplCounter | _CpuTimeEstimate | None = None
        self._lock = threading.Lock()
        self._stop_polling = threading.Event()
        self._poller: threading.Thread | None = None
        self._poll_error = ""

    def start(self) -> None:
        if self._counter is not None:
            raise RuntimeError("EnergyMeter.start() called twice without stop()")
        self._counter = _choose_counter(self.device)
        self._joules = 0.0
        self._last = self._counter.read()
        if self._counter.can_wrap and self.poll_seconds:
            self._stop_polling.clear()
            self._poller = threading.Thread(target=self._poll_until_stopped, name="energy-meter", daemon=True)
            self._poller.start()

    def poll(self) -> None:
        """Fold the energy since the last read into the total (keeps wrapping counters to one wrap)."""
        if self._counter is None:
            raise RuntimeError("EnergyMeter.poll() before start()")
        with self._lock:
            now = self._counter.read()
            self._joules += self._counter.joules_between(self._last, now)
            self._last = now

    def _poll_until_stopped(self) -> None:
        while not self._stop_polling.wait(self.poll_seconds):
            try:
                self.poll()
            except OSError as exc:
                self._poll_error = f"; periodic read failed, so wraps may be missed ({exc})"
                return

    def stop(self) -> EnergyReading:
        if self._counter is None:
            raise RuntimeError("EnergyMeter.stop() before start()")
        if self._poller is not None:
            self._stop_polling.set()
            self._poller.join()
            self._poller = None
        counter = self._counter
        try:
            self.poll()
        finally:
            counter.close()
            self._counter = None
        return EnergyReading(
            joules=self._joules, meter=counter.name, measured=counter.measured, detail=counter.detail + self._poll_error
        )


def describe_energy_meter(device: torch.device | str = "cpu") -> str:
    """Which meter EnergyMeter(device) would use here, and why."""
    counter = _choose_counter(torch.device(device))
    counter.close()
    kind = "measured" if counter.measured else "an estimate, not a measurement"
    return f"{counter.name} [{kind}]: {counter.detail}"
