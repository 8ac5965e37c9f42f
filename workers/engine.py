"""The per-device engine: one scheduler thread owns all device state; task threads submit requests and wait.

It groups pending requests of the same role into micro-batches (one load serves many jobs), lets urgent work jump
ahead at micro-batch boundaries, drops requests whose deadline passed before they cost device time, and keeps
models in three tiers (VRAM, pinned host RAM, disk) within the budgets. Decisions come from scheduler/ (pure);
loading, moving and running models are the backend's, injected through the loader, so the same engine runs in
tests with fakes or tiny models and on a GPU unchanged.
"""

from __future__ import annotations

import copy
import itertools
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any

from ragq.core.errors import BackendUnavailable, BudgetExceeded, DeviceOutOfMemory, RagqError, RequestExpired
from scheduler.batching import (
    BACKGROUND, URGENT, BatchLimits, BatchTuner, Pending, expired, form_batch, should_wait_for_fuller_batch,
    yield_to_urgent,
)
from scheduler.phases import RoleLoad, rank_roles
from scheduler.residency import (
    DISK, DROP_HOST, HOST, LOAD, SLEEP, UNLOAD, VRAM, WAKE, Deferred, ModelView, Move, ResidencyPolicy, admit,
    evict_moves, prewarm, trim_to_budget,
)
from workers.backends import LoadedModel
from workers.models import DEFAULT_INITIAL_BATCH, DEFAULT_LATENCY_TARGET_MS, ModelSpec
from workers.profiles import MemoryProfileStore, ModelProfile, ProfileStore

log = logging.getLogger(__name__)

Loader = Callable[[ModelSpec, str], LoadedModel]
TokenCounter = Callable[[ModelSpec, list[Any]], list[int]]


