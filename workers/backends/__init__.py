"""Model backends. A loaded model runs a batch with `execute(items, params) -> BatchOutput` (outputs in order, plus
what the batch cost); `run` is the outputs alone, for callers that want only those."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from ragq.core.errors import BackendUnavailable
from workers.models import ModelSpec


@dataclass
class BatchOutput:
    """One batch's outputs and what it cost, as the backend measured it (None where it measures nothing)."""

    outputs: list[Any]
    device_ms: float | None = None       # the batch's span on the device's stream (CUDA events)
    peak_bytes: int | None = None        # activation peak above the weights
    alloc_retries: int = 0               # allocations that first had to free cached device memory (synchronising)
    # where run time went (ms): prep = tokenising and padding, launch = queuing the forward passes (the CPU's
    # part), passes_gpu = the passes on the device, tail = waiting and copying out; real/padded tokens, passes
    phases: dict[str, float] = field(default_factory=dict)


class LoadedModel(Protocol):
    spec: ModelSpec
    name: str
    nbytes: int
    takes_priority: bool      # the backend queues work itself and takes params["urgent"] (Triton's priority levels)

    def execute(self, items: list[Any], params: dict[str, Any]) -> BatchOutput: ...

    def run(self, items: list[Any], params: dict[str, Any]) -> list[Any]: ...

    def count_tokens(self, items: list[Any]) -> list[int]: ...

    def sleep(self) -> None:
        """Device -> pinned host RAM (a no-op where the device is the host)."""

    def wake(self, asynchronous: bool = False) -> Any:
        """Host -> device; returns None when done, or a handle whose wait() orders later work after the copy."""

    def prepare_host_copy(self) -> None:
        """Make the pinned host copy ahead of a sleep (off the engine's thread); a no-op where there is none."""

    def unload(self) -> None: ...


class ModelBase:
    """Defaults shared by the backends: `run` is `execute`'s outputs; no priority levels; no host copy to prepare."""

    takes_priority = False

    def execute(self, items: list[Any], params: dict[str, Any]) -> BatchOutput:
        raise NotImplementedError

    def run(self, items: list[Any], params: dict[str, Any]) -> list[Any]:
        return self.execute(items, params).outputs

    def prepare_host_copy(self) -> None:
        return None


def load_model(spec: ModelSpec, device: str) -> LoadedModel:
    """Load `spec` onto `device` with its configured backend."""
    if spec.backend == "torch":
        from workers.backends.loading import load_torch_model

        return load_torch_model(spec, device)
    if spec.backend == "triton":
        from workers.backends.triton_backend import load_triton_model

        return load_triton_model(spec, device)
    raise BackendUnavailable(f"model {spec.name}: backend {spec.backend!r} is not available")
