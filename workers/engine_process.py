"""The device engine in a process of its own, as vLLM's engine core and TEI's router/backend split do.

Why: the engine thread launches a model's kernels one Python call at a time, and each call releases and re-takes
the GIL. In the same process as Celery's task threads (JSON, SQL, tokenizing, formatting vectors), every re-take
can wait for a busy thread's switch interval: measured with bench/convoy.py, an embedding micro-batch ran several
times slower with task-like threads beside it. In its own process the engine's thread has a GIL to itself.

`EngineClient` offers the Engine's API to task threads (submit/run/prewarm/has_role/model_name, and snapshots of
residency and stats). Token counts are made on the caller's thread in the worker process, so the engine process
spends its time on the device. Requests and results travel over a multiprocessing pipe; deadlines stay valid
because time.monotonic is one clock for every process on the machine. If the engine process dies, the requests in
flight fail with BackendUnavailable and the next request starts a new engine process.
"""

from __future__ import annotations

import itertools
import logging
import multiprocessing
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from ragq import errors
from ragq.errors import BackendUnavailable, RagqError
from scheduler.batching import BACKGROUND
from workers.engine import Engine, EngineResult, EngineStats
from workers.models import ModelSpec

log = logging.getLogger(__name__)

EngineFactory = Callable[..., Engine]
_CALLS = ("resident_models", "tiers", "pending_count", "stats_snapshot")


def _exception_message(exc: BaseException) -> tuple[str, str]:
    return type(exc).__name__, str(exc)


def _rebuild_exception(name: str, message: str) -> Exception:
    """ragq's errors come back as themselves (their classes take one message); anything else as a RagqError."""
    cls = getattr(errors, name, None)
    if isinstance(cls, type) and issubclass(cls, RagqError):
        exc = cls.__new__(cls)
        Exception.__init__(exc, message)
        return exc
    return RagqError(f"{name}: {message}")


# -- the engine process --------------------------------------------------------------------------------------------
def serve(conn: Any, factory: EngineFactory, args: tuple[Any, ...], log_level: str) -> None:
    """The engine process's main: build the engine, answer requests until told to stop or the worker goes."""
    logging.basicConfig(level=log_level, format="[%(asctime)s: %(levelname)s/%(processName)s] %(message)s")
    try:
        engine = factory(*args).start()
    except BaseException as exc:  # noqa: BLE001 - the worker must learn why, whatever it is
        log.exception("engine process could not start")
        conn.send(("fatal", _exception_message(exc)))
        return
    outbox: queue.SimpleQueue[tuple[Any, ...] | None] = queue.SimpleQueue()

    def sender() -> None:
        while (message := outbox.get()) is not None:
            try:
                conn.send(message)
            except (OSError, EOFError):
                return

    threading.Thread(target=sender, name="ragq-engine-send", daemon=True).start()

    def reply(rid: int, future: Future[EngineResult]) -> None:
        exc = future.exception()
        outbox.put(("result", rid, future.result()) if exc is None else ("error", rid, _exception_message(exc)))

    outbox.put(("ready", {}))
    try:
        while True:
            try:
                message = conn.recv()
            except (EOFError, OSError):
                log.warning("the worker process went away; the engine stops")
                break
            kind = message[0]
            if kind == "submit":
                _, rid, role, items, tokens, priority, deadline, params = message
                try:
                    future = engine.submit(role, items, tokens=tokens, priority=priority, deadline=deadline,
                                           params=params)
                except Exception as exc:
                    outbox.put(("error", rid, _exception_message(exc)))
                    continue
                future.add_done_callback(lambda f, rid=rid: reply(rid, f))
            elif kind == "prewarm":
                engine.prewarm(message[1])
            elif kind == "call":
                _, rid, name = message
                try:
                    value = engine.stats_snapshot() if name == "stats_snapshot" else getattr(engine, name)()
                    outbox.put(("value", rid, value))
                except Exception as exc:
                    outbox.put(("error", rid, _exception_message(exc)))
            elif kind == "stop":
                break
    finally:
        engine.stop()
        outbox.put(("stopped", {}))
        outbox.put(None)


