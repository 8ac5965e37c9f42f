"""The engine's next step, decided from a snapshot: which residency moves, which micro-batch, or wait until when.

`plan(snapshot)` is a pure function: the engine builds an `EngineSnapshot` of what it knows (pending work, the
models' tiers and sizes, the batch tuners, measured footprints, the clock), executes the plan it gets back, and
updates its state with the result. Tests drive it with invented snapshots.

The order of decisions:
1. roles ranked by the phase plan (urgent first, then the background role whose model is cheapest to serve);
   the first whose model can be made resident now is chosen (`admit`), the others wait for their models' cooldown;
2. a background batch that is not full yet may wait for `max_queue_delay_ms`, as Triton's dynamic batcher does;
3. the batch size: the tuner's, capped by the activations measured to fit beside what is resident; if the cap
   bites, idle models unused for the cooldown are evicted to make room (never while urgent work of the role waits);
   halved (or sized to `urgent_yield_ms`) while urgent work was seen recently;
4. the items: urgent requests first, sorted and capped by padded tokens (`form_batch`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

from ragq.core.errors import BudgetExceeded
from scheduler.batching import (
    URGENT, BatchLimits, BatchTuner, Pending, form_batch, should_wait_for_fuller_batch, yield_to_urgent,
)
from scheduler.footprints import ModelProfile
from scheduler.phases import RoleLoad, rank_roles
from scheduler.residency import (
    DISK, HOST, SLEEP, UNLOAD, VRAM, Deferred, ModelView, Move, ResidencyPolicy, admit, evict_moves,
)


@dataclass(frozen=True)
class RoleConfig:
    """What the planner needs of one role's model spec."""

    model: str
    batch_size: int                 # the configured largest batch
    urgent_batch: int
    max_batch_tokens: int
    max_queue_delay_s: float = 0.0


@dataclass(frozen=True)
class EngineSnapshot:
    now: float
    pending: Sequence[Pending]                  # requests with items not yet scheduled
    roles: Mapping[str, RoleConfig]
    models: Mapping[str, ModelView]             # by model name: tier, bytes, pending count, expected, costs
    tuners: Mapping[str, BatchTuner]            # by model name (read, never changed here)
    footprints: Mapping[str, ModelProfile | None]
    swap_in_s: Mapping[str, float]              # what bringing each model in took last time
    policy: ResidencyPolicy
    last_urgent: float | None = None
    urgent_yield_s: float = 0.0
    urgent_yield_ms: float = 0.0


@dataclass(frozen=True)
class Wait:
    """Nothing to run before `until` (a cooldown ends, a fuller batch is due); a new request ends the wait early."""

    until: float


@dataclass(frozen=True)
class FailRole:
    """The role's model cannot fit even alone: its pending requests fail with `error`."""

    role: str
    error: BudgetExceeded


@dataclass(frozen=True)
class RunBatch:
    role: str
    room: tuple[Move, ...]                      # idle models evicted first, for a larger background batch
    moves: tuple[Move, ...]                     # then the moves that make the role's model resident
    take: tuple[tuple[int, tuple[int, ...]], ...]   # (request key, item indices) in batch order
    max_items: int                              # the size this batch was formed for (the tuner learns from it)


Plan = Wait | FailRole | RunBatch


def plan(snapshot: EngineSnapshot) -> Plan:
    chosen = choose_role(snapshot)
    if not isinstance(chosen, tuple):
        return chosen
    role, moves = chosen
    config = snapshot.roles[role]
    mine = [p for p in snapshot.pending if p.role == role]
    tuner = snapshot.tuners[config.model]
    wait_s = should_wait_for_fuller_batch(mine, role, tuner.size, snapshot.now, config.max_queue_delay_s)
    if wait_s > 0 and not moves:
        return Wait(snapshot.now + wait_s)
    models = snapshot.models
    cap = memory_cap(snapshot, role, mine, models)
    room: list[Move] = []
    if cap < tuner.size and not any(p.priority == URGENT for p in mine) and not costs_little(tuner, cap):
        room = room_moves(snapshot, config.model)
        if room:
            models = after(models, room)
            cap = memory_cap(snapshot, role, mine, models)
    effective = max(1, min(tuner.size, cap))
    size = yield_to_urgent(effective, snapshot.last_urgent, snapshot.now, snapshot.urgent_yield_s,
                           tuner.rate(effective), snapshot.urgent_yield_ms)
    limits = BatchLimits(max_items=max(1, min(size, cap)), max_tokens=config.max_batch_tokens,
                         urgent_items=config.urgent_batch)
    take = tuple((key, tuple(indices)) for key, indices in form_batch(mine, role, limits))
    return RunBatch(role, tuple(room), tuple(moves), take, limits.max_items)


