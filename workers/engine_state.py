"""The engine's records: requests in flight, per-model slots, counters, the messages of its inbox, its settings.

Only the engine's thread reads or changes a `Request`'s progress or a `Slot`; other threads reach the engine
through the inbox messages below (`Engine.submit`, `prewarm`, `push_knobs`, the snapshot queries).
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from scheduler.batching import Priority
from scheduler.residency import DISK, Tier
from workers.backends import LoadedModel
from workers.models import ModelSpec


@dataclass
class EngineResult:
    outputs: list[Any]
    model: str
    queue_ms: float
    load_ms: float
    compute_ms: float
    batch_size: int          # the largest micro-batch this request's items ran in
    tokens: int
    first_token_ms: float | None = None   # generate: from submission to the answer's first streamed piece


@dataclass(frozen=True)
class EngineConfig:
    """The engine's knobs that are not residency (the budgets and cooldown are its ResidencyPolicy)."""

    max_pending: int = 100_000          # requests in flight before submit refuses ("busy")
    report_interval_s: float = 30.0     # a summary log line this often (0: never)
    urgent_yield_s: float = 0.0         # background batches shrink this long after urgent work was seen
    urgent_yield_ms: float = 0.0        # ... to about this long a batch (0: half the tuned size)
    sample_interval_s: float = 5.0      # device samples at most this often
    knob_interval_s: float = 10.0       # the tuner's knobs are read this often (off the engine thread)
    decode_slice_s: float = 0.05        # decode steps run this long before the engine looks at its inbox (0: one)
    idle_restore_s: float = 0.0         # nothing pending this long: the embedder, if asleep, comes back (0: never)


@dataclass
class Request:
    key: int
    role: str
    items: list[Any]
    tokens: list[int]
    params: dict[str, Any]
    priority: Priority
    deadline: float | None
    enqueued: float
    future: Future[EngineResult]
    todo: list[int] = field(default_factory=list)          # item indices not yet scheduled
    results: dict[int, Any] = field(default_factory=dict)
    started: float | None = None
    load_ms: float = 0.0
    compute_ms: float = 0.0
    batch_size: int = 0
    first_token_at: float | None = None

    @property
    def remaining(self) -> int:
        return len(self.todo)

    @property
    def done(self) -> bool:
        return len(self.results) == len(self.items)

    @property
    def group(self) -> tuple[tuple[str, str], ...]:
        return tuple(sorted((k, repr(v)) for k, v in self.params.items()))


@dataclass
class Slot:
    """Everything the engine knows about one model."""

    spec: ModelSpec
    model: LoadedModel | None = None
    tier: Tier = DISK
    vram_bytes: int = 0
    host_bytes: int = 0
    last_used: float = 0.0
    resident_since: float | None = None
    ready: Any = None                        # a pending asynchronous wake (has .wait())
    loading: Future[tuple[LoadedModel, float]] | None = None  # a background load (prewarm of a cold model)


# -- the inbox ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Submit:
    request: Request


@dataclass(frozen=True)
class Prewarm:
    model: str
    urgent: bool = False   # an urgent question's own next stage (cooldowns do not hold it back)


@dataclass(frozen=True)
class SetKnobs:
    values: dict[str, float]


@dataclass(frozen=True)
class Query:
    """Read something of the engine's state on its thread; the answer resolves `future`."""

    read: Callable[[], Any]
    future: Future[Any]


@dataclass(frozen=True)
class Wake:
    """Nothing to do but look again (stop)."""


Message = Submit | Prewarm | SetKnobs | Query | Wake


# -- counters ------------------------------------------------------------------------------------------------------
@dataclass
class RoleStats:
    """What one role's micro-batches did: counts, and where their time went."""

    batches: int = 0
    items: int = 0
    tokens: int = 0
    wall_ms: float = 0.0      # model.execute on the engine thread
    device_ms: float = 0.0    # the same batches' span on the device (CUDA events; 0 where not measured)
    alloc_retries: int = 0    # allocations that first had to free cached device memory (synchronising)
    cpu_ms: float = 0.0       # of wall_ms, the engine thread on a CPU (launching kernels, Python)
    runq_ms: float = 0.0      # of wall_ms, the engine thread runnable but waiting for a CPU (contention)
    expired: int = 0
    # where run time went, from the backend's BatchOutput.phases (torch: embed and rerank): tokenise+pad, queue the
    # forward passes (CPU), the passes on the device, wait+copy out; real and padded tokens of the passes
    phases: dict[str, float] = field(default_factory=dict)


