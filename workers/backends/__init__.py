"""Model backends. Each loaded model exposes `run(items, params) -> outputs` and `count_tokens(items)`."""

from __future__ import annotations

from typing import Any, Protocol

from workers.models import ModelSpec


class LoadedModel(Protocol):
    spec: ModelSpec
    name: str
    nbytes: int

    def run(self, items: list[Any], params: dict[str, Any]) -> list[Any]: ...

    def count_tokens(self, items: list[Any]) -> list[int]: ...

    def sleep(self) -> None:
        """Device -> pinned host RAM (a no-op where the device is the host)."""

    def wake(self, asynchronous: bool = False) -> Any:
        """Host -> device; returns None when done, or a handle whose wait() orders later work after the copy."""

    def unload(self) -> None: ...


def load_model(spec: ModelSpec, device: str) -> LoadedModel:
    """Load `spec` onto `device` with its configured backend."""
    if spec.backend == "torch":
        from workers.backends.torch_backend import load_torch_model

        return load_torch_model(spec, device)
    if spec.backend == "triton":
        from workers.backends.triton_backend import load_triton_model

        return load_triton_model(spec, device)
    from ragq.core.errors import BackendUnavailable

    raise BackendUnavailable(f"model {spec.name}: backend {spec.backend!r} is not available")
