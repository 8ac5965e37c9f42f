"""`ragq worker`: one Celery worker process per device (threads pool) and its engine process, which owns the device.

`--device all` starts one child process per visible GPU, each pinned with CUDA_VISIBLE_DEVICES.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable

from ragq.core.db import ensure_schema
from ragq.core.services import ensure_services
from ragq.core.settings import Settings
from scheduler.budget import device_budget, format_size, parse_size
from workers.devices import device_kind, device_memory, gpu_count

log = logging.getLogger(__name__)


def worker_name(device: str, name: str | None = None) -> str:
    return f"{name or device.replace(':', '')}@{socket.gethostname()}"


def budget_for(settings: Settings, device: str) -> int:
    if device == "cpu":
        return parse_size(settings.cpu_budget)
    explicit = parse_size(settings.vram_budget) if settings.vram_budget else None
    memory = device_memory(device)
    budget = device_budget(memory.total_bytes, settings.vram_buffer, explicit)
    if memory.total_bytes and budget < memory.total_bytes:
        import torch

        index = int(device.split(":")[1])
        # make an overrun of the budget a real OOM on a card larger than the budget
        torch.cuda.set_per_process_memory_fraction(budget / memory.total_bytes, index)
    return budget


def host_budget_for(settings: Settings, device: str) -> int:
    if settings.host_budget:
        return parse_size(settings.host_budget)
    if device == "cpu":
        return parse_size(settings.cpu_budget)  # on the CPU, sleeping keeps the model where it is
    import psutil

    return int(psutil.virtual_memory().total * 0.25)


def cpu_thread_count(settings: Settings) -> tuple[int, int]:
    """(torch intra-op threads for a CPU engine, cores this process may use): RAGQ_TORCH_THREADS, else half the
    cores (the consumers, chunking and Postgres share them: with 2 busy cores, one query embed took 78 ms on 2
    threads against 22 ms on 1)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return settings.torch_threads or max(1, cores // 2), cores


def cpu_threads(settings: Settings) -> int:
    """Set torch's intra-op threads for a CPU engine (`cpu_thread_count`); returns how many."""
    import torch

    threads, _ = cpu_thread_count(settings)
    torch.set_num_threads(threads)
    return threads


def build_engine(settings: Settings, device: str, database_url: str, worker: str,  # type: ignore[no-untyped-def]
                 broker_url: str | None = None):
    """In the engine process: the budget (enforced on the card), the profiles, the model-event sink, the engine."""
    from workers.backends import load_model
    from workers import tuning
    from ragq.core.db import get_engine
    from workers.engine import Engine, EngineConfig
    from workers.metrics import EngineMetrics
    from workers.models import load_model_specs
    from workers.profiles import PostgresProfileStore
    from workers.observer import Observers
    from workers.timing import PostgresSink, SinkObserver

    _allocator_settings(device)
    _compile_cache(settings)
    loader = load_model
    if device == "cpu":   # said now; set by the first load (in the engine's thread, after the engine answers its
        threads, cores = cpu_thread_count(settings)   # worker: importing torch here holds start-up for 2 s)
        log.info("engine on the CPU: %d torch thread(s) of %d core(s)%s", threads, cores,
                 "" if settings.torch_threads else " (RAGQ_TORCH_THREADS to change)")
        first = [True]

        def loader(*a: object, **k: object) -> object:  # type: ignore[misc]
            if first[0]:
                first[0] = False
                cpu_threads(settings)
            return load_model(*a, **k)
    specs = load_model_specs(settings.models)
    budget = budget_for(settings, device)
    host_budget = host_budget_for(settings, device)
    sink = PostgresSink(database_url, worker=worker)
    memory_used = None
    if device.startswith("cuda"):
        import torch

        index = int(device.split(":")[1])
        memory_used = lambda: torch.cuda.memory_reserved(index)  # noqa: E731 - what the allocator holds, cache too
    total = device_memory(device).total_bytes if device != "cpu" else budget
    log.info("engine for %s: budget %s, host tier %s, models %s", worker, format_size(budget),
             format_size(host_budget), ", ".join(f"{role}={spec.name}" for role, spec in specs.items()))
    engine = Engine(
        device, specs, loader, budget, host_budget_bytes=host_budget, cooldown_s=settings.cooldown_s,
        observer=Observers(EngineMetrics(device, total), SinkObserver(sink, total)),
        profiles=PostgresProfileStore(database_url), device_kind=device_kind(device), memory_used=memory_used,
        knob_source=lambda: tuning.live_values(get_engine(database_url)),
        config=EngineConfig(report_interval_s=settings.stats_interval_s, urgent_yield_s=settings.urgent_yield_s,
                            urgent_yield_ms=settings.urgent_yield_ms, idle_restore_s=settings.idle_restore_s),
    )
    preload = settings.preload if settings.preload != "auto" else ("" if device == "cpu" else "embed")
    for role in (r.strip() for r in preload.split(",")):
        if role:   # loaded now, while the consumers start, rather than by the first question
            engine.prewarm(role)
    if broker_url:
        from ragq.core.streams import StreamWriter

        engine.streamer = StreamWriter(broker_url)   # answers' pieces, as they are generated
    return engine


ENGINE_ADDRESS_ENV = "RAGQ_ENGINE_ADDRESS"   # how the urgent consumer finds its worker's engine (set by the worker)
ENGINE_KEY_ENV = "RAGQ_ENGINE_KEY"


class StartupClock:
    """`ragq worker`'s start-up phases, one log line each with its duration, and the total once it consumes."""

    def __init__(self, worker: str) -> None:
        import time

        import psutil

        self.worker = worker
        self._now = time.monotonic
        # from the process's start, so the interpreter's and the CLI's imports count
        self.started = self._now() - max(0.0, time.time() - psutil.Process().create_time())
        self._mark = self.started
        self.phases: dict[str, float] = {}

    def phase(self, name: str) -> None:
        now = self._now()
        self.phases[name] = now - self._mark
        self._mark = now
        log.info("worker %s: start-up: %s %.2fs", self.worker, name, self.phases[name])

    def total(self) -> float:
        return self._now() - self.started


def record_start(runtime, clock: StartupClock, consuming_s: float, restored: int) -> None:  # type: ignore[no-untyped-def]
    """One worker_starts row (`ragq report` shows restarts from them); a database away costs the row, not the start."""
    from datetime import datetime, timedelta, timezone

    from sqlalchemy import text

    started = datetime.now(timezone.utc) - timedelta(seconds=consuming_s)
    try:
        with runtime.db.begin() as conn:
            conn.execute(text(
                "INSERT INTO worker_starts (worker, device, pid, started_at, consuming_s, phases, restored) "
                "VALUES (:w, :d, :p, :t, :s, CAST(:ph AS jsonb), :r)"),
                {"w": runtime.worker_name, "d": runtime.device, "p": os.getpid(), "t": started, "s": consuming_s,
                 "ph": json.dumps({k: round(v, 3) for k, v in clock.phases.items()}), "r": restored})
    except Exception as exc:  # noqa: BLE001
        log.warning("worker %s: its start was not recorded: %s", runtime.worker_name, exc)


def build_runtime(settings: Settings, device: str, name: str | None = None, log_level: str = "INFO",
                  attach: bool = False, address: str | None = None, authkey: bytes | None = None,
                  clock: StartupClock | None = None):  # type: ignore[no-untyped-def]
    """The worker's runtime; its engine client either starts the engine process (the worker, at `address` with
    `authkey` when given) or attaches to the one its worker started (the urgent consumer, from RAGQ_ENGINE_ADDRESS
    and RAGQ_ENGINE_KEY). The tokenizers load in the background meanwhile (a task waits for them)."""
    from workers.backends.tokens import count_tokens, prepare_items, preload
    from workers.engine_process import EngineClient
    from workers.models import check_format, check_model_dirs, load_model_specs
    from workers.runtime import WorkerRuntime
    from workers.timing import PostgresSink

    clock = clock or StartupClock(worker_name(device, name))
    specs = load_model_specs(settings.models)
    check_model_dirs(specs)
    for role, spec in specs.items():   # fp8 on a card that cannot run it: one error at start, naming both
        check_format(spec.name, role, spec.quantize, device)
    preload(specs)
    endpoints = ensure_services(settings)
    clock.phase("services")
    migrating = None
    if not attach:   # the owner migrates (its urgent consumer needs the tables only once it has tasks), beside the
        from concurrent.futures import ThreadPoolExecutor   # engine process's start (its torch import is longer)

        pool = ThreadPoolExecutor(1, thread_name_prefix="ragq-schema")
        migrating = pool.submit(ensure_schema, endpoints.database_url)
        pool.shutdown(wait=False)
    name = worker_name(device, name)
    sink = PostgresSink(endpoints.database_url, worker=name)
    if attach:
        engine = EngineClient.attach(device, specs, "\0" + os.environ[ENGINE_ADDRESS_ENV],
                                     bytes.fromhex(os.environ[ENGINE_KEY_ENV]), token_counter=count_tokens, preparer=prepare_items,
                                     start_timeout_s=120)
        clock.phase("engine attached")
    else:
        engine = EngineClient(device, specs, build_engine,
                              (settings, device, endpoints.database_url, name, endpoints.broker_url),
                              address=address, authkey=authkey,
                              token_counter=count_tokens, preparer=prepare_items, log_level=log_level)
        clock.phase("engine process")
    if migrating is not None:
        try:
            migrating.result()
        except BaseException:
            engine.stop()
            raise
        clock.phase("schema")   # the time it waited beyond the engine
    runtime = WorkerRuntime(settings, endpoints, engine, sink, name, device, specs)
    log.info("worker %s: engine process %s, models %s", name, engine.pid or "attached",
             ", ".join(f"{role}={spec.name}" for role, spec in specs.items()))
    return runtime


def _start_urgent_consumer(owner: str, device: str, address: str, authkey: bytes, concurrency: int, loglevel: str
                           ) -> subprocess.Popen[bytes]:
    """The urgent queue's own Celery worker process, sharing the engine of the worker named `owner` (which
    listens, or will, at `address`)."""
    env = dict(os.environ, **{ENGINE_ADDRESS_ENV: address.lstrip("\0"), ENGINE_KEY_ENV: authkey.hex()})
    base = owner.split("@")[0]
    args = [sys.executable, "-m", "ragq.cli", "worker", "--device", device, "--name", f"{base}-urgent",
            "--concurrency", str(concurrency), "--loglevel", loglevel, "--queues", "urgent", "--attach"]
    child = subprocess.Popen(args, env=env)  # noqa: S603
    log.info("worker %s: urgent consumer started (pid %d, %d threads)", owner, child.pid, concurrency)
    return child


class UrgentConsumer:
    """The urgent consumer process, restarted if it dies while the worker runs (a question must always find a
    consumer); stopped with a warm shutdown when the worker stops. Started first thing, beside the worker's own
    start-up: it attaches to the engine once the worker has started it."""

    def __init__(self, owner: str, device: str, address: str, authkey: bytes, concurrency: int, loglevel: str
                 ) -> None:
        self.args = (owner, device, address, authkey, concurrency, loglevel)
        self.restarts = 0
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self.process = _start_urgent_consumer(*self.args)
        threading.Thread(target=self._watch, name="ragq-urgent-watch", daemon=True).start()

    def _watch(self) -> None:
        while not self._stopping.wait(1.0):
            code = self.process.poll()
            if code is None:
                continue
            self.restarts += 1
            log.error("urgent consumer exited with code %s; starting a new one (restart %d)", code, self.restarts)
            if self._stopping.wait(min(30.0, 2.0 ** self.restarts) if self.restarts > 3 else 0.5):  # no crash loop
                return
            with self._lock:
                if not self._stopping.is_set():
                    self.process = _start_urgent_consumer(*self.args)

    def stop(self, timeout_s: float = 60.0) -> None:
        self._stopping.set()
        with self._lock:
            process = self.process
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)  # warm shutdown: its running questions finish first
            try:
                process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)


