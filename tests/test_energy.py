"""EnergyMeter: the CPU-time estimate, RAPL through a fake powercap tree, and NVML through a fake pynvml."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest

from readapt import energy
from readapt.energy import EnergyMeter, describe_energy_meter
from readapt.errors import ConfigError


def _burn_cpu(seconds: float = 0.2) -> None:
    import time

    end = time.process_time() + seconds
    total = 0
    while time.process_time() < end:
        total += sum(i * i for i in range(1000))


@pytest.fixture
def no_powercap(tmp_path, monkeypatch):
    monkeypatch.setattr(energy, "POWERCAP_ROOT", tmp_path / "no-powercap-here")
    monkeypatch.delenv(energy.WATTS_ENV_VAR, raising=False)


def test_estimate_is_labelled_as_an_estimate(no_powercap):
    meter = EnergyMeter("cpu")
    meter.start()
    _burn_cpu(0.2)
    reading = meter.stop()
    assert reading.measured is False
    assert reading.meter.startswith("estimated:")
    assert "10.0 W per busy core" in reading.meter
    # 0.2 s of CPU at 10 W is about 2 J; allow for scheduler noise and the interpreter's own work.
    assert 1.0 < reading.joules < 20.0
    assert "RAPL" in reading.detail
    assert describe_energy_meter("cpu").startswith("estimated:")


def test_estimate_wattage_from_environment(no_powercap, monkeypatch):
    monkeypatch.setenv(energy.WATTS_ENV_VAR, "25")
    meter = EnergyMeter("cpu")
    meter.start()
    _burn_cpu(0.1)
    reading = meter.stop()
    assert "25.0 W per busy core" in reading.meter
    assert reading.joules > 0

    monkeypatch.setenv(energy.WATTS_ENV_VAR, "-3")
    with pytest.raises(ConfigError, match=energy.WATTS_ENV_VAR):
        EnergyMeter("cpu").start()


def _zone(root: Path, zone: str, name: str, energy_uj: int, max_range_uj: int = 1_000_000_000) -> Path:
    path = root / zone
    path.mkdir(parents=True)
    (path / "name").write_text(name + "\n")
    (path / "energy_uj").write_text(f"{energy_uj}\n")
    (path / "max_energy_range_uj").write_text(f"{max_range_uj}\n")
    return path


def _set_uj(zone: Path, energy_uj: int) -> None:
    (zone / "energy_uj").write_text(f"{energy_uj}\n")


def test_rapl_sums_packages_and_handles_wraparound(tmp_path, monkeypatch):
    root = tmp_path / "powercap"
    package0 = _zone(root, "intel-rapl:0", "package-0", 999_000_000)  # 1 J before its wrap at 1000 J
    package1 = _zone(root, "intel-rapl:1", "package-1", 5_000_000)
    core = _zone(root, "intel-rapl:0:0", "core", 0)  # inside package-0: must not be added again
    dram = _zone(root, "intel-rapl:1:0", "dram", 0)
    monkeypatch.setattr(energy, "POWERCAP_ROOT", root)

    meter = EnergyMeter("cpu", poll_seconds=None)
    meter.start()
    _set_uj(package0, 2_000_000)  # wrapped: 1 J up to the wrap + 2 J after it
    _set_uj(package1, 9_000_000)  # +4 J
    _set_uj(core, 500_000_000)
    _set_uj(dram, 500_000_000)
    reading = meter.stop()

    assert reading.measured is True
    assert reading.meter == "rapl:package (sum of 2 packages)"
    assert reading.joules == pytest.approx(7.0)
    assert "package-0" in reading.detail and "package-1" in reading.detail


def test_rapl_polling_catches_repeated_wraps(tmp_path, monkeypatch):
    root = tmp_path / "powercap"
    package = _zone(root, "intel-rapl:0", "package-0", 0, max_range_uj=10_000_000)  # wraps every 10 J
    monkeypatch.setattr(energy, "POWERCAP_ROOT", root)

    meter = EnergyMeter("cpu", poll_seconds=None)
    meter.start()
    for counter_uj in (6_000_000, 2_000_000, 8_000_000, 4_000_000):  # +6, +6 (wrap), +6, +6 (wrap)
        _set_uj(package, counter_uj)
        meter.poll()
    assert meter.stop().joules == pytest.approx(24.0)


def test_unreadable_rapl_falls_back_to_estimate(tmp_path, monkeypatch):
    root = tmp_path / "powercap"
    package = _zone(root, "intel-rapl:0", "package-0", 0)
    original_read_text = Path.read_text

    def read_text(self, *args, **kwargs):
        if self == package / "energy_uj":
            raise PermissionError(13, "Permission denied")  # what non-root users get on recent kernels
        return original_read_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", read_text)
    monkeypatch.setattr(energy, "POWERCAP_ROOT", root)
    meter = EnergyMeter("cpu")
    meter.start()
    reading = meter.stop()
    assert reading.measured is False
    assert reading.meter.startswith("estimated:")
    assert "Permission denied" in reading.detail


class _FakeNvmlError(Exception):
    pass


def _fake_pynvml(energy_mj: list[int], supported: bool = True) -> types.ModuleType:
    """A pynvml stand-in whose energy counter returns the next value of energy_mj on each call."""
    module = types.ModuleType("pynvml")
    module.NVMLError = _FakeNvmlError
    module.calls = []
    readings = iter(energy_mj)

    module.nvmlInit = lambda: module.calls.append("init")
    module.nvmlShutdown = lambda: module.calls.append("shutdown")

    def by_index(index):
        module.calls.append(("by_index", index))
        return f"handle-{index}"

    def by_uuid(uuid):
        module.calls.append(("by_uuid", uuid))
        return f"handle-{uuid}"

    def total_energy(handle):
        if not supported:
            raise _FakeNvmlError("Not Supported")
        return next(readings)

    module.nvmlDeviceGetHandleByIndex = by_index
    module.nvmlDeviceGetHandleByUUID = by_uuid
    module.nvmlDeviceGetName = lambda handle: b"Fake GPU 80GB"
    module.nvmlDeviceGetTotalEnergyConsumption = total_energy
    return module


def test_nvml_counter_in_millijoules(monkeypatch):
    # probe at start-up, start reading, stop reading
    fake = _fake_pynvml([1_000_000, 1_000_000, 1_234_500])
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    monkeypatch.setattr(energy, "_torch_gpu_uuid", lambda index: None)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)

    meter = EnergyMeter("cuda:1")
    meter.start()
    reading = meter.stop()
    assert reading.measured is True
    assert reading.meter == "nvml:total_energy_consumption (GPU board, Fake GPU 80GB)"
    assert reading.joules == pytest.approx(234.5)
    assert ("by_index", 1) in fake.calls
    assert fake.calls[-1] == "shutdown"


def test_nvml_honours_cuda_visible_devices(monkeypatch):
    monkeypatch.setattr(energy, "_torch_gpu_uuid", lambda index: None)

    fake = _fake_pynvml([0, 0, 1000])
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,2")
    meter = EnergyMeter("cuda:1")
    meter.start()
    assert meter.stop().joules == pytest.approx(1.0)
    assert ("by_index", 2) in fake.calls

    fake = _fake_pynvml([0, 0, 1000])
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-aaaa,GPU-bbbb")
    meter = EnergyMeter("cuda:0")
    meter.start()
    meter.stop()
    assert ("by_uuid", "GPU-aaaa") in fake.calls


def test_nvml_unsupported_falls_back_and_says_why(monkeypatch, no_powercap):
    fake = _fake_pynvml([], supported=False)
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    monkeypatch.setattr(energy, "_torch_gpu_uuid", lambda index: None)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)

    meter = EnergyMeter("cuda:0")
    meter.start()
    _burn_cpu(0.05)
    reading = meter.stop()
    assert reading.measured is False
    assert reading.meter.startswith("estimated:")
    assert "GPU energy not counted" in reading.meter
    assert "NVML" in reading.detail and "Not Supported" in reading.detail
    assert "shutdown" in fake.calls  # NVML is released even when its counter is unusable
    assert "GPU energy not counted" in describe_energy_meter("cuda:0")
