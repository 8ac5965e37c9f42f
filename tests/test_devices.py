"""Memory probes on a machine with no NVIDIA driver: NVML raises NVMLError_LibraryNotFound, ragq falls back."""

import pynvml
import pytest

from ragq.core.errors import BadInput
from workers.devices import device_kind, device_memory, gpu_count, parse_device


def test_nvml_is_really_absent_here_and_probes_fall_back() -> None:
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        assert isinstance(exc, pynvml.NVMLError_LibraryNotFound) or "NVML" in type(exc).__name__
    else:  # a machine with a driver: the probes must agree with NVML
        count = pynvml.nvmlDeviceGetCount()
        pynvml.nvmlShutdown()
        assert gpu_count() == count
        return
    assert gpu_count() == 0
    assert device_memory("cpu").source == "none"
    assert device_kind("cpu") == "cpu"


@pytest.mark.parametrize(("text", "device"), [("cpu", "cpu"), ("all", "all"), ("cuda:1", "cuda:1"), ("0", "cuda:0")])
def test_parse_device(text: str, device: str) -> None:
    assert parse_device(text) == device


def test_parse_device_rejects_nonsense() -> None:
    with pytest.raises(BadInput, match="--device"):
        parse_device("gpu-please")


def test_nvml_index_follows_cuda_visible_devices() -> None:
    from workers.devices import nvml_index

    assert nvml_index("cuda:0", visible="") == 0
    assert nvml_index("cuda:1", visible="") == 1
    assert nvml_index("cuda:0", visible="3") == 3          # `--device all` gives each worker one GPU as cuda:0
    assert nvml_index("cuda:1", visible="2,5") == 5
    assert nvml_index("cuda:0", visible="GPU-8d1c") == 0   # UUIDs: left to CUDA's own numbering


def test_gpu_utilisation_is_absent_without_nvml() -> None:
    from workers.devices import Utilization

    assert Utilization("cpu").read() is None
    assert Utilization("cuda:0").read() is None  # no driver on this machine: no number rather than a made-up one