def role_loads(snapshot: EngineSnapshot) -> list[RoleLoad]:
    loads = []
    for role, config in snapshot.roles.items():
        mine = [p for p in snapshot.pending if p.role == role]
        if not mine:
            continue
        urgent = [p for p in mine if p.priority == URGENT]
        background = [p for p in mine if p.priority != URGENT]
        resident = snapshot.models[config.model].tier == VRAM
        loads.append(RoleLoad(
            role, sum(p.remaining for p in urgent), sum(p.remaining for p in background),
            max((snapshot.now - p.enqueued for p in urgent), default=0.0),
            max((snapshot.now - p.enqueued for p in background), default=0.0),
            resident, 0.0 if resident else snapshot.swap_in_s[config.model],
        ))
    return loads


def choose_role(snapshot: EngineSnapshot) -> tuple[str, list[Move]] | Wait | FailRole:
    """The first role in the phase plan whose model can be made resident now; roles whose model would evict a
    model inside its cooldown wait (urgent work overrides the cooldown)."""
    now = snapshot.now
    if not snapshot.pending:
        return Wait(float("inf"))
    deferred: list[Deferred] = []
    for role in rank_roles(role_loads(snapshot)):
        name = snapshot.roles[role].model
        urgent = any(p.role == role and p.priority == URGENT for p in snapshot.pending)
        profile = snapshot.footprints.get(name)
        try:
            admitted = admit(snapshot.models, name, snapshot.policy, now, urgent=urgent,
                             extra_bytes=profile.activation_reserve() if profile else 0)
        except BudgetExceeded as exc:
            return FailRole(role, exc)
        if isinstance(admitted, Deferred):
            deferred.append(admitted)
            continue
        return role, admitted
    return Wait(min((d.until for d in deferred), default=now))


def memory_cap(snapshot: EngineSnapshot, role: str, mine: Sequence[Pending], models: Mapping[str, ModelView]) -> int:
    """The most items whose measured activations fit next to what is resident (no profile: no cap)."""
    config = snapshot.roles[role]
    largest = max(config.batch_size, snapshot.tuners[config.model].maximum)  # the tuner's cap may exceed the config
    profile = snapshot.footprints.get(config.model)
    if profile is None or not mine:
        return largest
    longest = max((t for p in mine for _, t in p.items[:256]), default=1)
    resident = sum(m.vram_bytes for m in models.values() if m.tier == VRAM)
    if models[config.model].tier != VRAM:
        resident += models[config.model].vram_bytes
    free = snapshot.policy.budget_bytes - resident
    cap = largest
    while cap > 1 and (profile.activation_for(cap, longest) or 0) > free:
        cap //= 2
    return cap


ROOM_RATE_FRACTION = 0.9   # the resident models stay while the capped batch keeps this much of the tuned rate


def costs_little(tuner: BatchTuner, cap: int) -> bool:
    """Whether batches capped at `cap` items were measured at >= ROOM_RATE_FRACTION of the throughput measured at
    the tuned size: then the resident models stay (a question would pay their wake to save a few per cent of
    ingestion). Until both are measured, room is made, so the tuned size gets measured."""
    full, capped = tuner.measured(tuner.size), tuner.rate(cap)
    return full is not None and capped is not None and capped >= ROOM_RATE_FRACTION * full


def room_moves(snapshot: EngineSnapshot, keep: str) -> list[Move]:
    """Background work whose tuned batch does not fit beside the resident models: models no pending work needs
    and unused for the cooldown go to sleep (a wake is ~0.2 s when a question needs one again; smaller batches
    cost throughput for as long as ingestion runs)."""
    return idle_evictions(snapshot.models, snapshot.policy, snapshot.now, keep,
                          unused_for_s=snapshot.policy.cooldown_s, reason=f"idle: room for larger {keep} batches")


def idle_evictions(models: Mapping[str, ModelView], policy: ResidencyPolicy, now: float, keep: str, *,
                   everything: bool = False, unused_for_s: float | None = None,
                   reason: str = "evicted after an out-of-memory error") -> list[Move]:
    """Evict models no pending work needs (or, with `everything`, all but `keep`), least recently used first;
    with `unused_for_s`, only those unused for that long."""
    idle = [m for m in models.values()
            if m.tier == VRAM and m.name != keep and (everything or m.pending == 0)
            and (unused_for_s is None or now - (m.last_used or 0.0) >= unused_for_s)]
    if not idle:
        return []
    return evict_moves(sorted(idle, key=lambda m: m.last_used), models, policy, reason, keep=keep)


def after(models: Mapping[str, ModelView], moves: Sequence[Move]) -> dict[str, ModelView]:
    """The models as they will be once `moves` that take models off the device are done."""
    out = dict(models)
    for move in moves:
        if move.action in (SLEEP, UNLOAD) and move.model in out:
            out[move.model] = replace(out[move.model], tier=HOST if move.action == SLEEP else DISK)
    return out


__all__ = ["EngineSnapshot", "FailRole", "Plan", "RoleConfig", "RunBatch", "Wait", "choose_role", "idle_evictions",
           "memory_cap", "plan"]
