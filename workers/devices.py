"""Device discovery and memory probes: NVML (nvidia-ml-py) where a driver exists, torch otherwise, and a clean
fallback on machines with no NVIDIA driver (nvmlInit raises NVMLError_LibraryNotFound there)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

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


def device_memory(device: str) -> DeviceMemory:
    if not device.startswith("cuda"):
        return DeviceMemory(0, 0, "none")
    index = int(device.split(":", 1)[1]) if ":" in device else 0
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            info = pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(index))
            return DeviceMemory(int(info.total), int(info.used), "nvml")
        finally:
            pynvml.nvmlShutdown()
    except Exception as exc:
        log.debug("NVML unavailable for %s: %s", device, exc)
    import torch

    free, total = torch.cuda.mem_get_info(index)
    return DeviceMemory(int(total), int(total - free), "torch")


def parse_device(text: str) -> str:
    from ragq.errors import BadInput

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