# -- the worker side -------------------------------------------------------------------------------------------------
class EngineClient:
    """The engine's API for task threads, backed by an engine process (started now, restarted when it dies)."""

    def __init__(
        self,
        device: str,
        specs: dict[str, ModelSpec],
        factory: EngineFactory,
        args: tuple[Any, ...] = (),
        *,
        token_counter: Callable[[ModelSpec, list[Any]], list[int]] | None = None,
        log_level: str = "INFO",
        start_timeout_s: float = 600.0,
    ) -> None:
        self.device = device
        self.specs = specs
        self.factory = factory
        self.args = args
        self.token_counter = token_counter
        self.log_level = log_level
        self.start_timeout_s = start_timeout_s
        self.restarts = 0
        self._ids = itertools.count(1)
        self._lock = threading.Lock()          # process lifecycle and the pending table
        self._send_lock = threading.Lock()
        self._pending: dict[int, Future[Any]] = {}
        self._process: multiprocessing.process.BaseProcess | None = None
        self._conn: Any = None
        self._stopping = False
        with self._lock:
            self._start()

    # -- lifecycle -------------------------------------------------------------------------------------------------
    def _start(self) -> None:
        context = multiprocessing.get_context("spawn")
        parent, child = context.Pipe()
        process = context.Process(target=serve, args=(child, self.factory, self.args, self.log_level),
                                  name=f"ragq-engine-{self.device}", daemon=True)
        process.start()
        child.close()  # so that the engine process's exit reads as EOF here
        if not parent.poll(self.start_timeout_s):
            process.kill()
            raise BackendUnavailable(f"the engine process for {self.device} did not start in {self.start_timeout_s:.0f}s")
        try:
            kind, detail = parent.recv()
        except EOFError:
            process.join(5)
            raise BackendUnavailable(
                f"the engine process for {self.device} exited at start (code {process.exitcode})") from None
        if kind == "fatal":
            process.join(5)
            raise _rebuild_exception(*detail)
        self._process, self._conn = process, parent
        threading.Thread(target=self._read, args=(parent, process), name=f"ragq-engine-read-{self.device}",
                         daemon=True).start()
        log.info("engine process for %s started (pid %d)", self.device, process.pid)

    def _ensure_running(self) -> Any:
        with self._lock:
            if self._stopping:
                raise BackendUnavailable(f"engine on {self.device} is stopping")
            if self._process is None or not self._process.is_alive():
                if self._process is not None:
                    self.restarts += 1
                    log.warning("engine process for %s is gone (code %s); starting a new one", self.device,
                                self._process.exitcode)
                self._start()
            return self._conn

    def _read(self, conn: Any, process: multiprocessing.process.BaseProcess) -> None:
        while True:
            try:
                message = conn.recv()
            except (EOFError, OSError):
                break
            kind = message[0]
            if kind == "stopped":
                break
            if kind in ("result", "value", "error"):
                with self._lock:
                    future = self._pending.pop(message[1], None)
                if future is None:
                    continue
                if kind == "error":
                    future.set_exception(_rebuild_exception(*message[2]))
                else:
                    future.set_result(message[2])
        process.join(10)
        with self._lock:
            lost = list(self._pending.values())
            self._pending.clear()
        if lost and not self._stopping:
            log.error("engine process for %s exited (code %s) with %d requests in flight", self.device,
                      process.exitcode, len(lost))
        for future in lost:
            future.set_exception(BackendUnavailable(
                f"the engine process for {self.device} exited (code {process.exitcode}) before answering"))

    def _send(self, message_for: Callable[[int], tuple[Any, ...]]) -> Future[Any]:
        conn = self._ensure_running()
        future: Future[Any] = Future()
        rid = next(self._ids)
        with self._lock:
            self._pending[rid] = future
        try:
            with self._send_lock:
                conn.send(message_for(rid))
        except (OSError, EOFError, BrokenPipeError) as exc:
            with self._lock:
                self._pending.pop(rid, None)
            raise BackendUnavailable(f"the engine process for {self.device} is unreachable: {exc}") from None
        return future

    def stop(self, timeout_s: float = 60.0) -> None:
        with self._lock:
            self._stopping = True
            process, conn = self._process, self._conn
        if process is None or not process.is_alive():
            return
        try:
            with self._send_lock:
                conn.send(("stop",))
        except (OSError, EOFError):
            pass
        process.join(timeout_s)
        if process.is_alive():
            process.kill()
            process.join(10)

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    # -- the Engine's API --------------------------------------------------------------------------------------------
    def has_role(self, role: str) -> bool:
        return role in self.specs

    def model_name(self, role: str) -> str:
        return self.specs[role].name

    def submit(self, role: str, items: list[Any], *, priority: int = BACKGROUND, deadline: float | None = None,
               params: dict[str, Any] | None = None) -> Future[EngineResult]:
        if role not in self.specs:
            raise BackendUnavailable(f"no model is configured for role {role!r} on {self.device}")
        items = list(items)
        tokens = list(self.token_counter(self.specs[role], items)) if self.token_counter and items else None
        return self._send(lambda rid: ("submit", rid, role, items, tokens, priority, deadline, dict(params or {})))

    def run(self, role: str, items: list[Any], **kwargs: Any) -> EngineResult:
        return self.submit(role, items, **kwargs).result()

    def prewarm(self, role: str) -> None:
        if role in self.specs:
            conn = self._ensure_running()
            with self._send_lock:
                conn.send(("prewarm", role))

    def _call(self, name: str, timeout_s: float = 30.0) -> Any:
        assert name in _CALLS
        return self._send(lambda rid: ("call", rid, name)).result(timeout_s)

    def resident_models(self) -> dict[str, int]:
        return self._call("resident_models")

    def tiers(self) -> dict[str, str]:
        return self._call("tiers")

    def pending_count(self) -> int:
        return self._call("pending_count")

    @property
    def stats(self) -> EngineStats:
        return self._call("stats_snapshot")


__all__ = ["EngineClient", "serve"]
