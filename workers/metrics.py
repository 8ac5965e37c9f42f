"""Prometheus metrics of a worker: one HTTP endpoint for the worker's processes (the background consumer, the urgent
consumer and the engine process), through prometheus-client's multiprocess mode.

Names follow Triton's and vLLM's conventions with a `ragq_` prefix: `*_duration_seconds` histograms for queue and
compute time (p50/p90/p99 come from `histogram_quantile`), `*_total` counters for requests, items, tokens, loads,
evictions and allocation failures, gauges for device memory, residency and pending work. `setup()` must run before
anything imports prometheus_client in the worker's process; its child processes inherit the directory.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
from pathlib import Path
from typing import Any

from workers.devices import Utilization
from workers.observer import BatchReport, DeviceState, EngineObserver

log = logging.getLogger(__name__)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
QUEUES = ("urgent", "background")


def worker_state_dir(home: Path) -> Path:
    return home / "workers"


def setup(home: Path, worker: str) -> Path:
    """A fresh multiprocess directory for this worker (stale files of a previous run would be summed in)."""
    directory = home / "metrics" / worker.replace("@", "_at_")
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    os.environ[MULTIPROC_ENV] = str(directory)
    return directory


def serve(port: int, host: str, broker_url: str | None, state_file: Path, info: dict[str, Any],
          collectors: tuple[Any, ...] = ()) -> int:
    """Serve every process's metrics (plus the broker's queue depths, read at scrape time) on `port` (0 = any free
    port); record the port in `state_file` for `ragq top` and tests. Returns the port."""
    from prometheus_client import CollectorRegistry, start_http_server
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    MultiProcessCollector(registry)
    if broker_url:
        registry.register(QueueDepthCollector(broker_url))
    for collector in collectors:   # e.g. a Triton server's metrics, folded in
        registry.register(collector)
    try:
        server, _ = start_http_server(port, addr=host, registry=registry)
    except OSError as exc:  # another worker on this host holds the port: serve anyway, on a free one
        log.warning("metrics port %d on %s is taken (%s); serving on a free port instead (see %s)", port, host,
                    exc.strerror or exc, state_file)
        server, _ = start_http_server(0, addr=host, registry=registry)
    bound = int(server.server_port)
    state_file.parent.mkdir(parents=True, exist_ok=True)
    state_file.write_text(json.dumps({**info, "metrics_port": bound, "metrics_host": host, "pid": os.getpid()}))
    log.info("metrics on http://%s:%d/metrics", host, bound)
    return bound


class QueueDepthCollector:
    """`ragq_queue_depth{queue}`: messages waiting in the broker, read when scraped (kombu's Redis transport keeps
    one list per priority step beside the queue's own)."""

    def __init__(self, broker_url: str) -> None:
        self.broker_url = broker_url
        self._redis: Any = None

    def collect(self):  # type: ignore[no-untyped-def]
        from prometheus_client.core import GaugeMetricFamily

        family = GaugeMetricFamily("ragq_queue_depth", "Messages waiting in the broker per queue", labels=["queue"])
        try:
            depths = queue_depths(self._client())
        except Exception as exc:  # the broker away must not break the scrape of everything else
            log.warning("queue depths unavailable: %s", exc)
            depths = {}
        for queue, depth in depths.items():
            family.add_metric([queue], depth)
        yield family

    def _client(self) -> Any:
        if self._redis is None:
            import redis

            self._redis = redis.Redis.from_url(self.broker_url, socket_timeout=2)
        return self._redis


def queue_depths(client: Any) -> dict[str, int]:
    depths = {}
    for queue in QUEUES:
        keys = [queue] + [key for key in client.scan_iter(match=f"{queue}\x06\x16*")]
        depths[queue] = sum(int(client.llen(key)) for key in keys)
    return depths


class _Metrics:
    """The metric objects, created on first use (after `setup`)."""

    def __init__(self) -> None:
        from prometheus_client import Counter, Gauge, Histogram

        stage = ["model", "stage", "priority"]
        self.queue = Histogram("ragq_request_queue_duration_seconds",
                               "Time a stage waited: broker then engine", stage, buckets=LATENCY_BUCKETS)
        self.compute = Histogram("ragq_request_compute_duration_seconds",
                                 "Time a stage computed (the device time of its batches, or its own CPU work)",
                                 stage, buckets=LATENCY_BUCKETS)
        self.load = Histogram("ragq_request_load_duration_seconds",
                              "Time a stage waited for its model to load or wake", stage, buckets=LATENCY_BUCKETS)
        self.latency = Histogram("ragq_request_duration_seconds",
                                 "Time of a stage from publication to result", stage, buckets=LATENCY_BUCKETS)
        self.first_token = Histogram("ragq_time_to_first_token_seconds",
                                     "Time from a generate stage's start to its answer's first streamed piece",
                                     stage, buckets=LATENCY_BUCKETS)
        self.requests = Counter("ragq_requests_total", "Stages finished, by outcome", ["stage", "priority", "outcome"])
        role = ["device", "model", "role"]
        self.items = Counter("ragq_items_total", "Items (texts, pairs, prompts) through a model", role)
        self.tokens = Counter("ragq_tokens_total", "Tokens through a model (before padding)", role)
        self.batch_size = Histogram("ragq_batch_size", "Items per micro-batch", role, buckets=BATCH_BUCKETS)
        self.batch_time = Histogram("ragq_batch_duration_seconds", "Run time of a micro-batch", role,
                                    buckets=LATENCY_BUCKETS)
        model = ["device", "model"]
        self.oom = Counter("ragq_allocation_failures_total", "Device out-of-memory errors (recovered or not)", model)
        self.retries = Counter("ragq_allocation_retries_total",
                               "Allocations that first had to free cached device memory", model)
        self.loads = Counter("ragq_model_loads_total", "Models brought to the device: load (from disk) or wake",
                             ["device", "model", "kind"])
        self.evictions = Counter("ragq_model_evictions_total", "Models taken off the device: sleep or unload",
                                 ["device", "model", "kind"])
        self.load_time = Histogram("ragq_model_load_duration_seconds", "Time to load or wake a model",
                                   ["device", "model", "kind"], buckets=LATENCY_BUCKETS)
        self.resident = Gauge("ragq_model_resident", "1 if the model is in device memory", model,
                              multiprocess_mode="mostrecent")
        self.memory_used = Gauge("ragq_device_memory_used_bytes", "Device memory held by the engine", ["device"],
                                 multiprocess_mode="mostrecent")
        self.memory_budget = Gauge("ragq_device_memory_budget_bytes", "The engine's device memory budget", ["device"],
                                   multiprocess_mode="mostrecent")
        self.memory_total = Gauge("ragq_device_memory_total_bytes", "The device's memory", ["device"],
                                  multiprocess_mode="mostrecent")
        self.memory_ratio = Gauge("ragq_device_memory_usage_ratio", "Used / budget", ["device"],
                                  multiprocess_mode="mostrecent")
        self.gpu_utilization = Gauge("ragq_gpu_utilization_ratio", "The GPU's busy share (NVML), 0..1", ["device"],
                                     multiprocess_mode="mostrecent")
        self.pending = Gauge("ragq_engine_pending_requests", "Requests waiting in the engine", ["device", "priority"],
                             multiprocess_mode="mostrecent")


_metrics: _Metrics | None = None
_metrics_lock = threading.Lock()


def metrics() -> _Metrics | None:
    """The metrics, or None where the process has no metrics directory (a test's engine, a bench script). Made
    once: the first tasks of a consumer's threads arrive together, and a second registration of the same names
    raises (prometheus_client's DuplicateTimeseries failed two questions' embed stages in CI)."""
    global _metrics
    if _metrics is None and os.environ.get(MULTIPROC_ENV):
        with _metrics_lock:
            if _metrics is None:
                _metrics = _Metrics()
    return _metrics


def observe_stage(model: str | None, stage: str, priority: str, outcome: str, queue_ms: float, load_ms: float,
                  compute_ms: float, total_ms: float, first_token_ms: float | None = None) -> None:
    m = metrics()
    if m is None:
        return
    labels = (model or "-", stage, priority)
    m.queue.labels(*labels).observe(queue_ms / 1000.0)
    m.load.labels(*labels).observe(load_ms / 1000.0)
    m.compute.labels(*labels).observe(compute_ms / 1000.0)
    m.latency.labels(*labels).observe(total_ms / 1000.0)
    m.requests.labels(stage, priority, outcome).inc()
    if first_token_ms is not None:
        m.first_token.labels(*labels).observe(first_token_ms / 1000.0)


class EngineMetrics(EngineObserver):
    """The engine's Prometheus metrics; every hook is cheap."""

    def __init__(self, device: str, total_bytes: int = 0) -> None:
        self.device = device
        self.total_bytes = total_bytes
        self.utilization = Utilization(device)

    def batch(self, report: BatchReport) -> None:
        m = metrics()
        if m is None:
            return
        labels = (self.device, report.model, report.role)
        m.items.labels(*labels).inc(report.items)
        m.tokens.labels(*labels).inc(report.tokens)
        m.batch_size.labels(*labels).observe(report.items)
        m.batch_time.labels(*labels).observe(report.seconds)
        if report.alloc_retries:
            m.retries.labels(self.device, report.model).inc(report.alloc_retries)

    def model_event(self, row: dict[str, Any]) -> None:
        m = metrics()
        if m is None:
            return
        model, event, ms = row["model"], row["event"], row["ms"]
        if event == "oom":
            m.oom.labels(self.device, model).inc()
        elif event in ("load", "wake"):
            m.loads.labels(self.device, model, event).inc()
            m.load_time.labels(self.device, model, event).observe(ms / 1000.0)
        elif event in ("sleep", "unload"):
            m.evictions.labels(self.device, model, event).inc()

    def state(self, state: DeviceState) -> None:
        m = metrics()
        if m is None:
            return
        for model, here in state.resident.items():
            m.resident.labels(self.device, model).set(1 if here else 0)
        used, budget = state.used_bytes, state.budget_bytes
        m.memory_used.labels(self.device).set(used)
        m.memory_budget.labels(self.device).set(budget)
        m.memory_total.labels(self.device).set(self.total_bytes or budget)
        m.memory_ratio.labels(self.device).set(used / budget if budget else 0.0)
        busy = self.utilization.read()
        if busy is not None:
            m.gpu_utilization.labels(self.device).set(busy)
        for priority, count in state.pending.items():
            m.pending.labels(self.device, priority).set(count)
