"""Helpers shared by tasks: the publish time header and the engine deadline of a request."""

from __future__ import annotations

import time
from typing import Any

from workers.celery_app import SENT_AT_HEADER


def sent_at(request: Any) -> float | None:
    value = request.get(SENT_AT_HEADER) if hasattr(request, "get") else None
    if value is None and getattr(request, "headers", None):
        value = request.headers.get(SENT_AT_HEADER)
    try:
        return float(value) if value is not None else None
    except (TypeError, ValueError):
        return None


def engine_deadline(deadline_epoch: float | None) -> float | None:
    """Convert a wall-clock deadline (epoch seconds, as carried in messages) to the engine's monotonic clock."""
    if deadline_epoch is None:
        return None
    return time.monotonic() + (deadline_epoch - time.time())
