"""Device memory budgets, in bytes (sizes are parsed in the ground package, ragq.core.sizes)."""

from __future__ import annotations

from ragq.core.sizes import format_size, parse_size


def device_budget(total_bytes: int, buffer_fraction: float, explicit_bytes: int | None = None) -> int:
    """The share of a device's memory ragq may fill.

    An explicit size wins but never exceeds the device; otherwise total x (1 - buffer).
    """
    if not 0.0 <= buffer_fraction < 1.0:
        raise ValueError(f"buffer fraction {buffer_fraction} must be in [0, 1)")
    if explicit_bytes is not None:
        return min(explicit_bytes, total_bytes) if total_bytes > 0 else explicit_bytes
    return int(total_bytes * (1.0 - buffer_fraction))


__all__ = ["device_budget", "format_size", "parse_size"]
