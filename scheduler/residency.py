"""Model residency across three tiers: VRAM (active), pinned host RAM (asleep), disk (cold).

Pure decisions over a snapshot and a clock:
- `admit`: the moves that make a model active within the VRAM budget — evict the cheapest set of models
  (`choose_victims`: none that pending work needs or an urgent question expects next if avoidable, then the
  fewest bytes, then least recently used); never evict a model inside its cooldown (minimum residency: a model that
  was just brought in stays that long while work needs it, which is what stops load/unload oscillation under an
  alternating load; an idle one only as long as bringing it back would take, so a cooldown never idles the device
  for more than one swap's time — ski rental), unless the request is urgent; otherwise the answer is `Deferred`
  and the caller runs resident work meanwhile.
  Evicted models go to sleep in pinned host RAM when the host budget has room, else they are unloaded.
- `prewarm`: the moves that wake the next stage's model early, only if that costs no busy or cooling model.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from itertools import combinations

from ragq.core.errors import BudgetExceeded

class Tier(StrEnum):
    """Where a model's weights are (the values are what ragq stores and shows)."""

    VRAM = "vram"      # active on the device
    HOST = "host"      # asleep in pinned host RAM
    DISK = "disk"      # cold


class Action(StrEnum):
    """A residency move between tiers (the values are the model_events' event names)."""

    SLEEP = "sleep"        # vram -> host (keeps a pinned copy; wake is one host-to-device copy)
    UNLOAD = "unload"      # vram -> disk
    DROP_HOST = "drop"     # host -> disk
    WAKE = "wake"          # host -> vram
    LOAD = "load"          # disk -> vram (through host)


VRAM, HOST, DISK = Tier.VRAM, Tier.HOST, Tier.DISK
SLEEP, UNLOAD, DROP_HOST, WAKE, LOAD = Action.SLEEP, Action.UNLOAD, Action.DROP_HOST, Action.WAKE, Action.LOAD


@dataclass(frozen=True)
class ModelView:
    name: str
    tier: Tier
    vram_bytes: int            # measured weights bytes on the device (or the configured first guess)
    host_bytes: int = 0        # bytes of its pinned host copy (equal to vram_bytes once measured)
    last_used: float = 0.0
    resident_since: float | None = None
    pending: int = 0           # pending requests that need it
    expected: bool = False     # a later stage of an urgent question in flight will need it soon
    return_s: float = 0.0      # the measured cost of evicting it and bringing it back (last sleep/unload + wake/load)


@dataclass(frozen=True)
class ResidencyPolicy:
    budget_bytes: int
    host_budget_bytes: int = 0
    cooldown_s: float = 0.0


@dataclass(frozen=True)
class Move:
    model: str
    action: Action
    reason: str


@dataclass(frozen=True)
class Deferred:
    """Admission would evict a model still in its cooldown; retry at `until` (or run resident work meanwhile)."""

    blocking: tuple[str, ...]
    until: float


def cooldown_ends(model: ModelView, policy: ResidencyPolicy) -> float | None:
    """When the model's cooldown stops protecting it: `cooldown_s` after it became resident while work needs it;
    while idle, once it has been idle as long as bringing it back would take (ski rental: holding an idle model
    for more work never costs more than one swap), if that comes first."""
    if model.resident_since is None:
        return None
    end = model.resident_since + policy.cooldown_s
    if model.pending == 0:
        end = min(end, max(model.last_used, model.resident_since) + model.return_s)
    return end


def in_cooldown(model: ModelView, policy: ResidencyPolicy, now: float) -> bool:
    end = cooldown_ends(model, policy)
    return end is not None and now < end


def host_used(models: Mapping[str, ModelView]) -> int:
    return sum(m.host_bytes for m in models.values() if m.tier == HOST)


def _eviction_order(candidates: list[ModelView], policy: ResidencyPolicy, now: float) -> list[ModelView]:
    return sorted(candidates, key=lambda m: (m.pending > 0, in_cooldown(m, policy, now), m.expected, m.last_used,
                                             m.name))


def choose_victims(candidates: list[ModelView], missing: int, policy: ResidencyPolicy, now: float
                   ) -> list[ModelView]:
    """The cheapest set of resident models whose eviction frees `missing` bytes: fewest models that pending work
    needs, then fewest inside their cooldown, then fewest that an urgent question in flight expects next, then the
    fewest bytes (a wake costs about its bytes in copy time), then the least recently used. A question through
    three models that do not fit together thus sleeps the small reranker between questions instead of a 7.5 GiB
    model, and never the model its next stage needs. If even all of them are not enough, all of them."""
    if missing <= 0:
        return []
    if sum(m.vram_bytes for m in candidates) < missing or len(candidates) > 12:
        ordered, victims = _eviction_order(candidates, policy, now), []
        for m in ordered:
            if missing <= 0:
                break
            victims.append(m)
            missing -= m.vram_bytes
        return victims
    best: tuple[tuple[float, ...], tuple[ModelView, ...]] | None = None
    for size in range(1, len(candidates) + 1):
        for combo in combinations(candidates, size):
            freed = sum(m.vram_bytes for m in combo)
            if freed < missing:
                continue
            key = (sum(m.pending > 0 for m in combo), sum(in_cooldown(m, policy, now) for m in combo),
                   sum(m.expected for m in combo), freed, sum(m.last_used for m in combo))
            if best is None or key < best[0]:
                best = (key, combo)
    assert best is not None
    return sorted(best[1], key=lambda m: (m.last_used, m.name))


