"""The per-device engine: one scheduler thread owns all device state; task threads submit requests and wait.

It groups pending requests of the same role into micro-batches (one load serves many jobs), lets urgent work jump
ahead at micro-batch boundaries, drops requests whose deadline passed before they cost device time, and keeps
models resident within the budget. Decisions come from scheduler/ (pure); loading and running are injected, so the
same engine runs in tests with fakes or tiny models and on a GPU unchanged.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from ragq.errors import BackendUnavailable, BudgetExceeded, RagqError, RequestExpired
from scheduler.batching import BACKGROUND, URGENT, Pending, expired, next_batch
from scheduler.residency import Resident, plan_admission
from workers.backends import LoadedModel
from workers.models import ModelSpec

log = logging.getLogger(__name__)

Loader = Callable[[ModelSpec, str], LoadedModel]
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
    params: dict[str, Any]
    priority: int
    deadline: float | None
    enqueued: float
    future: Future[EngineResult]
    outputs: list[Any] = field(default_factory=list)
    started: float | None = None
    load_ms: float = 0.0
    compute_ms: float = 0.0
    batch_size: int = 0
    tokens: int = 0

    @property
    def remaining(self) -> int:
        return len(self.items) - len(self.outputs)

    @property
    def group(self) -> tuple[tuple[str, str], ...]:
        return tuple(sorted((k, repr(v)) for k, v in self.params.items()))


@dataclass
class _Loaded:
    model: LoadedModel
    last_used: float


class Engine:
    def __init__(
        self,
        device: str,
        specs: dict[str, ModelSpec],
        loader: Loader,
        budget_bytes: int,
        *,
        on_model_event: EventSink | None = None,
        clock: Callable[[], float] = time.monotonic,
        max_pending: int = 100_000,
    ) -> None:
        self.device = device
        self.specs = specs
        self.loader = loader
        self.budget_bytes = budget_bytes
        self.on_model_event = on_model_event
        self.clock = clock
        self.max_pending = max_pending
        self._pending: dict[int, _Request] = {}
        self._resident: dict[str, _Loaded] = {}
        self._measured_bytes: dict[str, int] = {}
        self._ids = itertools.count(1)
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None

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
        for name in list(self._resident):
            self._unload(name, "shutdown")

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
    ) -> Future[EngineResult]:
        """Queue `items` for `role`; the future resolves with outputs in the same order. `deadline` is on the
        engine's clock; a request still pending at its deadline fails with RequestExpired and never runs."""
        if role not in self.specs:
            raise BackendUnavailable(f"no model is configured for role {role!r} on {self.device}")
        future: Future[EngineResult] = Future()
        if not items:
            future.set_result(EngineResult([], self.specs[role].name, 0.0, 0.0, 0.0, 0, 0))
            return future
        with self._cond:
            if self._stopping:
                raise BackendUnavailable(f"engine on {self.device} is stopping")
            if len(self._pending) >= self.max_pending:
                raise BackendUnavailable(f"engine on {self.device} is busy: {len(self._pending)} requests pending")
            key = next(self._ids)
            self._pending[key] = _Request(
                key, role, list(items), dict(params or {}), priority, deadline, self.clock(), future,
            )
            self._cond.notify_all()
        return future

    def run(self, role: str, items: list[Any], **kwargs: Any) -> EngineResult:
        return self.submit(role, items, **kwargs).result()

    def resident_models(self) -> dict[str, int]:
        with self._cond:
            return {name: entry.model.nbytes for name, entry in self._resident.items()}

    def pending_count(self) -> int:
        with self._cond:
            return len(self._pending)

    # -- the scheduler loop (one thread) ---------------------------------------------------------------------------
    def _snapshot(self) -> list[Pending]:
        return [
            Pending(r.key, r.role, r.group, r.priority, r.enqueued, r.remaining, r.deadline)
            for r in self._pending.values()
        ]

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._stopping:
                    self._cond.wait(0.5)
                if self._stopping and not self._pending:
                    return
                now = self.clock()
                for key in expired(self._snapshot(), now):
                    request = self._pending.pop(key)
                    request.future.set_exception(RequestExpired(
                        f"{request.role} request expired {now - (request.deadline or now):.3f}s ago before it ran"
                    ))
                snapshot = self._snapshot()
                if not snapshot:
                    continue
                head_role = min(snapshot, key=lambda p: (p.priority, p.enqueued, p.key)).role
                plan = next_batch(snapshot, self.specs[head_role].batch_size)
                batch = [(self._pending[key], take) for key, take in plan]
            self._run_batch(head_role, batch)

    def _run_batch(self, role: str, batch: list[tuple[_Request, int]]) -> None:
        spec = self.specs[role]
        start = self.clock()
        for request, _ in batch:
            if request.started is None:
                request.started = start
        try:
            model, load_ms = self._ensure_resident(spec)
            items: list[Any] = []
            for request, take in batch:
                offset = len(request.outputs)
                items.extend(request.items[offset:offset + take])
            params = batch[0][0].params
            t0 = self.clock()
            outputs = model.run(items, params)
            compute_ms = (self.clock() - t0) * 1000.0
            tokens = model.count_tokens(items) if role != "generate" else [0] * len(items)
            if len(outputs) != len(items):
                raise RagqError(f"model {spec.name} returned {len(outputs)} outputs for {len(items)} inputs")
        except Exception as exc:  # a failed batch fails its requests, never the loop
            log.exception("%s batch of %d on %s failed", role, sum(t for _, t in batch), self.device)
            with self._cond:
                for request, _ in batch:
                    if self._pending.pop(request.key, None) is not None:
                        request.future.set_exception(exc)
            return
        self._resident[spec.name].last_used = self.clock()
        position = 0
        finished: list[_Request] = []
        with self._cond:
            for request, take in batch:
                request.outputs.extend(outputs[position:position + take])
                request.tokens += sum(tokens[position:position + take])
                position += take
                request.load_ms += load_ms
                request.compute_ms += compute_ms
                request.batch_size = max(request.batch_size, len(items))
                if request.remaining == 0:
                    self._pending.pop(request.key, None)
                    finished.append(request)
        for request in finished:
            queue_ms = ((request.started or request.enqueued) - request.enqueued) * 1000.0
            request.future.set_result(EngineResult(
                request.outputs, spec.name, queue_ms, request.load_ms, request.compute_ms, request.batch_size,
                request.tokens,
            ))

    # -- residency ------------------------------------------------------------------------------------------------
    def _ensure_resident(self, spec: ModelSpec) -> tuple[LoadedModel, float]:
        entry = self._resident.get(spec.name)
        if entry is not None:
            return entry.model, 0.0
        needed = self._measured_bytes.get(spec.name, spec.estimate_bytes or 0)
        with self._cond:
            busy = {self.specs[r.role].name for r in self._pending.values()}
        snapshot = {n: Resident(n, e.model.nbytes, e.last_used) for n, e in self._resident.items()}
        for name in plan_admission(snapshot, spec.name, needed, self.budget_bytes, busy):
            self._unload(name, f"evicted (LRU) to fit {spec.name}")
        t0 = self.clock()
        model = self.loader(spec, self.device)
        load_ms = (self.clock() - t0) * 1000.0
        self._measured_bytes[spec.name] = model.nbytes
        if model.nbytes > self.budget_bytes:
            model.unload()
            raise BudgetExceeded(
                f"model {spec.name} measured {model.nbytes} bytes, more than the budget of {self.budget_bytes}"
            )
        self._resident[spec.name] = _Loaded(model, self.clock())
        self._event(spec.name, "load", model.nbytes, load_ms, "needed by pending work")
        # the estimate may have been low: evict others until what is resident fits
        snapshot = {n: Resident(n, e.model.nbytes, e.last_used) for n, e in self._resident.items()}
        for name in plan_admission(snapshot, spec.name, model.nbytes, self.budget_bytes, busy):
            self._unload(name, f"evicted (LRU): {spec.name} measured larger than its estimate")
        return model, load_ms

    def _unload(self, name: str, reason: str) -> None:
        entry = self._resident.pop(name, None)
        if entry is None:
            return
        t0 = self.clock()
        entry.model.unload()
        self._event(name, "unload", entry.model.nbytes, (self.clock() - t0) * 1000.0, reason)

    def _event(self, model: str, event: str, nbytes: int, ms: float, reason: str) -> None:
        log.info("model %s %s on %s: %.1f MiB in %.0f ms (%s)", model, event, self.device, nbytes / 2**20, ms, reason)
        if self.on_model_event is not None:
            try:
                self.on_model_event({
                    "device": self.device, "model": model, "event": event, "bytes": nbytes, "ms": ms,
                    "reason": reason,
                })
            except Exception:  # recording must never break serving
                log.exception("model event sink failed")


__all__ = ["BACKGROUND", "URGENT", "Engine", "EngineResult"]