def _exit_with_parent() -> None:
    """An urgent consumer ends with its worker, however the worker ends (Linux: the parent-death signal). A worker
    stopping cleanly stops it first (a warm shutdown); a worker that died took the engine with it, so its consumer
    is killed at once: what it held goes back through its lease when the replacement starts, and the replacement
    waits for it to be gone."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _allocator_settings(device: str) -> None:
    """Expandable segments let the caching allocator give back and reuse the memory of models that sleep and wake
    without fragmenting; under an enforced budget, fragmentation would make allocations free and re-allocate
    (synchronising the device) over and over. Set before CUDA starts; a user's own setting wins."""
    if device != "cpu":
        os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")


def _compile_cache(settings: Settings) -> None:
    """torch.compile's caches (the generator's decoder is compiled at load: ~55 s on an H200 the first time) under
    RAGQ_HOME instead of /tmp, so a reboot does not cost the compile again; a user's own setting wins."""
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(settings.home / "cache" / "torchinductor"))


def run_worker(
    settings: Settings, device: str, concurrency: int | None = None, loglevel: str = "INFO", name: str | None = None,
    queues: str | None = None, attach: bool = False,
) -> int:
    """One device's worker: the engine process, a Celery worker for the background queue (this process) and one for
    the urgent queue (a child process), both feeding the one engine. With RAGQ_URGENT_CONCURRENCY=0, or the
    celery-defaults profile, one Celery worker consumes both queues."""
    if device == "all":
        return _run_all(settings, concurrency, loglevel)
    clock = StartupClock(worker_name(device, name))
    if not attach and os.environ.get(HOST_CHECKED_ENV) != "1":
        from ragq.core.hostplan import check_host_ram

        check_host_ram(settings, 1, host_budget_for(settings, device))   # before starting anything
    from workers.celery_app import BACKGROUND_QUEUE, URGENT_QUEUE, app, configure_app, direct_queue
    if attach:
        _exit_with_parent()
    else:
        from workers import metrics

        metrics.setup(settings.home, worker_name(device, name))  # before anything imports prometheus_client
    _allocator_settings(device)
    if settings.switch_interval_ms:
        sys.setswitchinterval(settings.switch_interval_ms / 1000.0)
    split = not attach and queues is None and settings.urgent_concurrency > 0 and settings.celery_profile == "ragq"
    if queues is None:
        queues = BACKGROUND_QUEUE if split else f"{URGENT_QUEUE},{BACKGROUND_QUEUE}"
    clock.phase("imports")
    urgent = None
    leases = None
    watchdog = None
    heartbeat = None
    address = authkey = None
    if split:   # its start-up runs beside this one's; it attaches to the engine once that is up
        import uuid

        address, authkey = f"\0ragq-engine-{uuid.uuid4().hex}", os.urandom(32)
        urgent = UrgentConsumer(worker_name(device, name), device, address, authkey, settings.urgent_concurrency,
                                loglevel)
    try:
        from ragq.core import tracing

        tracing.setup(settings, f"ragq-worker-{worker_name(device, name)}")
        runtime = build_runtime(settings, device, name, loglevel.upper(), attach=attach, address=address,
                                authkey=authkey, clock=clock)
    except BaseException:
        if urgent is not None:
            urgent.stop(timeout_s=5.0)
        raise
    if URGENT_QUEUE in queues.split(","):   # questions in flight here first: their later stages come to this queue
        queues = f"{direct_queue(runtime.worker_name)},{queues}"
    configure_app(settings, runtime.endpoints, consumer=True)
    app.runtime = runtime
    from celery import signals

    restored = [0]

    def consuming(**_: object) -> None:
        total = clock.total()
        log.info("worker %s: consuming %s, %.2fs after start", runtime.worker_name, queues, total)
        record_start(runtime, clock, total, restored[0])

    signals.worker_ready.connect(consuming, weak=False)
    exit_code = 0
    try:
        if BACKGROUND_QUEUE in queues.split(","):   # chunking's imports and processes, beside the start-up
            threading.Thread(target=lambda: runtime.chunk_pool, name="ragq-chunking", daemon=True).start()
        clock.phase("chunking")
        if not attach and settings.metrics_port >= 0:
            from workers import metrics

            from workers.backends.triton_backend import metrics_collectors

            metrics.serve(settings.metrics_port, settings.metrics_host, runtime.endpoints.broker_url,
                          metrics.worker_state_dir(settings.home) / f"{runtime.worker_name}.json",
                          {"worker": runtime.worker_name, "device": device, "engine_pid": runtime.engine.pid},
                          collectors=metrics_collectors(runtime.specs))
        clock.phase("metrics")
        if settings.celery_profile == "ragq":  # late acks: keep this consumer's tasks leased (workers/leases.py)
            from workers.leases import TaskLeases

            leases = TaskLeases(app, runtime.endpoints.broker_url, runtime.worker_name, settings.lease_interval_s,
                                settings.orphan_after)
            restored[0] = leases.restore_previous()  # before consuming: what a killed predecessor held runs again now
            leases.start()
        if settings.consumer_stall_s > 0:  # a consumer that stops fetching after a broker reconnect is restarted
            from workers.leases import ConsumerWatchdog

            watchdog = ConsumerWatchdog(runtime.endpoints.broker_url, runtime.worker_name, queues.split(","),
                                        concurrency or settings.worker_concurrency,
                                        stall_after_s=settings.consumer_stall_s).start()
        if direct_queue(runtime.worker_name) in queues:   # clients see this consumer die mid-question
            from workers.leases import Heartbeat

            heartbeat = Heartbeat(runtime.endpoints.broker_url, runtime.worker_name).start()
        clock.phase("leases and watchdogs")
        # Celery's Worker directly, as its `celery worker` command builds it (without the command line's parsing and
        # its scan of the installed packages' entry points for plugins)
        worker = app.Worker(hostname=runtime.worker_name, pool_cls="threads",
                            concurrency=concurrency or settings.worker_concurrency, queues=queues.split(","),
                            loglevel=loglevel, without_gossip=True, without_mingle=True)
        worker.start()
        exit_code = worker.exitcode
    finally:
        if urgent is not None:
            urgent.stop()
        if leases is not None:
            leases.stop()
        if watchdog is not None:
            watchdog.stop()
        if heartbeat is not None:
            heartbeat.stop()
        runtime.engine.stop()
        runtime.sink.close()
        if runtime.__dict__.get("_chunk_pool") is not None:
            runtime.chunk_pool.close()
    if exit_code:
        raise SystemExit(exit_code)
    return 0


