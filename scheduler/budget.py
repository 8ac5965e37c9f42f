"""Device memory budgets, in bytes."""

from __future__ import annotations

import re

_UNITS = {
    "": 1, "b": 1,
    "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9, "t": 10**12, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_size(text: str) -> int:
    """'16GiB' -> 17179869184; '512MB' -> 512000000; '1000' -> 1000. Raises ValueError naming the text."""
    match = _SIZE.match(text)
    if not match or match.group(2).lower() not in _UNITS:
        raise ValueError(f"{text!r} is not a size (examples: 16GiB, 512MiB, 8GB, 1000000)")
    value = float(match.group(1)) * _UNITS[match.group(2).lower()]
    if value <= 0:
        raise ValueError(f"{text!r}: a size must be positive")
    return int(value)


def format_size(num_bytes: int | float) -> str:
    value = float(num_bytes)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            return f"{value:.0f}{unit}" if unit == "B" else f"{value:.2f}{unit}"
        value /= 1024
    return f"{value:.2f}GiB"


def device_budget(total_bytes: int, buffer_fraction: float, explicit_bytes: int | None = None) -> int:
    """The share of a device's memory ragq may fill.

    An explicit size wins but never exceeds the device; otherwise total x (1 - buffer).
    """
    if not 0.0 <= buffer_fraction < 1.0:
        raise ValueError(f"buffer fraction {buffer_fraction} must be in [0, 1)")
    if explicit_bytes is not None:
        return min(explicit_bytes, total_bytes) if total_bytes > 0 else explicit_bytes
    return int(total_bytes * (1.0 - buffer_fraction))
