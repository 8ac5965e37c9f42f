"""The tuning playbook: symptoms seen in a window of evidence -> moves of live knobs, within bounds (pure).

| symptom                      | actions                                                                       |
|------------------------------|-------------------------------------------------------------------------------|
| oom                          | reduce the model's batch size; unload idle models; lower its context length  |
|                              | (once the batch is already at its floor)                                      |
| high_queue_time (engine)     | raise max_queue_delay_ms modestly; increase the preferred batch               |
| high_generation_latency      | reduce max new tokens; pass fewer reranked chunks to the generator            |
| low_throughput_low_util      | increase batch sizes                                                          |
| oscillating_loads            | add cooldown                                                                  |

Every knob has bounds and a step. Hysteresis: a knob moved less than `settle_s` ago is left alone, and its next
move (either way) needs evidence gathered entirely after its last move. A knob whose last move did not
raise throughput (`stalled`) is not moved further that way. Pinned knobs never move.
`plan` returns the moves with the symptom and the evidence numbers that justify each (the audit trail).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

UP, DOWN, ONCE = 1, -1, 0


@dataclass(frozen=True)
class Knob:
    name: str                 # e.g. "batch_max:qwen3-embedding-4b", "cooldown_s"
    value: float
    low: float
    high: float
    step: float               # additive, or the factor when `factor` is set
    factor: bool = False
    integer: bool = True
    pinned: bool = False
    last_direction: int = 0   # UP / DOWN of the last move, 0 if none
    last_moved_at: float | None = None
    stalled: bool = False     # its last move did not pay (throughput did not rise): no further move that way

    def moved(self, direction: int) -> float:
        if self.factor:
            value = self.value * self.step if direction == UP else self.value / self.step
        else:
            value = self.value + self.step * direction
        value = min(self.high, max(self.low, value))
        return float(round(value)) if self.integer else round(value, 3)


@dataclass(frozen=True)
class Evidence:
    """What one window showed (from stage_timings, model_events and device_samples)."""

    start: float                                   # window start and end, epoch seconds
    end: float
    ooms: dict[str, int] = field(default_factory=dict)                 # model -> OOM events
    swaps: dict[str, int] = field(default_factory=dict)                # model -> loads + wakes (not for urgent work)
    swap_ms: float | None = None                   # the time those loads and wakes took, summed
    queue_ms: dict[str, float] = field(default_factory=dict)           # priority -> summed queue time in the
                                                                       # engine (the broker's backlog is no knob's)
    compute_ms: dict[str, float] = field(default_factory=dict)         # priority -> summed compute time
    generate_p95_ms: float | None = None
    device_busy: float | None = None               # share of the window the device computed (0..1)
    background_pending: int = 0                    # background messages waiting in the broker at the window end
    embed_items: int = 0


@dataclass(frozen=True)
class Thresholds:
    queue_over_compute: float = 2.0       # background queue time this many times its compute time
    generate_p95_ms: float = 4000.0
    low_util: float = 0.5
    swaps_per_min: float = 4.0            # loads + wakes of one model per minute...
    swap_share: float = 0.05              # ...that took at least this share of the window (when their time is known)
    settle_s: float = 120.0


@dataclass(frozen=True)
class Symptom:
    name: str
    subject: str               # a model, or "" for the worker as a whole
    evidence: dict[str, Any]


@dataclass(frozen=True)
class Move:
    knob: str
    before: float
    after: float
    symptom: str
    evidence: dict[str, Any]
    direction: int             # UP, DOWN, or ONCE for one-shot actions (unload idle models)


def diagnose(e: Evidence, models: dict[str, str], t: Thresholds = Thresholds()) -> list[Symptom]:
    """`models`: role -> model name."""
    minutes = max((e.end - e.start) / 60.0, 1e-9)
    out: list[Symptom] = []
    for model, count in sorted(e.ooms.items()):
        if count:
            out.append(Symptom("oom", model, {"ooms": count}))
    queue, compute = e.queue_ms.get("background", 0.0), e.compute_ms.get("background", 0.0)
    rate = round(e.embed_items / max(e.end - e.start, 1e-9), 2)
    if compute and queue > t.queue_over_compute * compute:
        out.append(Symptom("high_queue_time", models.get("embed", ""),
                           {"queue_ms": round(queue), "compute_ms": round(compute), "ratio": round(queue / compute, 2),
                            "embed_items_per_s": rate}))
    if e.generate_p95_ms is not None and e.generate_p95_ms > t.generate_p95_ms and "generate" in models:
        out.append(Symptom("high_generation_latency", models["generate"],
                           {"generate_p95_ms": round(e.generate_p95_ms), "target_ms": t.generate_p95_ms}))
    working = e.compute_ms.get("background", 0.0) > 0  # background work ran in the window (a new worker has none)
    if e.device_busy is not None and e.device_busy < t.low_util and e.background_pending > 0 and working:
        out.append(Symptom("low_throughput_low_util", models.get("embed", ""),
                           {"device_busy": round(e.device_busy, 3), "background_pending": e.background_pending,
                            "embed_items_per_s": rate}))
    churn = {m: n / minutes for m, n in e.swaps.items() if n / minutes > t.swaps_per_min}
    share = None if e.swap_ms is None else e.swap_ms / 1000.0 / max(e.end - e.start, 1e-9)
    if len(churn) >= 2 and (share is None or share >= t.swap_share):  # two models taking turns, at a real cost
        evidence: dict[str, Any] = {"swaps_per_min": {m: round(r, 1) for m, r in churn.items()}}
        if share is not None:
            evidence["swap_share"] = round(share, 3)
        out.append(Symptom("oscillating_loads", "", evidence))
    return out


ALWAYS, FALLBACK = "always", "fallback"

# symptom -> [(knob name template, direction, when)]; "{model}" is the symptom's subject. An `always` knob moves a
# step whenever it may; a `fallback` knob only when no knob before it in the row moved.
PLAYBOOK: dict[str, list[tuple[str, int, str]]] = {
    "oom": [("batch_max:{model}", DOWN, ALWAYS), ("unload_idle", ONCE, ALWAYS), ("max_length:{model}", DOWN, FALLBACK)],
    "high_queue_time": [("max_queue_delay_ms:{model}", UP, ALWAYS), ("batch_max:{model}", UP, ALWAYS)],
    "high_generation_latency": [("max_new_tokens", DOWN, ALWAYS), ("generate_chunks", DOWN, FALLBACK)],
    "low_throughput_low_util": [("batch_max:{model}", UP, ALWAYS)],
    "oscillating_loads": [("cooldown_s", UP, ALWAYS)],
}


def plan(symptoms: list[Symptom], knobs: dict[str, Knob], now: float, evidence_start: float,
         t: Thresholds = Thresholds()) -> list[Move]:
    """The moves for these symptoms: for each symptom, the one-shot actions of its playbook row, a step of every
    `always` knob that may move, and a step of a `fallback` knob when nothing before it moved. A knob may not move
    when it is pinned, at its bound, settling, or facing an opposite move without new evidence."""
    moves: list[Move] = []
    touched: set[str] = set()
    for symptom in symptoms:
        chosen = False
        for template, direction, when in PLAYBOOK[symptom.name]:
            name = template.format(model=symptom.subject)
            if direction == ONCE:
                if name not in touched:
                    moves.append(Move(name, 0, 0, symptom.name, symptom.evidence, ONCE))
                    touched.add(name)
                continue
            knob = knobs.get(name)
            if chosen and when == FALLBACK:
                continue
            if knob is None or knob.pinned or name in touched:
                continue
            if knob.stalled and direction == knob.last_direction:
                continue  # more of what did not pay last time: no
            if knob.last_moved_at is not None and (now - knob.last_moved_at < t.settle_s
                                                   or evidence_start < knob.last_moved_at):
                # settling, or no evidence gathered entirely after its last move yet (a window that still holds
                # samples from before a cut asks for the cut again; the opposite move would be a swing back).
                # The row's fallbacks wait too: they are for when this knob can do no more (at its bound, pinned
                # or stalled)
                chosen = chosen or when == ALWAYS
                continue
            after = knob.moved(direction)
            if after == knob.value:
                continue  # at its bound: the next action of the row
            moves.append(Move(name, knob.value, after, symptom.name, symptom.evidence, direction))
            touched.add(name)
            chosen = True
    return moves
