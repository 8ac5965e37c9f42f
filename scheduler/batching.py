"""What goes into the next micro-batch, and how large micro-batches should be.

- `form_batch`: token-aware batch forming. Urgent requests go in small, immediate batches of urgent items only;
  background batches are large: the oldest request's items first (requests finish one after another), then
  items of the next requests closest in length to it (as text-embeddings-inference groups by length), capped by
  a count and by padded tokens (items x the longest item).
- `BatchTuner`: the adaptive size of one model's background batches — start small, ramp up while throughput
  improves and the p95 batch time holds under its target, shrink on OOM or when the p95 passes the target.
- `length_groups`: how one micro-batch runs on the device: its items sorted by length and cut into forward passes
  of similar lengths, where the padding a cut saves is worth a pass's fixed cost. The batch former can then keep
  requests whole (no lockstep) without padding every item to the longest one.
- `should_wait_for_fuller_batch`: the optional max_queue_delay of Triton's dynamic batcher.
- `yield_to_urgent`: while questions keep coming, background batches shrink to a short time slice (or half
  size), so each stage of a question waits behind a shorter micro-batch.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from enum import IntEnum


class Priority(IntEnum):
    """A request's priority: lower runs first (stored and sent as the number)."""

    URGENT = 0
    BACKGROUND = 1

    @property
    def label(self) -> str:
        return self.name.lower()


URGENT, BACKGROUND = Priority.URGENT, Priority.BACKGROUND
PRIORITY_NAMES = {p: p.label for p in Priority}


@dataclass(frozen=True)
class Pending:
    """A snapshot of one pending request as the scheduler sees it."""

    key: int                # the engine's request id
    role: str
    group: Hashable         # requests with equal (role, group) may share a micro-batch
    priority: Priority
    enqueued: float
    items: tuple[tuple[int, int], ...]   # (index, tokens) of the items not yet scheduled, in order
    deadline: float | None = None

    @property
    def remaining(self) -> int:
        return len(self.items)


@dataclass(frozen=True)
class BatchLimits:
    max_items: int          # background batch size (the tuner's current size, capped by memory headroom)
    max_tokens: int         # padded tokens per batch
    urgent_items: int       # urgent batch size


def expired(pending: Sequence[Pending], now: float) -> list[int]:
    return [p.key for p in pending if p.deadline is not None and p.deadline <= now]


def padded_tokens(lengths: Sequence[int]) -> int:
    return len(lengths) * max(lengths, default=0)


def _fits(lengths: list[int], length: int, limits_items: int, max_tokens: int) -> bool:
    return len(lengths) < limits_items and (len(lengths) + 1) * max(max(lengths, default=0), length) <= max_tokens


def form_batch(pending: Sequence[Pending], role: str, limits: BatchLimits) -> list[tuple[int, list[int]]]:
    """[(request key, item indices)] for the next micro-batch of `role`. The most urgent, oldest request's first
    item is always in it, so every request progresses; a single item longer than the token cap runs alone."""
    candidates = sorted((p for p in pending if p.role == role and p.items),
                        key=lambda p: (p.priority, p.enqueued, p.key))
    if not candidates:
        return []
    head = candidates[0]
    same = [p for p in candidates if p.group == head.group]
    if head.priority == URGENT:
        plan: dict[int, list[int]] = {}
        lengths: list[int] = []
        for p in same:
            if p.priority != URGENT:
                break
            for index, tokens in p.items:
                if lengths and not _fits(lengths, tokens, limits.urgent_items, limits.max_tokens):
                    return [(k, v) for k, v in plan.items()]
                plan.setdefault(p.key, []).append(index)
                lengths.append(tokens)
        return [(k, v) for k, v in plan.items()]
    # background: a request that fits goes in whole, the oldest first, so requests finish one after another rather
    # than all together (tasks that finish together leave the engine idle while their threads store and fetch the
    # next task); the rest of the batch is the items closest in length to the oldest item (padding), as
    # text-embeddings-inference groups by length, looking ahead over the next-oldest items
    head_lengths = [tokens for _, tokens in head.items]
    whole = len(head_lengths) <= limits.max_items and padded_tokens(head_lengths) <= limits.max_tokens
    lookahead: list[tuple[int, int, int, int]] = []   # (order, key, index, tokens)
    for p in same:
        for index, tokens in p.items:
            lookahead.append((len(lookahead), p.key, index, tokens))
            if len(lookahead) >= 2 * limits.max_items:
                break
        if len(lookahead) >= 2 * limits.max_items:
            break
    if whole:
        chosen = [e for e in lookahead if e[1] == head.key]
        rest = [e for e in lookahead if e[1] != head.key]
    else:
        chosen, rest = lookahead[:1], lookahead[1:]
    anchor = lookahead[0][3]
    lengths = [e[3] for e in chosen]
    for entry in sorted(rest, key=lambda e: (abs(e[3] - anchor), e[0])):
        if not _fits(lengths, entry[3], limits.max_items, limits.max_tokens):
            if len(lengths) >= limits.max_items:
                break
            continue
        chosen.append(entry)
        lengths.append(entry[3])
    chosen.sort()
    plan: dict[int, list[int]] = {}
    for _, key, index, _ in chosen:
        plan.setdefault(key, []).append(index)
    return list(plan.items())


