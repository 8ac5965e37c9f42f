"""Device memory that keeps its addresses across a sleep: a virtual address range reserved once (CUDA's virtual
memory management, through the driver API of `cuda-python`), whose physical memory is released when the model
sleeps and mapped again, at the same addresses, when it wakes — as vLLM's CuMem allocator does for its sleep mode.

The generator's weights and KV cache live in one such range, so the CUDA graphs captured for its decode steps stay
valid across a sleep and a wake (a recapture costs more than the wake itself). Where the driver API is not there,
`available()` says why and the generator sleeps the ordinary way (its graphs are captured again after a wake).
"""

from __future__ import annotations

import logging
from typing import Any

import torch

log = logging.getLogger(__name__)


def _driver() -> Any:
    from cuda.bindings import driver

    return driver


def available() -> str | None:
    """None when ranges can be made here, else why not."""
    try:
        _driver()
    except Exception as exc:  # noqa: BLE001 - any import problem means: not here
        return f"cuda-python's driver API is not importable ({exc})"
    return None


def _check(result: Any, what: str) -> Any:
    err = result[0] if isinstance(result, tuple) else result
    if int(err) != 0:
        raise RuntimeError(f"{what} failed: CUDA error {int(err)}")
    if isinstance(result, tuple):
        return result[1] if len(result) == 2 else result[1:]
    return None


class _Window:
    """What torch needs to see a device pointer as a tensor (the CUDA array interface)."""

    def __init__(self, address: int, nbytes: int) -> None:
        self.__cuda_array_interface__ = {"shape": (nbytes,), "typestr": "|u1", "data": (address, False),
                                         "version": 3, "strides": None}


class StableRange:
    """`nbytes` of device memory at a fixed address: `release()` frees the physical memory (the address stays
    reserved), `remap()` maps new physical memory there. `tensor` is a uint8 view of the whole range."""

    def __init__(self, nbytes: int, device: torch.device) -> None:
        cu = _driver()
        self.cu = cu
        self.device = device
        prop = cu.CUmemAllocationProp()
        prop.type = cu.CUmemAllocationType.CU_MEM_ALLOCATION_TYPE_PINNED
        prop.location.type = cu.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
        prop.location.id = device.index or 0
        self.prop = prop
        granularity = int(_check(cu.cuMemGetAllocationGranularity(
            prop, cu.CUmemAllocationGranularity_flags.CU_MEM_ALLOC_GRANULARITY_MINIMUM), "cuMemGetAllocationGranularity"))
        self.nbytes = -(-nbytes // granularity) * granularity
        self.address = int(_check(cu.cuMemAddressReserve(self.nbytes, granularity, 0, 0), "cuMemAddressReserve"))
        self.handle: Any = None
        self.remap()
        self.tensor = torch.as_tensor(_Window(self.address, self.nbytes), device=device)
        assert self.tensor.data_ptr() == self.address

    @property
    def mapped(self) -> bool:
        return self.handle is not None

    def remap(self) -> None:
        if self.handle is not None:
            return
        cu = self.cu
        self.handle = _check(cu.cuMemCreate(self.nbytes, self.prop, 0), "cuMemCreate")
        _check(cu.cuMemMap(self.address, self.nbytes, 0, self.handle, 0), "cuMemMap")
        access = cu.CUmemAccessDesc()
        access.location = self.prop.location
        access.flags = cu.CUmemAccess_flags.CU_MEM_ACCESS_FLAGS_PROT_READWRITE
        _check(cu.cuMemSetAccess(self.address, self.nbytes, [access], 1), "cuMemSetAccess")

    def release(self) -> None:
        """Free the physical memory; the caller has synchronised (no kernel may still use the range)."""
        if self.handle is None:
            return
        _check(self.cu.cuMemUnmap(self.address, self.nbytes), "cuMemUnmap")
        _check(self.cu.cuMemRelease(self.handle), "cuMemRelease")
        self.handle = None

    def close(self) -> None:
        self.release()
        _check(self.cu.cuMemAddressFree(self.address, self.nbytes), "cuMemAddressFree")


class Carver:
    """Hands out aligned, shaped tensors from a range in order."""

    ALIGN = 256

    def __init__(self, stable: StableRange) -> None:
        self.stable = stable
        self.offset = 0

    def take(self, shape: tuple[int, ...] | torch.Size, dtype: torch.dtype) -> torch.Tensor:
        nbytes = int(torch.Size(shape).numel()) * torch.empty((), dtype=dtype).element_size()
        start = -(-self.offset // self.ALIGN) * self.ALIGN
        if start + nbytes > self.stable.nbytes:
            raise RuntimeError("the stable range is too small")
        self.offset = start + nbytes
        # set_ on the range's storage rather than a dtype view of its byte tensor: the result has no `_base`, so
        # torch.compile can trace writes into it (aot_autograd refuses mutations of views with another dtype)
        size = torch.empty((), dtype=dtype).element_size()
        tensor = torch.empty(0, dtype=dtype, device=self.stable.tensor.device)
        return tensor.set_(self.stable.tensor.untyped_storage(), start // size, torch.Size(shape))

    @staticmethod
    def size_of(shapes: list[tuple[tuple[int, ...], torch.dtype]]) -> int:
        total = 0
        for shape, dtype in shapes:
            total = -(-total // Carver.ALIGN) * Carver.ALIGN
            total += int(torch.Size(shape).numel()) * torch.empty((), dtype=dtype).element_size()
        return total
