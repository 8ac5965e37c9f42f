"""What a worker process holds: settings, endpoints, the device engine, the timing sink, the models' tokenizers.

Tasks reach it through `app.require_runtime()`; `stage()` is the hook that times a stage and records its row.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from ragq.core import tracing
from ragq.core.db import get_engine
from ragq.core.services import Endpoints
from ragq.core.settings import Settings
from scheduler.batching import PRIORITY_NAMES
from workers.engine_process import EngineClient
from workers.leases import DeliveryCounter
from workers.metrics import observe_stage
from workers.models import ModelSpec
from workers.timing import TimingSink, utc
from workers.tuning import live_values

log = logging.getLogger(__name__)


@dataclass
class StageClock:
    """Filled in by the stage body: the engine's queue/load/compute split, or nothing for CPU-only stages."""

    model: str | None = None
    items: int = 0
    tokens: int = 0
    batch_size: int = 0
    engine_queue_ms: float = 0.0
    load_ms: float = 0.0
    compute_ms: float | None = None
    first_token_ms: float | None = None   # generate: from the stage's start to the first piece of the answer
    outcome: str = "ok"
    extra: dict[str, Any] = field(default_factory=dict)

    def from_engine(self, result: Any) -> None:
        self.model = result.model
        self.items = len(result.outputs)
        self.tokens = result.tokens
        self.batch_size = result.batch_size
        self.engine_queue_ms = result.queue_ms
        self.load_ms = result.load_ms
        self.compute_ms = result.compute_ms
        if getattr(result, "first_token_ms", None) is not None:
            self.first_token_ms = result.first_token_ms


@dataclass
class WorkerRuntime:
    settings: Settings
    endpoints: Endpoints
    engine: EngineClient
    sink: TimingSink
    worker_name: str
    device: str
    specs: dict[str, ModelSpec]
    indexed_dims: set[int] = field(default_factory=set)

    @cached_property
    def deliveries(self):  # type: ignore[no-untyped-def]

        return DeliveryCounter(self.endpoints.broker_url, self.settings.max_deliveries)

    @cached_property
    def db(self):  # type: ignore[no-untyped-def]

        return get_engine(self.endpoints.database_url)

    _knobs: tuple[float, dict[str, float]] = field(default=(float("-inf"), {}), init=False, repr=False)

    def knob(self, name: str, default: float) -> float:
        """A live knob the tuner moved (read from Postgres at most every 10 s), else `default`."""
        read_at, values = self._knobs
        if time.monotonic() - read_at > 10.0:
            try:
                values = live_values(self.db)
            except Exception as exc:  # the database away: keep what we had
                log.warning("could not read the tuning knobs: %s", exc)
            self._knobs = (time.monotonic(), values)
        return values.get(name, default)

    _chunk_lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False, compare=False)

    @property
    def chunk_pool(self):  # type: ignore[no-untyped-def]
        """The chunking pool, made once (the worker starts making it in the background at start-up; a task that
        comes first waits for it)."""
        with self._chunk_lock:
            pool = self.__dict__.get("_chunk_pool")
            if pool is None:
                pool = self.__dict__["_chunk_pool"] = self._make_chunk_pool()
            return pool

    def _make_chunk_pool(self):  # type: ignore[no-untyped-def]
        from workers.chunk_pool import ChunkPool

        processes = self.settings.chunk_processes
        if processes is None:
            import os

            processes = 0 if self.device == "cpu" else max(1, min(8, (os.cpu_count() or 2) // 4))
        spec = self.specs["embed"]
        return ChunkPool(spec.path, spec.chunk_tokens, spec.name, processes)

    @contextmanager
    def stage(
        self, stage: str, *, priority: int, job_id: str | None, task_id: str | None, sent_at: float | None,
    ) -> Iterator[StageClock]:
        """Time one stage and record its stage_timings row, whatever the outcome.

        queue_ms = time in the broker (publish to task start) + time waiting in the engine; compute_ms is the
        engine's run time when the stage used the engine, else the stage's own wall time less loading."""
        started = time.time()
        clock = StageClock()
        error: str | None = None
        with tracing.span(stage, priority=PRIORITY_NAMES[priority], job_id=job_id, task_id=task_id,
                          worker=self.worker_name, device=self.device) as span:
            try:
                yield clock
            except Exception as exc:
                clock.outcome = "expired" if type(exc).__name__ == "RequestExpired" else "error"
                error = f"{type(exc).__name__}: {exc}"[:2000]
                raise
            finally:
                finished = time.time()
                if span is not None:
                    for key, value in (("model", clock.model or "-"), ("items", clock.items),
                                       ("batch_size", clock.batch_size), ("engine_queue_ms", clock.engine_queue_ms),
                                       ("load_ms", clock.load_ms), ("compute_ms", clock.compute_ms or 0.0),
                                       ("outcome", clock.outcome)):
                        span.set_attribute(f"ragq.{key}", value)
                broker_ms = max(0.0, (started - sent_at) * 1000.0) if sent_at else 0.0
                compute_ms = clock.compute_ms
                if compute_ms is None:
                    compute_ms = max(0.0, (finished - started) * 1000.0 - clock.load_ms)
                observe_stage(clock.model, stage, PRIORITY_NAMES[priority], clock.outcome, broker_ms + clock.engine_queue_ms,
                              clock.load_ms, compute_ms, broker_ms + (finished - started) * 1000.0,
                              clock.first_token_ms)
                self.sink.record_stage(
                    job_id=job_id, task_id=task_id, stage=stage, model=clock.model, worker=self.worker_name,
                    device=self.device, priority=PRIORITY_NAMES[priority], batch_size=clock.batch_size,
                    items=clock.items, tokens=clock.tokens, enqueued_at=utc(sent_at), started_at=utc(started),
                    finished_at=utc(finished), queue_ms=broker_ms + clock.engine_queue_ms,
                    engine_queue_ms=clock.engine_queue_ms, load_ms=clock.load_ms,
                    compute_ms=compute_ms, first_token_ms=clock.first_token_ms, outcome=clock.outcome, error=error,
                )
                clock.extra["queue_ms"] = broker_ms + clock.engine_queue_ms
                clock.extra["compute_ms"] = compute_ms
