"""What runs next (first version): urgent before background, oldest first, one role per micro-batch."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Hashable

URGENT = 0
BACKGROUND = 1
PRIORITY_NAMES = {URGENT: "urgent", BACKGROUND: "background"}


@dataclass(frozen=True)
class Pending:
    """A snapshot of one pending request as the scheduler sees it."""

    key: int                # the engine's request id
    role: str
    group: Hashable         # requests with equal (role, group) may share a micro-batch
    priority: int
    enqueued: float
    remaining: int          # items not yet run
    deadline: float | None = None


def expired(pending: Sequence[Pending], now: float) -> list[int]:
    return [p.key for p in pending if p.deadline is not None and p.deadline <= now]


def next_batch(pending: Sequence[Pending], max_items: int) -> list[tuple[int, int]]:
    """[(request key, items to take)] for the next micro-batch: the head is the most urgent, oldest request; others
    of the same role and group join in priority then age order until `max_items`."""
    if not pending:
        return []
    order = sorted(pending, key=lambda p: (p.priority, p.enqueued, p.key))
    head = order[0]
    plan: list[tuple[int, int]] = []
    room = max_items
    for p in order:
        if room <= 0:
            break
        if p.role != head.role or p.group != head.group or p.remaining <= 0:
            continue
        take = min(room, p.remaining)
        plan.append((p.key, take))
        room -= take
    return plan
