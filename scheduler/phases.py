"""The phase plan: which model's work runs next, so that one load serves many jobs.

Urgent work comes first, oldest first. Among background work, a role's claim grows with its pending items and
their age and shrinks with the measured cost of bringing its model in (a resident model costs nothing), so the
engine drains the resident model's backlog before paying for a swap, yet no role waits past `starvation_s`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class RoleLoad:
    role: str
    urgent_items: int
    background_items: int
    oldest_urgent_age_s: float
    oldest_background_age_s: float
    resident: bool
    swap_cost_s: float          # measured load or wake time of its model; 0 when resident


def background_score(load: RoleLoad, aging_s: float = 5.0, horizon_s: float = 2.0) -> float:
    value = load.background_items * (1.0 + load.oldest_background_age_s / aging_s)
    cost = 0.0 if load.resident else load.swap_cost_s
    return value / (1.0 + cost / horizon_s)


def rank_roles(loads: Sequence[RoleLoad], *, starvation_s: float = 30.0) -> list[str]:
    """Roles in the order the engine should try them (it skips those whose model cannot come in yet)."""
    urgent = sorted((l for l in loads if l.urgent_items), key=lambda l: -l.oldest_urgent_age_s)
    background = [l for l in loads if l.background_items and not l.urgent_items]
    starving = sorted((l for l in background if l.oldest_background_age_s >= starvation_s),
                      key=lambda l: -l.oldest_background_age_s)
    rest = sorted((l for l in background if l.oldest_background_age_s < starvation_s),
                  key=lambda l: (-background_score(l), l.role))
    # a role with urgent work may also have background work: it is already first
    return [l.role for l in urgent] + [l.role for l in starving] + [l.role for l in rest]
