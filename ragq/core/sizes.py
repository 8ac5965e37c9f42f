"""Sizes in bytes: parsed by pydantic's ByteSize ('16GiB', '512MB', '1000'), written back in binary units."""

from __future__ import annotations

from pydantic import ByteSize, TypeAdapter, ValidationError

_BYTES = TypeAdapter(ByteSize)


def parse_size(text: str) -> int:
    """'16GiB' -> 17179869184; '512MB' -> 512000000; '1000' -> 1000. Raises ValueError naming the text."""
    try:
        value = int(_BYTES.validate_python(text.strip() if isinstance(text, str) else text))
    except ValidationError:
        raise ValueError(f"{text!r} is not a size (examples: 16GiB, 512MiB, 8GB, 1000000)") from None
    if value <= 0:
        raise ValueError(f"{text!r}: a size must be positive")
    return value


def format_size(num_bytes: int | float) -> str:
    """1610612736 -> '1.50GiB'; 100 -> '100B' (never larger units than GiB: budgets read in GiB)."""
    value = float(num_bytes)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            return f"{value:.0f}{unit}" if unit == "B" else f"{value:.2f}{unit}"
        value /= 1024
    return f"{value:.2f}GiB"