def _run_all(settings: Settings, concurrency: int | None, loglevel: str) -> int:
    count = gpu_count()
    if count == 0:
        log.warning("--device all: no GPU is visible; starting one cpu worker")
        return run_worker(settings, "cpu", concurrency, loglevel)
    from ragq.core.hostplan import check_host_ram

    check_host_ram(settings, count, host_budget_for(settings, "cuda:0"))   # every worker of this host at once
    ensure_services(settings)

    def start(index: int) -> subprocess.Popen[bytes]:
        env = dict(os.environ, CUDA_VISIBLE_DEVICES=str(index), **{HOST_CHECKED_ENV: "1"})
        if settings.metrics_port > 0:
            env["RAGQ_METRICS_PORT"] = str(settings.metrics_port + index)
        args = [sys.executable, "-m", "ragq.cli", "worker", "--device", "cuda:0", "--name", f"gpu{index}",
                "--loglevel", loglevel]
        if concurrency:
            args += ["--concurrency", str(concurrency)]
        child = subprocess.Popen(args, env=env)  # noqa: S603
        log.info("started worker for GPU %d (pid %d)", index, child.pid)
        return child

    return supervise(start, count)


HOST_CHECKED_ENV = "RAGQ_HOST_CHECKED"   # set by `--device all` for its children: the host was checked for all


