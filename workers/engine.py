"""The per-device engine: one thread owns all device state; other threads talk to it through an inbox.

Task threads (or the engine process's connection threads) `submit` requests and wait on a future; prewarm hints,
the tuner's knob values and snapshot queries arrive the same way. Each step of the engine's thread drains the
inbox, drops requests whose deadline passed, then:

  plan     scheduler.plan.plan(snapshot): which residency moves, which micro-batch, or wait until when (pure);
  execute  the moves (workers/slots.py) and the batch (the backend's `execute`), recovering from out-of-memory
           errors by evicting idle models and splitting the batch;
  update   the requests' results, the counters, the batch tuner, the measured footprints; observers hear of it.

It groups pending requests of the same role into micro-batches (one load serves many jobs), lets urgent work jump
ahead at micro-batch boundaries, and keeps models in three tiers (VRAM, pinned host RAM, disk) within the budgets.
Loading, moving and running models are the backend's, injected through the loader, so the same engine runs in
tests with fakes or tiny models and on a GPU unchanged.
"""

from __future__ import annotations

import copy
import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import replace
from typing import Any

from ragq.core.errors import BackendUnavailable, DeviceOutOfMemory, RagqError, RequestExpired
from scheduler.batching import BACKGROUND, URGENT, BatchTuner, Pending, Priority, expired
from scheduler.plan import EngineSnapshot, FailRole, RoleConfig, RunBatch, Wait, plan
from scheduler.residency import HOST, VRAM, ResidencyPolicy, prewarm
from workers.backends import BatchOutput, LoadedModel
from workers.decoding import Decoding, Streamer
from workers.knobs import apply_knobs
from workers.engine_state import (
    EngineConfig, EngineResult, EngineStats, Message, Prewarm, Query, Request, SetKnobs, Slot, Submit, Wake,
    estimate_tokens, thread_schedstat,
)
from workers.models import DEFAULT_INITIAL_BATCH, DEFAULT_LATENCY_TARGET_MS, ModelSpec
from workers.observer import BatchReport, DeviceState, EngineObserver, Observers
from workers.profiles import MemoryProfileStore, ProfileStore
from workers.slots import Loader, ModelSlots

log = logging.getLogger(__name__)

TokenCounter = Callable[[ModelSpec, list[Any]], list[int]]

