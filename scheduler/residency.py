"""Which models to evict so that another fits the device budget (first version: LRU among idle models)."""

from __future__ import annotations

from collections.abc import Mapping, Set
from dataclasses import dataclass

from ragq.errors import BudgetExceeded


@dataclass(frozen=True)
class Resident:
    name: str
    nbytes: int
    last_used: float


def plan_admission(
    resident: Mapping[str, Resident],
    incoming: str,
    incoming_bytes: int,
    budget_bytes: int,
    busy: Set[str] = frozenset(),
) -> list[str]:
    """Names to evict, least recently used first, so that `incoming` fits next to what stays.

    Models in `busy` (needed by pending work) are evicted only if idle ones are not enough. Raises BudgetExceeded
    when the model alone is larger than the budget.
    """
    if incoming_bytes > budget_bytes:
        raise BudgetExceeded(
            f"model {incoming} needs {incoming_bytes} bytes, more than the whole budget of {budget_bytes}"
        )
    others = [r for name, r in resident.items() if name != incoming]
    used = sum(r.nbytes for r in others)
    if used + incoming_bytes <= budget_bytes:
        return []
    order = sorted(others, key=lambda r: (r.name in busy, r.last_used))
    evict: list[str] = []
    for candidate in order:
        evict.append(candidate.name)
        used -= candidate.nbytes
        if used + incoming_bytes <= budget_bytes:
            break
    return evict