def supervise(start: Callable[[int], subprocess.Popen[bytes]], count: int, *, poll_s: float = 0.5,
              max_backoff_s: float = 60.0, stable_s: float = 60.0, handle_signals: bool = True) -> int:
    """Run `count` children made by `start(index)`; restart one that dies (after 1, 2, 4 ... s, reset once it ran
    `stable_s`), except one that exits with a configuration error (2), which stops them all. SIGTERM and SIGINT go
    to every child; returns the highest exit code once all have ended."""
    import time

    children = [start(i) for i in range(count)]
    started = [time.monotonic()] * count
    failures = [0] * count
    stopping = False

    def forward(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    if handle_signals:
        signal.signal(signal.SIGTERM, forward)
        signal.signal(signal.SIGINT, forward)
    codes = [0] * count
    restart_at: list[float | None] = [None] * count   # a dead worker's restart, after its backoff
    while True:
        alive = 0
        now = time.monotonic()
        for index, child in enumerate(children):
            due = restart_at[index]
            if due is not None:   # backing off: the loop keeps watching the others meanwhile
                if stopping:
                    restart_at[index] = None
                    continue
                alive += 1
                if now >= due:
                    restart_at[index] = None
                    children[index] = start(index)
                    started[index] = time.monotonic()
                continue
            code = child.poll()
            if code is None:
                alive += 1
                continue
            codes[index] = code
            if stopping or code == 0:
                continue
            if code == 2:   # a configuration error: restarting would fail the same way
                log.error("worker %d exited with a configuration error; stopping the others", index)
                forward(signal.SIGTERM, None)
                continue
            failures[index] = 1 if now - started[index] >= stable_s else failures[index] + 1
            delay = min(max_backoff_s, 2.0 ** (failures[index] - 1))
            log.warning("worker %d (pid %d) died with code %s; restarting it in %.0fs", index, child.pid, code, delay)
            restart_at[index] = now + delay
            alive += 1
        if alive == 0:
            return max(codes)
        time.sleep(poll_s)