@dataclass
class EngineStats:
    loads: int = 0
    wakes: int = 0
    sleeps: int = 0
    unloads: int = 0
    ooms: int = 0
    load_ms: float = 0.0
    idle_ms: float = 0.0      # the loop waiting with nothing runnable
    roles: dict[str, RoleStats] = field(default_factory=dict)

    def role(self, role: str) -> RoleStats:
        return self.roles.setdefault(role, RoleStats())

    def summary(self, since: EngineStats | None = None) -> str:
        """One line: per role, items/s-relevant counts and how much of run time the device was busy."""
        parts = []
        for role, now in sorted(self.roles.items()):
            before = (since.roles.get(role) if since else None) or RoleStats()
            batches = now.batches - before.batches
            if not batches:
                continue
            wall = now.wall_ms - before.wall_ms
            device = now.device_ms - before.device_ms
            parts.append(
                f"{role} {batches} batches {now.items - before.items} items "
                f"(mean {(now.items - before.items) / batches:.1f}) run {wall / 1000:.1f}s"
                + (f" device {device / 1000:.1f}s ({device / wall:.0%})" if device and wall else "")
                + (f" alloc retries {now.alloc_retries - before.alloc_retries}"
                   if now.alloc_retries > before.alloc_retries else "")
                + (f" on-cpu {(now.cpu_ms - before.cpu_ms) / 1000:.1f}s cpu-wait {(now.runq_ms - before.runq_ms) / 1000:.1f}s"
                   if now.cpu_ms > before.cpu_ms else "")
                + _phases_text(now.phases, before.phases) + _decode_text(now.phases, before.phases, wall)
            )
        idle = self.idle_ms - (since.idle_ms if since else 0.0)
        load = self.load_ms - (since.load_ms if since else 0.0)
        return "; ".join(parts + [f"loading {load / 1000:.1f}s", f"idle {idle / 1000:.1f}s"])


def _phases_text(now: dict[str, float], before: dict[str, float]) -> str:
    delta = {k: v - before.get(k, 0.0) for k, v in now.items()}
    if not delta.get("padded_tokens"):
        return ""
    text = f" [prep {delta.get('prep', 0) / 1000:.2f}s launch {delta.get('launch', 0) / 1000:.2f}s"
    if "passes_gpu" in delta:
        text += f" passes {delta['passes_gpu'] / 1000:.2f}s"
    return text + (f" tail {delta.get('tail', 0) / 1000:.2f}s passes/batch {delta.get('batches_seen', 0) and delta.get('passes', 0) / delta['batches_seen']:.1f}"
                   f" real/padded {delta['real_tokens'] / delta['padded_tokens']:.2f}]")


def _decode_text(now: dict[str, float], before: dict[str, float], wall_ms: float) -> str:
    """A decode loop's slices: steps (launched on the one before), ms a step and how much of it the host waited for
    the card's tokens (the rest is the host's own work: launches, text, streaming), tokens, prompt tokens
    prefilled, and how many slices a message cut short."""
    delta = {k: v - before.get(k, 0.0) for k, v in now.items() if k.startswith("decode_")}
    steps = delta.get("decode_steps", 0.0)
    if not steps:
        return ""
    return (f" [steps {steps:.0f} ({delta.get('decode_chained', 0):.0f} chained) {wall_ms / steps:.2f} ms a step "
            f"({delta.get('decode_wait_ms', 0) / steps:.2f} waiting for the card), "
            f"tokens {delta.get('decode_tokens', 0):.0f}, prefilled {delta.get('decode_prefill_tokens', 0):.0f}, "
            f"slices cut by a message {delta.get('decode_slices_cut', 0):.0f}]")


def thread_schedstat() -> tuple[float, float]:
    """(ms on a CPU, ms runnable but waiting for one) of the calling thread so far, from Linux's schedstat; zeros
    where the kernel does not expose it."""
    try:
        with open("/proc/thread-self/schedstat") as f:
            on_cpu, waiting = f.read().split()[:2]
        return int(on_cpu) / 1e6, int(waiting) / 1e6
    except (OSError, ValueError):
        return 0.0, 0.0


def estimate_tokens(spec: ModelSpec, items: list[Any]) -> list[int]:
    """A tokenizer-free estimate (4 characters a token), for engines given no token counter."""
    return [max(1, min(spec.max_length, len(str(item)) // 4)) for item in items]


__all__ = ["EngineConfig", "EngineResult", "EngineStats", "Message", "Prewarm", "Query", "Request", "RoleStats",
           "SetKnobs", "Slot", "Submit", "Wake", "estimate_tokens", "thread_schedstat"]
