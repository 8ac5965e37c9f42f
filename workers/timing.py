"""Timing sinks: stage_timings, model_events and device_samples rows, written off the hot path.

`record_stage` logs one compact line and queues the row; a background thread writes queued rows to Postgres in
batches. A database outage delays rows (kept in a bounded buffer and retried) and never fails a job.
Swap the sink by class: PostgresSink in workers, MemorySink in unit tests.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from datetime import datetime, timezone
from typing import Any

from ragq.core.db import DeviceSample, ModelEvent, StageTiming, get_engine
from workers.observer import EngineObserver

log = logging.getLogger("ragq.timing")

STAGE_FIELDS = (
    "job_id", "task_id", "stage", "model", "worker", "device", "priority", "batch_size", "items", "tokens",
    "enqueued_at", "started_at", "finished_at", "queue_ms", "engine_queue_ms", "load_ms", "compute_ms",
    "first_token_ms", "vram_peak_bytes", "outcome", "error",
)


def utc(ts: float | None) -> datetime | None:
    return datetime.fromtimestamp(ts, tz=timezone.utc) if ts is not None else None


def compact_line(row: dict[str, Any]) -> str:
    """`0.31s ← embed x64 cpu q=3ms load=0ms run=298ms` — total latency, stage, items, device, then the parts."""
    total_s = (row["queue_ms"] + row["load_ms"] + row["compute_ms"]) / 1000.0
    parts = [
        f"{total_s:6.2f}s ← {row['stage']} x{row.get('items', 0)}", str(row.get("device") or "-"),
        f"{row.get('priority', '-')}", f"q={row['queue_ms']:.0f}ms", f"load={row['load_ms']:.0f}ms",
        f"run={row['compute_ms']:.0f}ms",
    ]
    if row.get("batch_size"):
        parts.append(f"batch={row['batch_size']}")
    if row.get("model"):
        parts.append(str(row["model"]))
    if row.get("outcome") != "ok":
        parts.append(f"{row.get('outcome')}: {row.get('error') or ''}".rstrip(": "))
    return " ".join(parts)


class TimingSink:
    """Base sink: normalises and logs; subclasses store."""

    def record_stage(self, **row: Any) -> None:
        full = {name: row.get(name) for name in STAGE_FIELDS}
        for name in ("queue_ms", "load_ms", "compute_ms"):
            full[name] = round(float(full[name] or 0.0), 3)
        for name in ("batch_size", "items", "tokens"):
            full[name] = int(full[name] or 0)
        full["outcome"] = full["outcome"] or "ok"
        full["priority"] = full["priority"] or "background"
        log.info(compact_line(full))
        self._store("stage_timings", full)

    def record_model_event(self, event: dict[str, Any]) -> None:
        self._store("model_events", dict(event))

    def record_device_sample(self, sample: dict[str, Any]) -> None:
        self._store("device_samples", dict(sample))

    def _store(self, table: str, row: dict[str, Any]) -> None:
        raise NotImplementedError

    def flush(self, timeout_s: float = 10.0) -> bool:
        return True

    def close(self) -> None:
        self.flush()


class MemorySink(TimingSink):
    def __init__(self) -> None:
        self.rows: dict[str, list[dict[str, Any]]] = {"stage_timings": [], "model_events": [], "device_samples": []}

    def _store(self, table: str, row: dict[str, Any]) -> None:
        self.rows[table].append(row)


class PostgresSink(TimingSink):
    def __init__(
        self, database_url: str, *, worker: str | None = None, flush_interval_s: float = 0.5,
        max_buffer: int = 100_000,
    ) -> None:
        self.database_url = database_url
        self.worker = worker
        self.flush_interval_s = flush_interval_s
        self._buffer: deque[tuple[str, dict[str, Any]]] = deque(maxlen=max_buffer)
        self._lock = threading.Condition()
        self._stopping = False
        self._failures = 0
        self._write_lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="ragq-timing-sink", daemon=True)
        self._thread.start()

    def _store(self, table: str, row: dict[str, Any]) -> None:
        row.setdefault("worker", self.worker)
        with self._lock:
            if len(self._buffer) == self._buffer.maxlen:
                log.warning("timing buffer full (%d rows): dropping the oldest", self._buffer.maxlen)
            self._buffer.append((table, row))
            if len(self._buffer) >= 200:
                self._lock.notify_all()

    def _run(self) -> None:
        while True:
            with self._lock:
                if not self._stopping:
                    self._lock.wait(self.flush_interval_s if self._failures == 0 else min(30.0, 2 ** self._failures))
                stopping = self._stopping
            self._write_pending()
            if stopping:
                return

    def _write_pending(self) -> bool:
        with self._write_lock:
            return self._write_locked()

    def _write_locked(self) -> bool:
        with self._lock:
            rows = list(self._buffer)
            self._buffer.clear()
        if not rows:
            return True
        from sqlalchemy import insert


        by_table: dict[str, list[dict[str, Any]]] = {"stage_timings": [], "model_events": [], "device_samples": []}
        for table, row in rows:
            by_table[table].append(row)
        try:
            with get_engine(self.database_url).begin() as conn:
                if by_table["stage_timings"]:
                    conn.execute(insert(StageTiming), by_table["stage_timings"])
                if by_table["model_events"]:
                    conn.execute(insert(ModelEvent), by_table["model_events"])
                if by_table["device_samples"]:
                    conn.execute(insert(DeviceSample), by_table["device_samples"])
        except Exception as exc:  # the database is down or refused: keep the rows, retry with backoff
            self._failures += 1
            log.warning("could not write %d timing rows (attempt %d): %s", len(rows), self._failures, exc)
            with self._lock:
                room = (self._buffer.maxlen or len(rows)) - len(self._buffer)
                self._buffer.extendleft(reversed(rows[-room:] if room > 0 else []))
            return False
        self._failures = 0
        return True

    def flush(self, timeout_s: float = 10.0) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._write_pending():
                with self._lock:
                    if not self._buffer:
                        return True
            time.sleep(0.2)
        return False

    def close(self) -> None:
        with self._lock:
            self._stopping = True
            self._lock.notify_all()
        self._thread.join(15)


class SinkObserver(EngineObserver):
    """The engine's model events and device samples, as rows of a timing sink (model_events, device_samples)."""

    def __init__(self, sink: TimingSink, total_bytes: int | None = None) -> None:
        self.sink = sink
        self.total_bytes = total_bytes

    def model_event(self, row: dict[str, Any]) -> None:
        self.sink.record_model_event(row)

    def sample(self, row: dict[str, Any]) -> None:
        self.sink.record_device_sample({**row, "total_bytes": self.total_bytes or None})