QUESTION_STAGES = ("embed", "rerank", "generate")  # an urgent question's model stages, in order
EXPECT_S = 5.0  # how long an urgent stage marks its question's later stages' models as expected


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
        observer: EngineObserver | None = None,
        profiles: ProfileStore | None = None,
        device_kind: str = "cpu",
        token_counter: TokenCounter | None = None,
        clock: Callable[[], float] = time.monotonic,
        waiter: Callable[[float], None] | None = None,
        memory_used: Callable[[], int] | None = None,
        knob_source: Callable[[], dict[str, float]] | None = None,
        config: EngineConfig | None = None,
    ) -> None:
        self.device = device
        self.specs = specs
        self.config = config or EngineConfig()
        self.token_counter = token_counter or estimate_tokens
        self.clock = clock
        self.waiter = waiter                    # tests with a fake clock: advance it instead of waiting
        self.memory_used = memory_used          # the device memory the engine holds (default: resident weights)
        self.knob_source = knob_source          # the tuner's live knob values (workers/tuning.py), read periodically
        self.observer = observer if isinstance(observer, Observers) else Observers(*([observer] if observer else []))
        self.stats = EngineStats()
        self.residency = ModelSlots(
            device, specs.values(), loader, ResidencyPolicy(budget_bytes, host_budget_bytes, cooldown_s),
            profiles=profiles or MemoryProfileStore(), device_kind=device_kind, clock=clock, stats=self.stats,
            observer=self.observer, demand=self._demand, changed=self._publish_state)
        self.tuners = {spec.name: BatchTuner(
            size=self._start_size(spec), maximum=spec.batch_size,
            latency_target_ms=spec.latency_target_ms or DEFAULT_LATENCY_TARGET_MS.get(spec.role, 1000.0))
            for spec in specs.values()}
        # the engine thread's own state
        self._pending: dict[int, Request] = {}
        self._hints: list[tuple[str, bool]] = []
        self._last_urgent: float | None = None
        self._busy_until = float("-inf")   # when work was last pending or last ran (the idle restore counts from there)
        self._expected_until: dict[str, float] = {}  # model -> until when a question in flight expects it
        self._unload_seen: float | None = None
        self._last_sample = float("-inf")
        self._busy_mark = 0.0
        # shared with other threads: the inbox, the count of requests in flight, the stop flag
        self._inbox: queue.SimpleQueue[Message] = queue.SimpleQueue()
        self._ids = itertools.count(1)
        self._admission = threading.Lock()
        self._in_flight = 0
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._knob_thread: threading.Thread | None = None
        self._decoding = Decoding(self)          # generate requests in a continuous decode loop (workers/decoding.py)
        self.streamer: Streamer | None = None    # where answers' pieces go (params["stream"])

    def _start_size(self, spec: ModelSpec) -> int:
        """Where the last run's tuner settled for this model on this kind of device, else the configured start."""
        profile = self.residency.profile(spec)
        if profile is not None and profile.tuned_batch:
            return profile.tuned_batch
        return spec.initial_batch or DEFAULT_INITIAL_BATCH.get(spec.role, 8)

    @property
    def policy(self) -> ResidencyPolicy:
        return self.residency.policy

    @property
    def budget_bytes(self) -> int:
        return self.policy.budget_bytes

    @property
    def urgent_yield_s(self) -> float:
        return self.config.urgent_yield_s

    @urgent_yield_s.setter
    def urgent_yield_s(self, seconds: float) -> None:
        self.config = replace(self.config, urgent_yield_s=seconds)

    @property
    def urgent_yield_ms(self) -> float:
        return self.config.urgent_yield_ms

    @urgent_yield_ms.setter
    def urgent_yield_ms(self, ms: float) -> None:
        self.config = replace(self.config, urgent_yield_ms=ms)

    @property
    def loader(self) -> Loader:
        return self.residency.loader

    @loader.setter
    def loader(self, loader: Loader) -> None:
        self.residency.loader = loader

    @property
    def profiles(self) -> ProfileStore:
        return self.residency.profiles

    @property
    def _slots(self) -> dict[str, Slot]:
        return self.residency.slots

    # -- public API (any thread) ---------------------------------------------------------------------------------
    def start(self) -> Engine:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name=f"ragq-engine-{self.device}", daemon=True)
            self._thread.start()
            if self.knob_source is not None:
                self._knob_thread = threading.Thread(target=self._read_knobs, name=f"ragq-knobs-{self.device}",
                                                     daemon=True)
                self._knob_thread.start()
        return self

    def stop(self, timeout_s: float = 30.0) -> None:
        self._stopping.set()
        self._inbox.put(Wake())
        if self._thread is not None:
            self._thread.join(timeout_s)
            self._thread = None
        self.residency.close()   # the engine thread has ended: what it owned is this thread's now

    def has_role(self, role: str) -> bool:
        return role in self.specs

    def model_name(self, role: str) -> str:
        return self.specs[role].name

    def submit(self, role: str, items: list[Any], *, priority: int = BACKGROUND, deadline: float | None = None,
               params: dict[str, Any] | None = None, tokens: list[int] | None = None) -> Future[EngineResult]:
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
        if self._stopping.is_set():
            raise BackendUnavailable(f"engine on {self.device} is stopping")
        with self._admission:
            if self._in_flight >= self.config.max_pending:
                raise BackendUnavailable(f"engine on {self.device} is busy: {self._in_flight} requests pending")
            self._in_flight += 1
        request = Request(next(self._ids), role, list(items), tokens, dict(params or {}), Priority(priority),
                          deadline, self.clock(), future, todo=list(range(len(items))))
        self._inbox.put(Submit(request))
        return future

    def run(self, role: str, items: list[Any], **kwargs: Any) -> EngineResult:
        return self.submit(role, items, **kwargs).result()

    def prewarm(self, role: str, urgent: bool = False) -> None:
        """A hint that `role` comes next (a query's rerank after its search): wake its model early if that evicts
        nothing busy, overlapping the copy with whatever runs meanwhile; `urgent` (an urgent question's next
        stage) also evicts models inside their cooldown."""
        if role in self.specs:
            self._inbox.put(Prewarm(self.specs[role].name, urgent))

    def push_knobs(self, values: dict[str, float]) -> None:
        """The tuner's knob values, applied by the engine thread at its next step."""
        self._inbox.put(SetKnobs(dict(values)))

    def pending_count(self) -> int:
        """Requests submitted and not yet answered."""
        with self._admission:
            return self._in_flight

    def resident_models(self) -> dict[str, int]:
        """Models in VRAM (or being brought there) and their bytes."""
        return self._read(lambda: {n: s.vram_bytes for n, s in self._slots.items() if s.tier == VRAM})

    def tiers(self) -> dict[str, str]:
        return self._read(lambda: {n: str(s.tier) for n, s in self._slots.items()})

    def stats_snapshot(self) -> EngineStats:
        return self._read(lambda: copy.deepcopy(self.stats))

    def _read(self, read: Callable[[], Any], timeout_s: float = 60.0) -> Any:
        """Read state on the engine thread (between steps), or here when no engine thread runs."""
        thread = self._thread
        if thread is None or not thread.is_alive() or thread is threading.current_thread():
            return read()
        future: Future[Any] = Future()
        self._inbox.put(Query(read, future))
        return future.result(timeout_s)

    # -- the engine thread -------------------------------------------------------------------------------------------
    def _loop(self) -> None:
        last = copy.deepcopy(self.stats)
        since = time.monotonic()
        while self.step(block=True) is not None:
            self._publish_state(sample_only=True)  # samples go on while idle: a stale sample is no sample
            if self.config.report_interval_s and time.monotonic() >= since + self.config.report_interval_s:
                self._report(last, since)
                last, since = copy.deepcopy(self.stats), time.monotonic()
        if self.config.report_interval_s:
            self._report(last, since)   # the window the stop cut short
        self._drain()   # answer queries that came in while stopping; a submission that raced the stop fails
        for request in list(self._pending.values()):
            self._fail(request, BackendUnavailable(f"engine on {self.device} stopped before running it"))

    def _report(self, last: EngineStats, since: float) -> None:
        """The engine's periodic line: what ran since `last` (nothing when nothing ran)."""
        ran = sum(r.batches for r in self.stats.roles.values()) - sum(r.batches for r in last.roles.values())
        if ran:
            log.info("engine %s, last %.0fs: %s", self.device, time.monotonic() - since, self.stats.summary(since=last))

    def _read_knobs(self) -> None:
        """Off the engine thread: read the tuner's knobs (SQL) every knob interval and push them in."""
        while not self._stopping.is_set():
            try:
                self.push_knobs(self.knob_source())  # type: ignore[misc]
            except Exception as exc:  # the database away: keep the values we have
                log.warning("could not read the tuning knobs: %s", exc)
            self._stopping.wait(self.config.knob_interval_s)

    def step(self, block: bool = False) -> bool | None:
        """One scheduling decision: the inbox, prewarm hints, then one micro-batch. Returns True if a batch ran,
        False if there was nothing runnable, None once stopping with nothing pending. Tests call it directly."""
        waited = time.monotonic()
        if block and not self._pending and not self._stopping.is_set():
            self._wait_for_message(0.5)  # then back to the loop, which keeps its periodic duties while idle
        self.stats.idle_ms += (time.monotonic() - waited) * 1000.0
        self._drain()
        if self._stopping.is_set() and not self._pending:
            return None
        self._expire(self.clock())
        hints, self._hints = self._hints, []
        for name, urgent in hints:
            self._do_prewarm(name, urgent)
        if not self._pending:
            self._restore_when_idle()
            return False
        self._busy_until = self.clock()
        decision = plan(self._snapshot())
        if isinstance(decision, Wait):
            self._wait(max(0.0, decision.until - self.clock()))
            return False
        if isinstance(decision, FailRole):
            for request in [r for r in self._pending.values() if r.role == decision.role]:
                self._fail(request, decision.error)
            return False
        batch = self._take(decision)
        if batch:
            self._run_batch(decision, batch)
            self._busy_until = self.clock()   # idle counts from the end of the last batch, not its start
        return True

    def _wait(self, seconds: float) -> None:
        if self.waiter is not None:
            self.waiter(seconds)
        else:
            self._wait_for_message(min(seconds, 0.5))

    def _wait_for_message(self, timeout_s: float) -> None:
        try:
            message = self._inbox.get(timeout=max(0.0, timeout_s))
        except queue.Empty:
            return
        self._handle(message)

    def _drain(self) -> None:
        while True:
            try:
                message = self._inbox.get_nowait()
            except queue.Empty:
                return
            self._handle(message)

    def _handle(self, message: Message) -> None:
        if isinstance(message, Submit):
            request = message.request
            self._pending[request.key] = request
            if request.priority == URGENT:
                self._last_urgent = request.enqueued
                if request.role in QUESTION_STAGES:  # the question's later stages come within seconds: keep them
                    for later in QUESTION_STAGES[QUESTION_STAGES.index(request.role) + 1:]:
                        if later in self.specs:
                            self._expected_until[self.specs[later].name] = request.enqueued + EXPECT_S
        elif isinstance(message, Prewarm):
            self._hints.append((message.model, message.urgent))
        elif isinstance(message, SetKnobs):
            self.apply_knobs(message.values)
        elif isinstance(message, Query):
            try:
                message.future.set_result(message.read())
            except Exception as exc:
                message.future.set_exception(exc)

    def _expire(self, now: float) -> None:
        for key in expired(self._pending_view(), now):
            request = self._pending[key]
            self.stats.role(request.role).expired += 1
            self._fail(request, RequestExpired(
                f"{request.role} request expired {now - (request.deadline or now):.3f}s ago before it ran"))

    def _finish(self, request: Request) -> None:
        if self._pending.pop(request.key, None) is not None:
            with self._admission:
                self._in_flight -= 1

    def _fail(self, request: Request, exc: BaseException) -> None:
        if request.key in self._pending:
            self._finish(request)
            request.future.set_exception(exc)

    def _restore_when_idle(self) -> None:
        """Nothing pending for `idle_restore_s` and no load in flight: the embedder, asleep to make way for the
        generator, comes back as a prewarm (evicting nothing busy or cooling); its wake is the one a question waited
        for whole (later stages wake while the stages before them run)."""
        delay, spec = self.config.idle_restore_s, self.specs.get("embed")
        if delay <= 0 or spec is None or self.clock() - self._busy_until < delay or self.residency.loading_any():
            return
        if self._slots[spec.name].tier == HOST:
            self._do_prewarm(spec.name)

    def _do_prewarm(self, name: str, urgent: bool = False) -> None:
        try:
            self.residency.apply(prewarm(self.residency.views(), name, self.policy, self.clock(), urgent=urgent))
        except Exception:
            log.exception("prewarm of %s failed", name)

    # -- plan ------------------------------------------------------------------------------------------------------
    def _pending_view(self) -> list[Pending]:
        """Items not yet scheduled, and those in a decode loop: their role stays wanted until they finish, as work
        that just arrived, so that requests of other roles that waited (a question's rerank) run between two
        slices of decode steps instead of after every answer in flight."""
        views, now = [], self.clock()
        for r in self._pending.values():
            decoding = not r.todo and r.key in self._decoding.requests
            items = r.todo or (self._decoding.in_flight(r) if decoding else [])
            if items:
                views.append(Pending(r.key, r.role, r.group, r.priority, now if decoding else r.enqueued,
                                     tuple((i, r.tokens[i]) for i in items), r.deadline))
        return views

    def _demand(self) -> tuple[dict[str, int], set[str]]:
        """Pending requests per model, and the models a question in flight expects soon."""
        pending: dict[str, int] = {}
        for r in self._pending.values():
            if r.todo or r.key in self._decoding.requests:
                name = self.specs[r.role].name
                pending[name] = pending.get(name, 0) + 1
        now = self.clock()
        return pending, {name for name, until in self._expected_until.items() if until > now}

    def _snapshot(self) -> EngineSnapshot:
        roles = {role: RoleConfig(spec.name, spec.batch_size, spec.urgent_batch, spec.max_batch_tokens,
                                  spec.max_queue_delay_ms / 1000.0) for role, spec in self.specs.items()}
        return EngineSnapshot(
            now=self.clock(), pending=self._pending_view(), roles=roles, models=self.residency.views(),
            tuners=self.tuners, footprints={s.name: self.residency.profile(s) for s in self.specs.values()},
            swap_in_s={name: self.residency.swap_in_ms(name) / 1000.0 for name in self._slots},
            policy=self.policy, last_urgent=self._last_urgent, urgent_yield_s=self.config.urgent_yield_s,
            urgent_yield_ms=self.config.urgent_yield_ms)

    def _take(self, decision: RunBatch) -> list[tuple[Request, list[int]]]:
        batch: list[tuple[Request, list[int]]] = []
        for key, indices in decision.take:
            request = self._pending.get(key)
            if request is None:
                continue
            taken = set(indices)
            request.todo = [i for i in request.todo if i not in taken]
            batch.append((request, list(indices)))
        return batch

    # -- execute and update ----------------------------------------------------------------------------------------
    def _run_batch(self, decision: RunBatch, batch: list[tuple[Request, list[int]]]) -> None:
        role = decision.role
        spec = self.specs[role]
        slot = self._slots[spec.name]
        start = self.clock()
        for request, _ in batch:
            if request.started is None:
                request.started = start
        items = [request.items[i] for request, indices in batch for i in indices]
        params = batch[0][0].params
        background = all(request.priority != URGENT for request, _ in batch)
        try:
            self.residency.apply(decision.room)   # idle models make way for the tuned batch size
            # a batch that waits for its model to arrive (a load, or a wake still copying) times the copy, not its size
            clean_timing = (not decision.moves and slot.ready is None and slot.loading is None
                            and slot.tier == VRAM)
            # a load running in the background allocates on the device meanwhile: the batch's peak would count it
            quiet = not self.residency.loading_any()
            t0 = self.clock()
            self.residency.apply(decision.moves)
            model = self.residency.ready(slot)
            load_ms = (self.clock() - t0) * 1000.0
            if getattr(model, "continuous", False):   # sequences join its decode loop, which runs a slice
                return self._decoding.run(role, batch, slot, model, load_ms)
            t0 = self.clock()
            ooms = self.stats.ooms
            sched0 = thread_schedstat()
            if not background and model.takes_priority:   # e.g. Triton's priority levels
                params = {**params, "urgent": True}
            output = self._run_with_recovery(slot, model, items, params)
            sched1 = thread_schedstat()
            clean_timing = clean_timing and self.stats.ooms == ooms  # a recovery's evictions are not its size
            compute_ms = (self.clock() - t0) * 1000.0
            if len(output.outputs) != len(items):
                raise RagqError(f"model {spec.name} returned {len(output.outputs)} outputs for {len(items)} inputs")
        except Exception as exc:  # a failed batch fails its requests, never the loop
            log.error("%s batch of %d on %s failed: %s", role, len(items), self.device, exc,
                      exc_info=not isinstance(exc, RagqError))
            for request, _ in batch:
                self._fail(request, exc)
            return
        slot.last_used = self.clock()
        lengths = [request.tokens[i] for request, indices in batch for i in indices]
        self._count(role, spec.name, output, lengths, compute_ms, sched1[0] - sched0[0], sched1[1] - sched0[1])
        if quiet and not self.residency.loading_any():
            self.residency.record_activation(slot, output.peak_bytes, len(items), max(lengths, default=0))
        if background and clean_timing:
            self._tune(slot, len(items), compute_ms, decision.max_items)
        self._complete(batch, output.outputs, spec.name, load_ms, compute_ms, len(items))

    def _count(self, role: str, model: str, output: BatchOutput, lengths: list[int], compute_ms: float,
               cpu_ms: float, runq_ms: float) -> None:
        counters = self.stats.role(role)
        counters.batches += 1
        counters.items += len(lengths)
        counters.tokens += sum(lengths)
        counters.wall_ms += compute_ms
        counters.device_ms += output.device_ms or 0.0
        counters.alloc_retries += output.alloc_retries
        counters.cpu_ms += cpu_ms
        counters.runq_ms += runq_ms
        for key, value in output.phases.items():
            counters.phases[key] = counters.phases.get(key, 0.0) + value
        if output.phases:
            counters.phases["batches_seen"] = counters.phases.get("batches_seen", 0.0) + 1
        self.observer.batch(BatchReport(self.device, model, role, len(lengths), sum(lengths), compute_ms / 1000.0,
                                        output.alloc_retries))
        self._publish_state()

    def _tune(self, slot: Slot, items: int, compute_ms: float, limit: int) -> None:
        tuner = self.tuners[slot.spec.name]
        known = len(tuner.changes)
        tuner.observe(items, compute_ms, limit)
        for before, after, why in tuner.changes[known:]:
            log.info("%s batch size %d -> %d on %s: %s", slot.spec.name, before, after, self.device, why)
        if len(tuner.changes) > known:
            self.residency.save_profile(slot, tuned_batch=tuner.size)  # the next start begins here

    def _complete(self, batch: list[tuple[Request, list[int]]], outputs: list[Any], model: str, load_ms: float,
                  compute_ms: float, size: int) -> None:
        position = 0
        for request, indices in batch:
            for index in indices:
                request.results[index] = outputs[position]
                position += 1
            request.load_ms += load_ms
            request.compute_ms += compute_ms
            request.batch_size = max(request.batch_size, size)
            if request.done and request.key in self._pending:
                self._finish_request(request)

    def _finish_request(self, request: Request) -> None:
        self._finish(request)
        queue_ms = ((request.started or request.enqueued) - request.enqueued) * 1000.0
        first = request.first_token_at
        request.future.set_result(EngineResult(
            [request.results[i] for i in range(len(request.items))], self.specs[request.role].name, queue_ms,
            request.load_ms, request.compute_ms, request.batch_size, sum(request.tokens),
            None if first is None else (first - request.enqueued) * 1000.0))

    def _run_with_recovery(self, slot: Slot, model: LoadedModel, items: list[Any], params: dict[str, Any]
                           ) -> BatchOutput:
        """Run a batch; on device OOM evict idle models and retry it whole (the room was theirs, the size is not
        to blame); if it still does not fit, shrink the tuner's size, split the batch and retry, down to single
        items."""
        try:
            return model.execute(items, params)
        except DeviceOutOfMemory as exc:
            self.stats.ooms += 1
            self.residency.event(slot.spec.name, "oom", 0, 0.0, f"batch of {len(items)}: {exc}"[:500])
            if self.residency.evict_idle(keep=slot.spec.name):
                try:
                    return model.execute(items, params)
                except DeviceOutOfMemory as again:
                    self.stats.ooms += 1
                    self.residency.event(slot.spec.name, "oom", 0, 0.0, f"batch of {len(items)} alone: {again}"[:500])
            tuner = self.tuners[slot.spec.name]
            tuner.out_of_memory(len(items))
            log.info("%s batch size -> %d on %s: out of memory at %d items", slot.spec.name, tuner.size,
                     self.device, len(items))
            if len(items) == 1:
                # one item must progress: models with pending work go too (they come back by a wake)
                if not self.residency.evict_idle(keep=slot.spec.name, everything=True):
                    raise
                return model.execute(items, params)
            middle = len(items) // 2
            first = self._run_with_recovery(slot, model, items[:middle], params)
            second = self._run_with_recovery(slot, model, items[middle:], params)
            phases = {k: first.phases.get(k, 0.0) + second.phases.get(k, 0.0) for k in {*first.phases, *second.phases}}
            return BatchOutput(first.outputs + second.outputs,
                               None if first.device_ms is None else first.device_ms + (second.device_ms or 0.0),
                               max(first.peak_bytes or 0, second.peak_bytes or 0) or None,
                               first.alloc_retries + second.alloc_retries, phases)

    # -- knobs -----------------------------------------------------------------------------------------------------
    def apply_knobs(self, values: dict[str, float]) -> None:
        """Apply the tuner's live knob values (on the engine thread, or before it starts): workers/knobs.py."""
        apply_knobs(self, values)

    # -- reporting -------------------------------------------------------------------------------------------------
    def _publish_state(self, sample_only: bool = False) -> None:
        """Residency, memory and pending work to the observers; a device sample when one is due."""
        due = time.monotonic() - self._last_sample >= self.config.sample_interval_s
        if not self.observer or (sample_only and not due):
            return
        resident = {n: s.tier == VRAM for n, s in self._slots.items()}
        used = self.residency.resident_bytes()
        if self.memory_used is not None:
            try:
                used = self.memory_used()
            except Exception:
                log.exception("metrics: reading device memory failed")
        if not sample_only:
            pending = {"urgent": 0, "background": 0}
            for request in self._pending.values():
                pending["urgent" if request.priority == URGENT else "background"] += 1
            self.observer.state(DeviceState(self.device, resident, int(used), self.policy.budget_bytes, pending))
        if due:
            now = time.monotonic()
            # compute time of the device since the last sample (device time where measured, else run time)
            busy = sum(r.device_ms or r.wall_ms for r in self.stats.roles.values())
            interval_ms = (now - self._last_sample) * 1000.0 if self._last_sample > float("-inf") else None
            busy_ms = busy - self._busy_mark if interval_ms is not None else None
            self._last_sample, self._busy_mark = now, busy
            self.observer.sample({"device": self.device, "used_bytes": int(used),
                                  "budget_bytes": int(self.policy.budget_bytes),
                                  "resident": ",".join(sorted(n for n, here in resident.items() if here)),
                                  "busy_ms": busy_ms, "interval_ms": interval_ms})


__all__ = ["BACKGROUND", "URGENT", "Engine", "EngineConfig", "EngineResult", "EngineStats"]