def length_groups(lengths: Sequence[int], pass_overhead_tokens: int) -> list[list[int]]:
    """Indices of `lengths` split into forward passes: sorted by length, cut into contiguous runs that minimise the
    padded tokens of all passes plus `pass_overhead_tokens` for each pass (the fixed cost of one more forward,
    counted in tokens). Exact, by dynamic programming over the points where the length changes (equal lengths
    never gain from a cut). Passes come shortest first; each pass lists its indices in ascending length."""
    if not lengths:
        return []
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    ordered = [lengths[i] for i in order]
    # candidate ends of a pass: after the last item of each distinct length
    ends = [j + 1 for j in range(len(ordered)) if j + 1 == len(ordered) or ordered[j + 1] != ordered[j]]
    overhead = max(0, pass_overhead_tokens)
    best = [0] + [0] * len(ends)      # best[k]: cost of the first ends[k-1] items
    cut = [0] * (len(ends) + 1)       # cut[k]: the k' whose end starts the last pass
    for k, end in enumerate(ends, start=1):
        longest = ordered[end - 1]
        choice, cost = 0, None
        for j in range(k):
            start = ends[j - 1] if j else 0
            c = best[j] + (end - start) * longest + overhead
            if cost is None or c < cost:
                choice, cost = j, c
        best[k], cut[k] = cost or 0, choice
    groups: list[list[int]] = []
    k = len(ends)
    while k:
        j = cut[k]
        start = ends[j - 1] if j else 0
        groups.append(order[start:ends[k - 1]])
        k = j
    return groups[::-1]


@dataclass
class PassCostModel:
    """What one more forward pass costs, in padded tokens, fitted from the batches that ran: their time is
    a x padded tokens + b x passes (least squares over the last `window` batches), so b / a is the fixed cost of a
    pass (launching its kernels, the syncs in it) in the tokens the same time would process. Batches of one pass
    identify it too, as long as their sizes vary. None until `min_samples` batches, or when the fit is degenerate."""

    window: int = 64
    min_samples: int = 12
    maximum: int = 65536
    _samples: deque[tuple[float, float, float]] = field(default_factory=deque)

    def __post_init__(self) -> None:
        self._samples = deque(maxlen=self.window)

    def observe(self, padded_tokens: float, passes: int, ms: float) -> None:
        if padded_tokens > 0 and passes > 0 and ms > 0:
            self._samples.append((float(padded_tokens), float(passes), float(ms)))

    def overhead_tokens(self) -> int | None:
        if len(self._samples) < self.min_samples:
            return None
        s11 = sum(x * x for x, _, _ in self._samples)
        s12 = sum(x * p for x, p, _ in self._samples)
        s22 = sum(p * p for _, p, _ in self._samples)
        s1y = sum(x * y for x, _, y in self._samples)
        s2y = sum(p * y for _, p, y in self._samples)
        det = s11 * s22 - s12 * s12
        if det <= 1e-9 * s11 * s22:   # no variation to tell tokens from passes
            return None
        a = (s1y * s22 - s2y * s12) / det
        b = (s11 * s2y - s12 * s1y) / det
        if a <= 0:
            return None
        return int(min(self.maximum, max(0.0, b / a)))


def should_wait_for_fuller_batch(pending: Sequence[Pending], role: str, target_items: int, now: float,
                                 max_queue_delay_s: float) -> float:
    """Seconds to wait before running a background batch of `role` that is not full yet (0 = run now)."""
    if max_queue_delay_s <= 0:
        return 0.0
    mine = [p for p in pending if p.role == role and p.items]
    if not mine or any(p.priority == URGENT for p in mine):
        return 0.0
    if sum(p.remaining for p in mine) >= target_items:
        return 0.0
    oldest = min(p.enqueued for p in mine)
    return max(0.0, oldest + max_queue_delay_s - now)