def evict_moves(
    victims: list[ModelView], models: Mapping[str, ModelView], policy: ResidencyPolicy, reason: str,
    keep: str | None = None,
) -> list[Move]:
    """Sleep each victim to host RAM if the host budget can hold it (dropping older sleepers, never `keep`),
    else unload it."""
    moves: list[Move] = []
    sleepers = sorted((m for m in models.values() if m.tier == HOST and m.name != keep),
                      key=lambda m: (m.last_used, m.name))
    host = host_used(models)
    for victim in victims:
        size = victim.host_bytes or victim.vram_bytes
        if size > policy.host_budget_bytes:
            moves.append(Move(victim.name, UNLOAD, reason + "; too large for the host tier"))
            continue
        while host + size > policy.host_budget_bytes and sleepers:
            dropped = sleepers.pop(0)
            host -= dropped.host_bytes
            moves.append(Move(dropped.name, DROP_HOST, f"host tier full: making room for {victim.name}"))
        moves.append(Move(victim.name, SLEEP, reason))
        host += size
    return moves


def trim_to_budget(models: Mapping[str, ModelView], keep: str, policy: ResidencyPolicy, reason: str) -> list[Move]:
    """After a load measured larger than its first guess: evict others (idle ones first, least recently used
    first) until what is in VRAM fits the budget again. `keep` stays."""
    over = sum(m.vram_bytes for m in models.values() if m.tier == VRAM) - policy.budget_bytes
    victims: list[ModelView] = []
    for candidate in sorted((m for m in models.values() if m.tier == VRAM and m.name != keep),
                            key=lambda m: (m.pending > 0, m.last_used)):
        if over <= 0:
            break
        victims.append(candidate)
        over -= candidate.vram_bytes
    return evict_moves(victims, models, policy, reason, keep=keep)


def admit(
    models: Mapping[str, ModelView],
    incoming: str,
    policy: ResidencyPolicy,
    now: float,
    *,
    urgent: bool = False,
    extra_bytes: int = 0,
) -> list[Move] | Deferred:
    """Moves that make `incoming` active with `extra_bytes` (activations) of headroom, or Deferred.

    Raises BudgetExceeded when the model and its activations alone exceed the budget."""
    target = models[incoming]
    need = target.vram_bytes + extra_bytes
    if need > policy.budget_bytes:
        raise BudgetExceeded(
            f"model {incoming} needs {need} bytes ({target.vram_bytes} weights + {extra_bytes} activations), "
            f"more than the whole budget of {policy.budget_bytes}"
        )
    others = [m for m in models.values() if m.tier == VRAM and m.name != incoming]
    used = sum(m.vram_bytes for m in others) + (target.vram_bytes if target.tier == VRAM else 0)
    free = policy.budget_bytes - used
    missing = (extra_bytes if target.tier == VRAM else need) - free
    victims = choose_victims(others, missing, policy, now)
    protected = [v for v in victims if in_cooldown(v, policy, now)]
    if protected and not urgent:
        until = min(cooldown_ends(v, policy) or now for v in protected)
        return Deferred(tuple(v.name for v in protected), until)
    moves = evict_moves(victims, models, policy, f"evicted to fit {incoming}", keep=incoming)
    need = "needed by urgent work" if urgent else "needed by pending work"  # the tuner tells them apart
    if target.tier == HOST:
        moves.append(Move(incoming, WAKE, need))
    elif target.tier == DISK:
        moves.append(Move(incoming, LOAD, need))
    return moves


def prewarm(
    models: Mapping[str, ModelView], incoming: str, policy: ResidencyPolicy, now: float, *, urgent: bool = False,
) -> list[Move]:
    """Moves that bring the next stage's model in early — only when they evict nothing that is busy or cooling.
    `urgent`: an urgent question's own next stage, which would evict those models moments later anyway, so a
    model's cooldown does not hold it (pending work still does)."""
    target = models.get(incoming)
    if target is None or target.tier == VRAM:
        return []
    try:
        plan = admit(models, incoming, policy, now, urgent=urgent)
    except BudgetExceeded:
        return []
    if isinstance(plan, Deferred):
        return []
    for move in plan:
        victim = models.get(move.model)
        if move.action in (SLEEP, UNLOAD) and victim is not None and (
            victim.pending > 0 or (not urgent and in_cooldown(victim, policy, now))
        ):
            return []
    return [Move(m.model, m.action, "prewarm: " + m.reason) if m.model == incoming else m for m in plan]
