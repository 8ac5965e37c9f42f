"""Device discovery and memory probes: NVML (nvidia-ml-py) where a driver exists, torch otherwise, and a clean
fallback on machines with no NVIDIA driver (nvmlInit raises NVMLError_LibraryNotFound there)."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import Any

from ragq.core.errors import BadInput

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DeviceMemory:
    total_bytes: int
    used_bytes: int
    source: str  # nvml | torch | none


def gpu_count() -> int:
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            return int(pynvml.nvmlDeviceGetCount())
        finally:
            pynvml.nvmlShutdown()
    except Exception as exc:  # NVMLError_LibraryNotFound and friends: no driver here
        log.debug("NVML unavailable: %s", exc)
    try:
        import torch

        return int(torch.cuda.device_count()) if torch.cuda.is_available() else 0
    except Exception:
        return 0


def nvml_index(device: str, visible: str | None = None) -> int:
    """NVML counts every GPU of the machine; CUDA (and torch) only those in CUDA_VISIBLE_DEVICES, renumbered from
    0. `--device all` runs each worker with one visible GPU as cuda:0: its NVML index is the listed one."""
    index = int(device.split(":", 1)[1]) if ":" in device else 0
    visible = os.environ.get("CUDA_VISIBLE_DEVICES") if visible is None else visible
    listed = [v.strip() for v in (visible or "").split(",") if v.strip()]
    if listed and all(v.isdigit() for v in listed) and index < len(listed):
        return int(listed[index])
    return index


class Utilization:
    """The GPU's busy share from NVML (`nvmlDeviceGetUtilizationRates`), read at most once a second; None where
    NVML is unavailable (no driver, or a CPU device)."""

    def __init__(self, device: str) -> None:
        self.device = device
        self._handle: object | None = None
        self._failed = not device.startswith("cuda")
        self._at = float("-inf")
        self._value: float | None = None

    def read(self) -> float | None:
        if self._failed:
            return None
        now = time.monotonic()
        if now - self._at < 1.0:
            return self._value
        self._at = now
        try:
            import pynvml

            if self._handle is None:
                pynvml.nvmlInit()
                self._handle = pynvml.nvmlDeviceGetHandleByIndex(nvml_index(self.device))
            self._value = pynvml.nvmlDeviceGetUtilizationRates(self._handle).gpu / 100.0
        except Exception as exc:
            log.debug("GPU utilisation unavailable for %s: %s", self.device, exc)
            self._failed = True
            self._value = None
        return self._value


def _from_nvml(device: str, read: Any) -> Any:
    """`read(pynvml, handle)` for a CUDA device, or None where NVML cannot say (no driver library here)."""
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            return read(pynvml, pynvml.nvmlDeviceGetHandleByIndex(nvml_index(device)))
        finally:
            pynvml.nvmlShutdown()
    except Exception as exc:
        log.debug("NVML unavailable for %s: %s", device, exc)
        return None


def _torch_index(device: str) -> int:
    return int(device.split(":", 1)[1]) if ":" in device else 0


def device_memory(device: str) -> DeviceMemory:
    if not device.startswith("cuda"):
        return DeviceMemory(0, 0, "none")

    def read(nvml: Any, handle: Any) -> DeviceMemory:
        info = nvml.nvmlDeviceGetMemoryInfo(handle)
        return DeviceMemory(int(info.total), int(info.used), "nvml")

    found = _from_nvml(device, read)
    if found is not None:
        return found
    import torch

    free, total = torch.cuda.mem_get_info(_torch_index(device))
    return DeviceMemory(int(total), int(total - free), "torch")


def device_capability(device: str) -> tuple[str, tuple[int, int]]:
    """A CUDA device's name and compute capability, from NVML where it is (no torch import in the worker), else
    from torch."""

    def read(nvml: Any, handle: Any) -> tuple[str, tuple[int, int]]:
        name = nvml.nvmlDeviceGetName(handle)
        major, minor = nvml.nvmlDeviceGetCudaComputeCapability(handle)
        return (name.decode() if isinstance(name, bytes) else str(name)), (int(major), int(minor))

    found = _from_nvml(device, read)
    if found is not None:
        return found
    import torch

    major, minor = torch.cuda.get_device_capability(_torch_index(device))
    return str(torch.cuda.get_device_name(_torch_index(device))), (int(major), int(minor))


def parse_device(text: str) -> str:
    value = text.strip().lower()
    if value in ("cpu", "all"):
        return value
    if value.startswith("cuda:") and value[5:].isdigit():
        return value
    if value.isdigit():
        return f"cuda:{value}"
    raise BadInput("--device", f"{text!r} is not cpu, cuda:N or all")


def device_kind(device: str) -> str:
    """What a footprint was measured on: the GPU's name, or cpu."""
    if not device.startswith("cuda"):
        return "cpu"
    import torch

    return str(torch.cuda.get_device_name(int(device.split(":", 1)[1]) if ":" in device else 0))