def estimate_tokens(spec: ModelSpec, items: list[Any]) -> list[int]:
    """A tokenizer-free estimate (4 characters a token), for engines given no token counter."""
    return [max(1, min(spec.max_length, len(str(item)) // 4)) for item in items]
EventSink = Callable[[dict[str, Any]], None]


@dataclass
class EngineResult:
    outputs: list[Any]
    model: str
    queue_ms: float
    load_ms: float
    compute_ms: float
    batch_size: int          # the largest micro-batch this request's items ran in
    tokens: int


@dataclass
class _Request:
    key: int
    role: str
    items: list[Any]
    tokens: list[int]
    params: dict[str, Any]
    priority: int
    deadline: float | None
    enqueued: float
    future: Future[EngineResult]
    todo: list[int] = field(default_factory=list)          # item indices not yet scheduled
    results: dict[int, Any] = field(default_factory=dict)
    started: float | None = None
    load_ms: float = 0.0
    compute_ms: float = 0.0
    batch_size: int = 0

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
class _Slot:
    """Everything the engine knows about one model."""

    spec: ModelSpec
    model: LoadedModel | None = None
    tier: str = DISK
    vram_bytes: int = 0
    host_bytes: int = 0
    last_used: float = 0.0
    resident_since: float | None = None
    ready: Any = None                        # a pending asynchronous wake (has .wait())
    loading: Future[tuple[LoadedModel, float]] | None = None  # a background load (prewarm of a cold model)


@dataclass
class RoleStats:
    """What one role's micro-batches did: counts, and where their time went."""

    batches: int = 0
    items: int = 0
    tokens: int = 0
    wall_ms: float = 0.0      # model.run on the engine thread
    device_ms: float = 0.0    # the same batches' span on the device (CUDA events; 0 where not measured)
    alloc_retries: int = 0    # allocations that first had to free cached device memory (synchronising)
    cpu_ms: float = 0.0       # of wall_ms, the engine thread on a CPU (launching kernels, Python)
    runq_ms: float = 0.0      # of wall_ms, the engine thread runnable but waiting for a CPU (contention)
    expired: int = 0
    # where run time went, from the backend's last_phases (torch: embed and rerank): tokenise+pad, queue the
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
                + _phases_text(now.phases, before.phases)
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


QUESTION_STAGES = ("embed", "rerank", "generate")  # an urgent question's model stages, in order
EXPECT_S = 5.0  # how long an urgent stage marks its question's later stages' models as expected


def thread_schedstat() -> tuple[float, float]:
    """(ms on a CPU, ms runnable but waiting for one) of the calling thread so far, from Linux's schedstat; zeros
    where the kernel does not expose it."""
    try:
        with open("/proc/thread-self/schedstat") as f:
            on_cpu, waiting = f.read().split()[:2]
        return int(on_cpu) / 1e6, int(waiting) / 1e6
    except (OSError, ValueError):
        return 0.0, 0.0


class Engine:
    def __init__(
        self,
        device: str,
        specs: dict[str, ModelSpec],
        loader: Loader,
        budget_bytes: int,
        *,
        host_budget_bytes: int = 0,
        cooldown_s: float = 0.0,
        on_model_event: EventSink | None = None,
        profiles: ProfileStore | None = None,
        device_kind: str = "cpu",
        token_counter: TokenCounter | None = None,
        clock: Callable[[], float] = time.monotonic,
        waiter: Callable[[float], None] | None = None,
        max_pending: int = 100_000,
        report_interval_s: float = 30.0,
        urgent_yield_s: float = 0.0,
        urgent_yield_ms: float = 0.0,
        metrics: Any = None,
        memory_used: Callable[[], int] | None = None,
        on_sample: EventSink | None = None,
        sample_interval_s: float = 5.0,
        knob_source: Callable[[], dict[str, float]] | None = None,
        knob_interval_s: float = 10.0,
    ) -> None:
        self.device = device
        self.specs = specs
        self.loader = loader
        self.policy = ResidencyPolicy(budget_bytes, host_budget_bytes, cooldown_s)
        self.on_model_event = on_model_event
        self.profiles = profiles or MemoryProfileStore()
        self.device_kind = device_kind
        self.token_counter = token_counter or estimate_tokens
        self.clock = clock
        self.waiter = waiter
        self.max_pending = max_pending
        self.report_interval_s = report_interval_s
        self.urgent_yield_s = urgent_yield_s
        self.urgent_yield_ms = urgent_yield_ms
        self.metrics = metrics                  # workers.metrics.EngineMetrics, or None
        self.memory_used = memory_used          # the device memory the engine holds (default: resident weights)
        self.on_sample = on_sample              # a device_samples row at most every sample_interval_s
        self.sample_interval_s = sample_interval_s
        self._last_sample = float("-inf")
        self._busy_mark = 0.0
        self.knob_source = knob_source          # the tuner's live knob values (workers/tuning.py), read periodically
        self.knob_interval_s = knob_interval_s
        self._unload_seen: float | None = None
        self._last_urgent: float | None = None
        self._expected_until: dict[str, float] = {}  # model -> until when a question in flight expects it
        self.stats = EngineStats()
        self._pending: dict[int, _Request] = {}
        self._slots: dict[str, _Slot] = {}
        for spec in specs.values():
            profile = self.profiles.get(spec.name, device_kind, spec.dtype)
            guess = profile.weights_bytes if profile else (spec.estimate_bytes or 0)
            self._slots[spec.name] = _Slot(spec, vram_bytes=guess, host_bytes=guess)
        self.tuners = {
            spec.name: BatchTuner(
                size=self._start_size(spec), maximum=spec.batch_size,
                latency_target_ms=spec.latency_target_ms or DEFAULT_LATENCY_TARGET_MS.get(spec.role, 1000.0),
            )
            for spec in specs.values()
        }
        self._swap_ms: dict[str, float] = {}
        self._evict_ms: dict[str, float] = {}   # what its last sleep or unload took
        self._prewarm_hints: list[str] = []
        self._ids = itertools.count(1)
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._background = ThreadPoolExecutor(1, thread_name_prefix=f"ragq-load-{device}")
        self._pinning = ThreadPoolExecutor(1, thread_name_prefix=f"ragq-pin-{device}")

    def _start_size(self, spec: ModelSpec) -> int:
        """Where the last run's tuner settled for this model on this kind of device, else the configured start."""
        profile = self.profiles.get(spec.name, self.device_kind, spec.dtype)
        if profile is not None and profile.tuned_batch:
            return profile.tuned_batch
        return spec.initial_batch or DEFAULT_INITIAL_BATCH.get(spec.role, 8)

    @property
    def budget_bytes(self) -> int:
        return self.policy.budget_bytes

    # -- public API (any thread) ---------------------------------------------------------------------------------
    def start(self) -> Engine:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name=f"ragq-engine-{self.device}", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout_s: float = 30.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout_s)
            self._thread = None
        for slot in self._slots.values():
            if slot.loading is not None:
                self._finish_loading(slot)
            if slot.model is not None:
                self._unload(slot, "shutdown")
        self._background.shutdown(wait=True)
        self._pinning.shutdown(wait=True)

    def has_role(self, role: str) -> bool:
        return role in self.specs

    def model_name(self, role: str) -> str:
        return self.specs[role].name

    def submit(
        self,
        role: str,
        items: list[Any],
        *,
        priority: int = BACKGROUND,
        deadline: float | None = None,
        params: dict[str, Any] | None = None,
        tokens: list[int] | None = None,
    ) -> Future[EngineResult]:
        """Queue `items` for `role`; the future resolves with outputs in the same order. `deadline` is on the
        engine's clock; a request still pending at its deadline fails with RequestExpired and never runs.
        `tokens` (one count per item) saves counting them here, when the caller counted already."""
        if role not in self.specs:
            raise BackendUnavailable(f"no model is configured for role {role!r} on {self.device}")
        future: Future[EngineResult] = Future()
        if not items:
            future.set_result(EngineResult([], self.specs[role].name, 0.0, 0.0, 0.0, 0, 0))
            return future
        if tokens is None or len(tokens) != len(items):
            tokens = list(self.token_counter(self.specs[role], list(items)))  # on the caller's thread, as TEI does
        with self._cond:
            if self._stopping:
                raise BackendUnavailable(f"engine on {self.device} is stopping")
            if len(self._pending) >= self.max_pending:
                raise BackendUnavailable(f"engine on {self.device} is busy: {len(self._pending)} requests pending")
            key = next(self._ids)
            if priority == URGENT:
                self._last_urgent = self.clock()
                if role in QUESTION_STAGES:  # the question's later stages come within seconds: keep their models
                    for later in QUESTION_STAGES[QUESTION_STAGES.index(role) + 1:]:
                        if later in self.specs:
                            self._expected_until[self.specs[later].name] = self._last_urgent + EXPECT_S
            self._pending[key] = _Request(
                key, role, list(items), tokens, dict(params or {}), priority, deadline, self.clock(), future,
                todo=list(range(len(items))),
            )
            self._cond.notify_all()
        return future

    def run(self, role: str, items: list[Any], **kwargs: Any) -> EngineResult:
        return self.submit(role, items, **kwargs).result()

    def prewarm(self, role: str) -> None:
        """A hint that `role` comes next (a query's rerank after its search): wake its model early if that evicts
        nothing busy, overlapping the copy with whatever runs meanwhile."""
        if role in self.specs:
            with self._cond:
                self._prewarm_hints.append(self.specs[role].name)
                self._cond.notify_all()

    def resident_models(self) -> dict[str, int]:
        """Models in VRAM (or being brought there) and their bytes."""
        with self._cond:
            return {n: s.vram_bytes for n, s in self._slots.items() if s.tier == VRAM}

    def tiers(self) -> dict[str, str]:
        with self._cond:
            return {n: s.tier for n, s in self._slots.items()}

    def pending_count(self) -> int:
        with self._cond:
            return len(self._pending)

    def stats_snapshot(self) -> EngineStats:
        with self._cond:
            return copy.deepcopy(self.stats)

    # -- the scheduler loop (one thread) ---------------------------------------------------------------------------
    def _loop(self) -> None:
        last = copy.deepcopy(self.stats)
        next_report = time.monotonic() + self.report_interval_s
        next_knobs = time.monotonic()
        while self.step(block=True) is not None:
            self._publish_state(sample_only=True)  # samples go on while idle: a stale sample is no sample
            if self.knob_source is not None and time.monotonic() >= next_knobs:
                next_knobs = time.monotonic() + self.knob_interval_s
                try:
                    self.apply_knobs(self.knob_source())
                except Exception as exc:  # the database away: keep the values we have
                    log.warning("could not read the tuning knobs: %s", exc)
            if self.report_interval_s and time.monotonic() >= next_report:
                ran = sum(r.batches for r in self.stats.roles.values()) - sum(r.batches for r in last.roles.values())
                if ran:
                    log.info("engine %s, last %.0fs: %s", self.device, self.report_interval_s,
                             self.stats.summary(since=last))
                last = copy.deepcopy(self.stats)
                next_report = time.monotonic() + self.report_interval_s

    def step(self, block: bool = False) -> bool | None:
        """One scheduling decision: prewarm hints, then one micro-batch. Returns True if a batch ran, False if
        there was nothing runnable, None once stopping with nothing pending. Tests call it directly."""
        with self._cond:
            waited = time.monotonic()
            if block and not self._pending and not self._prewarm_hints and not self._stopping:
                self._cond.wait(0.5)  # then back to the loop, which keeps its periodic duties while idle
            self.stats.idle_ms += (time.monotonic() - waited) * 1000.0
            if self._stopping and not self._pending:
                return None
            hints, self._prewarm_hints = self._prewarm_hints, []
            now = self.clock()
            for key in expired(self._snapshot(), now):
                request = self._pending.pop(key)
                self.stats.role(request.role).expired += 1
                request.future.set_exception(RequestExpired(
                    f"{request.role} request expired {now - (request.deadline or now):.3f}s ago before it ran"
                ))
            snapshot = self._snapshot()
        for name in hints:
            self._do_prewarm(name)
        if not snapshot:
            return False
        choice = self._choose(snapshot)
        if isinstance(choice, Deferred):
            wait_s = max(0.0, choice.until - self.clock())
            if self.waiter is not None:
                self.waiter(wait_s)
            else:
                with self._cond:
                    self._cond.wait(min(wait_s, 0.5))
            return False
        role, moves = choice
        spec = self.specs[role]
        with self._cond:
            snapshot = [p for p in self._snapshot() if p.role == role]
            tuner = self.tuners[spec.name]
            wait_s = should_wait_for_fuller_batch(snapshot, role, tuner.size, self.clock(),
                                                  spec.max_queue_delay_ms / 1000.0)
            if wait_s > 0 and not moves:
                if self.waiter is not None:
                    self.waiter(wait_s)
                else:
                    self._cond.wait(wait_s)
                return False
            cap = self._memory_cap(spec, snapshot)
        # outside the lock (sleeping a model copies); the snapshot stays valid: only this thread takes work out
        if cap < tuner.size and self._make_room(spec, snapshot):
            cap = self._memory_cap(spec, snapshot)  # idle models made way for the tuned batch size
        with self._cond:
            effective = max(1, min(tuner.size, cap))
            size = yield_to_urgent(effective, self._last_urgent, self.clock(), self.urgent_yield_s,
                                   tuner.rate(effective), self.urgent_yield_ms)
            limits = BatchLimits(
                max_items=max(1, min(size, cap)),
                max_tokens=spec.max_batch_tokens, urgent_items=spec.urgent_batch,
            )
            plan = form_batch(snapshot, role, limits)
            batch: list[tuple[_Request, list[int]]] = []
            for key, indices in plan:
                request = self._pending.get(key)
                if request is None:
                    continue
                taken = set(indices)
                request.todo = [i for i in request.todo if i not in taken]
                batch.append((request, indices))
        if batch:
            self._run_batch(role, batch, moves, limits.max_items)
        return True

    def apply_knobs(self, values: dict[str, float]) -> None:
        """Apply the tuner's live knob values (engine thread): batch size caps, context lengths, queue delays,
        the cooldown, and the unload-idle counter (each increase evicts the models no pending work needs)."""
        for role, spec in list(self.specs.items()):
            changes: dict[str, Any] = {}
            if f"max_length:{spec.name}" in values:
                changes["max_length"] = max(1, int(values[f"max_length:{spec.name}"]))
            if f"max_queue_delay_ms:{spec.name}" in values:
                changes["max_queue_delay_ms"] = max(0.0, float(values[f"max_queue_delay_ms:{spec.name}"]))
            changes = {k: v for k, v in changes.items() if getattr(spec, k) != v}
            if changes:
                new = replace(spec, **changes)
                self.specs[role] = new
                slot = self._slots[spec.name]
                slot.spec = new
                if slot.model is not None and hasattr(slot.model, "spec"):
                    slot.model.spec = new
                log.info("tuning: %s now %s", spec.name, changes)
            if f"batch_max:{spec.name}" in values:
                tuner = self.tuners[spec.name]
                cap = max(1, int(values[f"batch_max:{spec.name}"]))
                if cap != tuner.maximum:
                    unbounded = tuner.ceiling >= tuner.maximum
                    tuner.maximum = cap
                    tuner.ceiling = cap if unbounded else min(tuner.ceiling, cap)
                    tuner.size = min(tuner.size, cap)
                    log.info("tuning: %s batch size at most %d", spec.name, cap)
        if "cooldown_s" in values and values["cooldown_s"] != self.policy.cooldown_s:
            self.policy = replace(self.policy, cooldown_s=float(values["cooldown_s"]))
            log.info("tuning: cooldown %.1fs", self.policy.cooldown_s)
        seen = values.get("unload_idle", 0.0)
        if self._unload_seen is not None and seen > self._unload_seen:
            if self._evict_idle(keep=""):
                log.info("tuning: unloaded the idle models")
        self._unload_seen = seen

    def _memory_cap(self, spec: ModelSpec, snapshot: list[Pending]) -> int:
        """The most items whose measured activations fit next to what is resident (no profile: no cap)."""
        largest = max(spec.batch_size, self.tuners[spec.name].maximum)  # the tuner's cap may exceed the config
        profile = self.profiles.get(spec.name, self.device_kind, spec.dtype)
        if profile is None or not snapshot:
            return largest
        longest = max((t for p in snapshot for _, t in p.items[:256]), default=1)
        resident = sum(s.vram_bytes for s in self._slots.values() if s.tier == VRAM)
        if self._slots[spec.name].tier != VRAM:
            resident += self._slots[spec.name].vram_bytes
        free = self.policy.budget_bytes - resident
        cap = largest
        while cap > 1 and (profile.activation_for(cap, longest) or 0) > free:
            cap //= 2
        return cap

    def _snapshot(self) -> list[Pending]:
        return [
            Pending(r.key, r.role, r.group, r.priority, r.enqueued, tuple((i, r.tokens[i]) for i in r.todo),
                    r.deadline)
            for r in self._pending.values() if r.todo
        ]

    def _views(self, snapshot: list[Pending]) -> dict[str, ModelView]:
        pending: dict[str, int] = {}
        for p in snapshot:
            name = self.specs[p.role].name
            pending[name] = pending.get(name, 0) + 1
        now = self.clock()
        return {
            name: ModelView(name, s.tier, s.vram_bytes, s.host_bytes, s.last_used, s.resident_since,
                            pending.get(name, 0), self._expected_until.get(name, 0.0) > now,
                            (self._swap_in_ms(name) + self._evict_ms.get(name, 0.0)) / 1000.0)
            for name, s in self._slots.items()
        }

    def _swap_in_ms(self, name: str) -> float:
        """What bringing the model in took last time (a load or a wake); first guess: its bytes at 20 GB/s."""
        return self._swap_ms.get(name, self._slots[name].vram_bytes / 20e9 * 1000.0)

    def _activation_reserve(self, name: str) -> int:
        profile = self.profiles.get(name, self.device_kind, self._slots[name].spec.dtype)
        return profile.activation_reserve() if profile else 0

    def _role_loads(self, snapshot: list[Pending], now: float) -> list[RoleLoad]:
        loads = []
        for role, spec in self.specs.items():
            mine = [p for p in snapshot if p.role == role]
            if not mine:
                continue
            urgent = [p for p in mine if p.priority == URGENT]
            background = [p for p in mine if p.priority != URGENT]
            slot = self._slots[spec.name]
            resident = slot.tier == VRAM
            swap_ms = self._swap_in_ms(spec.name)
            loads.append(RoleLoad(
                role, sum(p.remaining for p in urgent), sum(p.remaining for p in background),
                max((now - p.enqueued for p in urgent), default=0.0),
                max((now - p.enqueued for p in background), default=0.0),
                resident, 0.0 if resident else swap_ms / 1000.0,
            ))
        return loads

    def _choose(self, snapshot: list[Pending]) -> tuple[str, list[Move]] | Deferred:
        """The first role in the phase plan whose model can be made resident now; roles whose model would evict
        a model inside its cooldown wait (urgent work overrides the cooldown)."""
        now = self.clock()
        views = self._views(snapshot)
        deferred: list[Deferred] = []
        for role in rank_roles(self._role_loads(snapshot, now)):
            name = self.specs[role].name
            urgent = any(p.role == role and p.priority == URGENT for p in snapshot)
            try:
                plan = admit(views, name, self.policy, now, urgent=urgent,
                             extra_bytes=self._activation_reserve(name))
            except BudgetExceeded as exc:
                self._fail_role(role, exc)
                return Deferred((), now)
            if isinstance(plan, Deferred):
                deferred.append(plan)
                continue
            return role, plan
        return min(deferred, key=lambda d: d.until) if deferred else Deferred((), now)

    def _fail_role(self, role: str, exc: Exception) -> None:
        with self._cond:
            for key in [k for k, r in self._pending.items() if r.role == role]:
                self._pending.pop(key).future.set_exception(exc)

    def _run_batch(self, role: str, batch: list[tuple[_Request, list[int]]], moves: list[Move],
                   limit: int | None = None) -> None:
        spec = self.specs[role]
        slot = self._slots[spec.name]
        start = self.clock()
        for request, _ in batch:
            if request.started is None:
                request.started = start
        items = [request.items[i] for request, indices in batch for i in indices]
        params = batch[0][0].params
        background = all(request.priority != URGENT for request, _ in batch)
        # a batch that waits for its model to arrive (a load, or a wake still copying) times the copy, not the size
        clean_timing = not moves and slot.ready is None and slot.loading is None and slot.tier == VRAM
        # a load running in the background allocates on the device meanwhile: the batch's peak would count it
        quiet = not any(s.loading is not None for s in self._slots.values())
        try:
            t0 = self.clock()
            self._apply(moves)
            model = self._ready(slot)
            load_ms = (self.clock() - t0) * 1000.0
            t0 = self.clock()
            ooms = self.stats.ooms
            sched0 = thread_schedstat()
            if not background and getattr(model, "takes_priority", False):   # e.g. Triton's priority levels
                params = {**params, "urgent": True}
            outputs = self._run_with_recovery(slot, model, items, params)
            sched1 = thread_schedstat()
            clean_timing = clean_timing and self.stats.ooms == ooms  # a recovery's evictions are not its size
            compute_ms = (self.clock() - t0) * 1000.0
            if len(outputs) != len(items):
                raise RagqError(f"model {spec.name} returned {len(outputs)} outputs for {len(items)} inputs")
        except Exception as exc:  # a failed batch fails its requests, never the loop
            log.error("%s batch of %d on %s failed: %s", role, len(items), self.device, exc,
                      exc_info=not isinstance(exc, RagqError))
            with self._cond:
                for request, _ in batch:
                    if self._pending.pop(request.key, None) is not None:
                        request.future.set_exception(exc)
            return
        slot.last_used = self.clock()
        lengths = [request.tokens[i] for request, indices in batch for i in indices]
        longest = max(lengths, default=0)
        retries = getattr(model, "last_alloc_retries", 0) or 0
        counters = self.stats.role(role)
        counters.batches += 1
        counters.items += len(items)
        counters.tokens += sum(lengths)
        counters.wall_ms += compute_ms
        counters.device_ms += getattr(model, "last_device_ms", None) or 0.0
        counters.alloc_retries += retries
        counters.cpu_ms += sched1[0] - sched0[0]
        counters.runq_ms += sched1[1] - sched0[1]
        phases = getattr(model, "last_phases", None) or {}
        for key, value in phases.items():
            counters.phases[key] = counters.phases.get(key, 0.0) + value
        if phases:
            counters.phases["batches_seen"] = counters.phases.get("batches_seen", 0.0) + 1
        self._report("batch", spec.name, role, len(items), sum(lengths), compute_ms / 1000.0, retries)
        self._publish_state()
        if quiet and not any(s.loading is not None for s in self._slots.values()):
            self._record_activation(slot, model, len(items), longest)
        if background and clean_timing:
            tuner = self.tuners[spec.name]
            known = len(tuner.changes)
            tuner.observe(len(items), compute_ms, limit)
            for before, after, why in tuner.changes[known:]:
                log.info("%s batch size %d -> %d on %s: %s", spec.name, before, after, self.device, why)
            if len(tuner.changes) > known:
                self._save_profile(slot, tuned_batch=tuner.size)  # the next start begins here
        position = 0
        finished: list[_Request] = []
        with self._cond:
            for request, indices in batch:
                for index in indices:
                    request.results[index] = outputs[position]
                    position += 1
                request.load_ms += load_ms
                request.compute_ms += compute_ms
                request.batch_size = max(request.batch_size, len(items))
                if request.done:
                    self._pending.pop(request.key, None)
                    finished.append(request)
        for request in finished:
            queue_ms = ((request.started or request.enqueued) - request.enqueued) * 1000.0
            request.future.set_result(EngineResult(
                [request.results[i] for i in range(len(request.items))], spec.name, queue_ms, request.load_ms,
                request.compute_ms, request.batch_size, sum(request.tokens),
            ))

    def _run_with_recovery(self, slot: _Slot, model: LoadedModel, items: list[Any], params: dict[str, Any]) -> list[Any]:
        """Run a batch; on device OOM evict idle models and retry it whole (the room was theirs, the size is not
        to blame); if it still does not fit, shrink the tuner's size, split the batch and retry, down to single
        items."""
        try:
            return list(model.run(items, params))
        except DeviceOutOfMemory as exc:
            self.stats.ooms += 1
            self._event(slot.spec.name, "oom", 0, 0.0, f"batch of {len(items)}: {exc}"[:500])
            if self._evict_idle(keep=slot.spec.name):
                try:
                    return list(model.run(items, params))
                except DeviceOutOfMemory as again:
                    self.stats.ooms += 1
                    self._event(slot.spec.name, "oom", 0, 0.0, f"batch of {len(items)} alone: {again}"[:500])
            tuner = self.tuners[slot.spec.name]
            tuner.out_of_memory(len(items))
            log.info("%s batch size -> %d on %s: out of memory at %d items", slot.spec.name, tuner.size,
                     self.device, len(items))
            if len(items) == 1:
                # one item must progress: models with pending work go too (they come back by a wake)
                if not self._evict_idle(keep=slot.spec.name, everything=True):
                    raise
                return list(model.run(items, params))
            middle = len(items) // 2
            return (self._run_with_recovery(slot, model, items[:middle], params)
                    + self._run_with_recovery(slot, model, items[middle:], params))

    def _make_room(self, spec: ModelSpec, snapshot: list[Pending]) -> bool:
        """Background work whose tuned batch does not fit beside the resident models: models no pending work needs
        and unused for the cooldown go to sleep (a wake is ~0.2 s when a question needs one again; smaller
        batches cost throughput for as long as ingestion runs). True if any went."""
        if any(p.priority == URGENT for p in snapshot):
            return False
        return self._evict_idle(keep=spec.name, unused_for_s=self.policy.cooldown_s,
                                reason=f"idle: room for larger {spec.name} batches")

    def _evict_idle(self, keep: str, everything: bool = False, unused_for_s: float | None = None,
                    reason: str = "evicted after an out-of-memory error") -> bool:
        """Evict models no pending work needs (or, with `everything`, all but `keep`), least recently used first;
        with `unused_for_s`, only those unused for that long. True if any went."""
        now = self.clock()
        with self._cond:
            views = self._views(self._snapshot())
        idle = [v for v in views.values()
                if v.tier == VRAM and v.name != keep and (everything or v.pending == 0)
                and (unused_for_s is None or now - (v.last_used or 0.0) >= unused_for_s)]
        if not idle:
            return False
        self._apply(evict_moves(sorted(idle, key=lambda v: v.last_used), views, self.policy, reason, keep=keep))
        return True

    # -- residency moves ---------------------------------------------------------------------------------------------
    def _apply(self, moves: list[Move]) -> None:
        for move in moves:
            slot = self._slots[move.model]
            if move.action in (SLEEP, UNLOAD):
                self._event(move.model, "evict", slot.vram_bytes, 0.0, move.reason)
            if move.action == SLEEP:
                self._sleep(slot, move.reason)
            elif move.action == UNLOAD:
                self._unload(slot, move.reason)
            elif move.action == DROP_HOST:
                self._unload(slot, move.reason)
            elif move.action == WAKE:
                self._wake(slot, move.reason, asynchronous=move.reason.startswith("prewarm"))
            elif move.action == LOAD:
                self._load(slot, move.reason, background=move.reason.startswith("prewarm"))

    def _do_prewarm(self, name: str) -> None:
        with self._cond:
            views = self._views(self._snapshot())
        try:
            self._apply(prewarm(views, name, self.policy, self.clock()))
        except Exception:
            log.exception("prewarm of %s failed", name)

    def _ready(self, slot: _Slot) -> LoadedModel:
        """The slot's model, active on the device: finishing a background load or an asynchronous wake."""
        if slot.loading is not None:
            self._finish_loading(slot)
        if slot.tier == HOST:
            self._wake(slot, "needed by pending work", asynchronous=False)
        elif slot.tier == DISK or slot.model is None:
            self._load(slot, "needed by pending work", background=False)
        if slot.ready is not None:
            slot.ready.wait()
            slot.ready = None
        assert slot.model is not None
        return slot.model

    def _load(self, slot: _Slot, reason: str, background: bool) -> None:
        if background:
            slot.tier = VRAM  # its bytes count against the budget from now on
            slot.resident_since = self.clock()
            slot.loading = self._background.submit(self._timed_load, slot.spec)
            return
        t0 = self.clock()
        try:
            model = self.loader(slot.spec, self.device)
        except DeviceOutOfMemory as exc:  # the first guess of its size was low: make room, try once more
            self.stats.ooms += 1
            self._event(slot.spec.name, "oom", slot.vram_bytes, 0.0, f"loading: {exc}"[:500])
            if not self._evict_idle(keep=slot.spec.name, everything=True):
                raise
            model = self.loader(slot.spec, self.device)
        slot.tier = VRAM
        slot.resident_since = self.clock()
        self._loaded(slot, model, (self.clock() - t0) * 1000.0, reason)

    def _timed_load(self, spec: ModelSpec) -> tuple[LoadedModel, float]:
        t0 = self.clock()
        model = self.loader(spec, self.device)
        return model, (self.clock() - t0) * 1000.0

    def _finish_loading(self, slot: _Slot) -> None:
        future, slot.loading = slot.loading, None
        assert future is not None
        try:
            model, ms = future.result()
        except Exception:
            slot.tier, slot.resident_since = DISK, None
            raise
        self._loaded(slot, model, ms, "prewarm: loaded in the background")

    def _loaded(self, slot: _Slot, model: LoadedModel, ms: float, reason: str) -> None:
        slot.model = model
        slot.vram_bytes = slot.host_bytes = model.nbytes
        slot.last_used = self.clock()
        self.stats.loads += 1
        self.stats.load_ms += ms
        self._swap_ms[slot.spec.name] = ms
        self._event(slot.spec.name, "load", model.nbytes, ms, reason)
        self._save_profile(slot, weights_bytes=model.nbytes)
        self._prepare_host_copy(model)
        if model.nbytes > self.policy.budget_bytes:
            self._unload(slot, "larger than the budget")
            raise BudgetExceeded(
                f"model {slot.spec.name} measured {model.nbytes} bytes, more than the budget of "
                f"{self.policy.budget_bytes}"
            )
        # the first guess may have been low: put back within the budget what no pending work needs
        with self._cond:
            views = self._views(self._snapshot())
        self._apply(trim_to_budget(views, slot.spec.name, self.policy,
                                   f"{slot.spec.name} measured larger than its first guess"))

    def _prepare_host_copy(self, model: LoadedModel) -> None:
        """Where every model's host copy fits the host tier at once, make a new model's copy now, off the loop, so
        that evicting it later is a pointer switch instead of seconds of pinning while work waits."""
        prepare = getattr(model, "prepare_host_copy", None)
        if prepare is None or len(self._slots) < 2:
            return
        if sum(s.vram_bytes for s in self._slots.values()) > self.policy.host_budget_bytes:
            return

        def run() -> None:
            try:
                prepare()
            except Exception:
                log.exception("could not prepare the host copy of %s (a sleep will make it)", model.name)

        self._pinning.submit(run)

    def _wake(self, slot: _Slot, reason: str, asynchronous: bool) -> None:
        if slot.model is None:  # its host copy was dropped meanwhile: load it instead
            self._load(slot, reason, background=asynchronous)
            return
        t0 = self.clock()
        slot.ready = slot.model.wake(asynchronous=asynchronous)
        if not asynchronous and slot.ready is not None:
            slot.ready.wait()
            slot.ready = None
        slot.tier = VRAM
        slot.resident_since = self.clock()
        ms = (self.clock() - t0) * 1000.0
        self.stats.wakes += 1
        if not asynchronous:
            self._swap_ms[slot.spec.name] = ms
        self._event(slot.spec.name, "wake", slot.vram_bytes, ms, reason)

    def _sleep(self, slot: _Slot, reason: str) -> None:
        if slot.loading is not None:
            self._finish_loading(slot)
        if slot.ready is not None:
            slot.ready.wait()
            slot.ready = None
        assert slot.model is not None
        t0 = self.clock()
        slot.model.sleep()
        slot.tier = HOST
        slot.resident_since = None
        self.stats.sleeps += 1
        self._evict_ms[slot.spec.name] = (self.clock() - t0) * 1000.0
        self._event(slot.spec.name, "sleep", slot.host_bytes, self._evict_ms[slot.spec.name], reason)

    def _unload(self, slot: _Slot, reason: str) -> None:
        if slot.loading is not None:
            try:
                self._finish_loading(slot)
            except Exception:
                return
        if slot.model is None:
            slot.tier = DISK
            return
        t0 = self.clock()
        if slot.ready is not None:
            slot.ready.wait()
            slot.ready = None
        slot.model.unload()
        slot.model = None
        nbytes = slot.vram_bytes
        slot.tier = DISK
        slot.resident_since = None
        self.stats.unloads += 1
        self._evict_ms[slot.spec.name] = (self.clock() - t0) * 1000.0
        self._event(slot.spec.name, "unload", nbytes, self._evict_ms[slot.spec.name], reason)

    # -- footprints ----------------------------------------------------------------------------------------------
    def _record_activation(self, slot: _Slot, model: LoadedModel, batch_size: int, max_tokens: int) -> None:
        peak = getattr(model, "last_peak_bytes", None)
        if peak is None:
            return
        self._save_profile(slot, activation=(batch_size, max_tokens, int(peak)))

    def _save_profile(self, slot: _Slot, weights_bytes: int | None = None,
                      activation: tuple[int, int, int] | None = None, tuned_batch: int | None = None) -> None:
        spec = slot.spec
        profile = self.profiles.get(spec.name, self.device_kind, spec.dtype) or ModelProfile(
            spec.name, self.device_kind, spec.dtype, weights_bytes or slot.vram_bytes)
        changed = False
        if weights_bytes is not None and weights_bytes != profile.weights_bytes:
            profile.weights_bytes = weights_bytes
            changed = True
        if activation is not None:
            changed = profile.observe(*activation) or changed
        if tuned_batch is not None and tuned_batch != profile.tuned_batch:
            profile.tuned_batch = tuned_batch
            changed = True
        if changed or weights_bytes is not None:
            try:
                self.profiles.put(profile)
            except Exception:
                log.exception("could not persist the profile of %s", spec.name)

    def _report(self, method: str, *args: Any) -> None:
        if self.metrics is None:
            return
        try:
            getattr(self.metrics, method)(*args)
        except Exception:  # metrics must never break serving
            log.exception("metrics: %s failed", method)

    def _publish_state(self, sample_only: bool = False) -> None:
        """Residency, memory and pending work to the metrics; a device sample when one is due."""
        due = self.on_sample is not None and time.monotonic() - self._last_sample >= self.sample_interval_s
        if (self.metrics is None or sample_only) and not due:
            return
        with self._cond:
            resident = {n: s.tier == VRAM for n, s in self._slots.items()}
            used = sum(s.vram_bytes for s in self._slots.values() if s.tier == VRAM)
            pending = {"urgent": 0, "background": 0}
            for request in self._pending.values():
                pending["urgent" if request.priority == URGENT else "background"] += 1
        if self.memory_used is not None:
            try:
                used = self.memory_used()
            except Exception:
                log.exception("metrics: reading device memory failed")
        if not sample_only:
            self._report("state", resident, used, self.policy.budget_bytes, pending)
        if due:
            now = time.monotonic()
            # compute time of the device since the last sample (device time where measured, else run time)
            busy = sum(r.device_ms or r.wall_ms for r in self.stats.roles.values())
            interval_ms = (now - self._last_sample) * 1000.0 if self._last_sample > float("-inf") else None
            busy_ms = busy - self._busy_mark if interval_ms is not None else None
            self._last_sample, self._busy_mark = now, busy
            try:
                self.on_sample({"device": self.device, "used_bytes": int(used),
                                "budget_bytes": int(self.policy.budget_bytes),
                                "resident": ",".join(sorted(n for n, here in resident.items() if here)),
                                "busy_ms": busy_ms, "interval_ms": interval_ms})
            except Exception:
                log.exception("device sample sink failed")

    def _event(self, model: str, event: str, nbytes: int, ms: float, reason: str) -> None:
        log.info("model %s %s on %s: %.1f MiB in %.0f ms (%s)", model, event, self.device, nbytes / 2**20, ms, reason)
        self._report("model_event", model, event, ms)
        if event != "evict":
            self._publish_state()
        if self.on_model_event is not None:
            try:
                self.on_model_event({
                    "device": self.device, "model": model, "event": event, "bytes": nbytes, "ms": ms,
                    "reason": reason,
                })
            except Exception:  # recording must never break serving
                log.exception("model event sink failed")


__all__ = ["BACKGROUND", "URGENT", "Engine", "EngineResult"]