def yield_to_urgent(size: int, last_urgent: float | None, now: float, recent_s: float,
                    rate_per_s: float | None = None, yield_ms: float = 0.0) -> int:
    """The background batch size while urgent work was seen in the last `recent_s` seconds: an urgent request
    waits for at most the micro-batch already running, and a question passes through up to three models, so it may
    wait three times. With the measured rate (items/s at the tuned size) and `yield_ms`, batches sized to take about
    `yield_ms`; otherwise half the tuned size (never more than half). Without recent urgent work, the tuned size."""
    if recent_s <= 0 or last_urgent is None or now - last_urgent >= recent_s:
        return size
    half = max(1, size // 2)
    if rate_per_s and yield_ms > 0:
        return max(1, min(half, int(rate_per_s * yield_ms / 1000.0)))
    return half


@dataclass
class BatchTuner:
    """Adaptive background batch size for one model. Feed it every full batch's size and time (and OOMs)."""

    size: int
    maximum: int
    latency_target_ms: float
    minimum: int = 1
    window: int = 6
    ceiling: int = 0
    relearn_after: int = 60     # full batches under a ceiling before it is lifted and larger sizes are tried again
    _under_ceiling: int = 0
    _times: deque[float] = field(default_factory=lambda: deque(maxlen=32))
    _throughput: dict[int, float] = field(default_factory=dict)   # size -> items/s at that size
    _full_batches: int = 0
    changes: list[tuple[int, int, str]] = field(default_factory=list)  # (from, to, why)

    def __post_init__(self) -> None:
        self.size = max(self.minimum, min(self.size, self.maximum))
        self.ceiling = self.ceiling or self.maximum

    def rate(self, size: int | None = None) -> float | None:
        """Measured items/s (smoothed) at `size` (default the current size), else at the nearest measured size
        below it (a lower bound), else None."""
        size = self.size if size is None else size
        below = [s for s in self._throughput if s <= size]
        return self._throughput[max(below)] if below else None

    def measured(self, size: int) -> float | None:
        """Measured items/s at exactly `size`, or None."""
        return self._throughput.get(size)

    def p95_ms(self) -> float:
        if not self._times:
            return 0.0
        ordered = sorted(self._times)
        return ordered[min(len(ordered) - 1, int(round(0.95 * (len(ordered) - 1))))]

    def _set(self, size: int, why: str) -> None:
        size = max(self.minimum, min(size, self.maximum, self.ceiling))
        if size != self.size:
            self.changes.append((self.size, size, why))
            self.size = size
            self._times.clear()
            self._full_batches = 0

    def observe(self, items: int, ms: float, limit: int | None = None) -> None:
        """A batch of `items` ran in `ms`; `limit` is what the batch could hold this time (memory headroom may cap
        it below the size). Only batches at least 80% full say something about the size."""
        capacity = min(self.size, limit) if limit else self.size
        if items < max(1, int(0.8 * capacity)):
            return
        if capacity < self.size:  # held back by memory, not by this size: nothing to learn about the size
            return
        self._times.append(ms)
        self._full_batches += 1
        if self.ceiling < self.maximum:
            # a ceiling learnt once (an OOM beside another model, a slow spell) must not hold for ever
            self._under_ceiling += 1
            if self._under_ceiling >= self.relearn_after:
                self.changes.append((self.size, self.size, f"ceiling {self.ceiling} lifted after "
                                                           f"{self._under_ceiling} batches: relearn"))
                self.ceiling = self.maximum
                self._under_ceiling = 0
        rate = items / max(ms, 1e-3) * 1000.0
        previous = self._throughput.get(self.size)
        self._throughput[self.size] = rate if previous is None else 0.7 * previous + 0.3 * rate
        far_under = self._full_batches >= 2 and max(self._times) < 0.5 * self.latency_target_ms
        if self._full_batches < self.window and not far_under:  # far under the target, two batches tell enough
            return
        p95 = self.p95_ms()
        here = self._throughput[self.size]
        if p95 > self.latency_target_ms:
            # over the target: smaller batches, but not at any price. Questions do not need it (while they keep
            # coming the planner cuts batches to the urgent yield anyway); what a smaller size costs is
            # throughput, so the tuner goes down only while that does not lose throughput, and comes back to the
            # size that gave the most when every size tried misses the target (a busy CPU: 160 ms of CPU per
            # passage at batch 1 against 28 at 32)
            best = max(self._throughput, key=lambda size: self._throughput[size])
            if best != self.size and self._throughput[best] > 1.05 * here:
                self.ceiling = max(self.ceiling, best)
                self._set(best, f"p95 {p95:.0f}ms over the {self.latency_target_ms:.0f}ms target at every size "
                                f"tried: back to {best}, the most throughput ({self._throughput[best]:.1f}/s)")
                self._under_ceiling = 0
                return
            down = max(self.minimum, int(self.size * 0.75))
            below = self._throughput.get(down)
            if down < self.size and (below is None or below >= 0.95 * here):
                too_big = self.size
                self._set(down, f"p95 {p95:.0f}ms over the {self.latency_target_ms:.0f}ms target")
                self.ceiling = max(self.minimum, too_big - 1)  # not back to a size that broke the target (for a while)
                self._under_ceiling = 0
            else:   # smaller sizes measured slower: this is where throughput peaks
                self._full_batches = 0
            return
        smaller = self._throughput.get(self.size // 2)
        if smaller is not None and here < 1.05 * smaller:
            self.ceiling = self.size   # doubling stopped paying: stay here (for a while)
            self._under_ceiling = 0
            self._full_batches = 0
            return
        if self.size < min(self.maximum, self.ceiling):
            self._set(self.size * 2, f"throughput {here:.0f}/s with p95 {p95:.0f}ms under target: ramp")
        else:
            self._full_batches = 0

    def out_of_memory(self, items: int) -> None:
        new = max(self.minimum, items // 2)
        self.ceiling = max(self.minimum, new)
        self._under_ceiling = 0
        self._set(new, f"out of memory at {items} items")
