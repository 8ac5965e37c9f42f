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
import os
import queue
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from multiprocessing.connection import Client, Listener, wait
from typing import Any, Literal

from ragq.core.errors import BackendUnavailable, RagqError
from scheduler.batching import BACKGROUND
from workers.engine import Engine, EngineResult, EngineStats
from workers.models import ModelSpec

log = logging.getLogger(__name__)

EngineFactory = Callable[..., Engine]


# -- messages over the pipe (pickled by multiprocessing between two local processes of one worker) ---------------
@dataclass(frozen=True)
class SubmitCall:
    rid: int
    role: str
    items: list[Any]
    tokens: list[int] | None
    priority: int
    deadline: float | None
    params: dict[str, Any]


@dataclass(frozen=True)
class PrewarmCall:
    role: str
    urgent: bool = False


@dataclass(frozen=True)
class ReadCall:
    rid: int
    what: Literal["resident_models", "tiers", "pending_count", "stats_snapshot"]


@dataclass(frozen=True)
class StopCall:
    pass


@dataclass(frozen=True)
class Ready:
    pass


@dataclass(frozen=True)
class Fatal:
    error: RagqError


@dataclass(frozen=True)
class Answer:
    rid: int
    value: Any          # an EngineResult, or what a ReadCall read


@dataclass(frozen=True)
class Failure:
    rid: int
    error: RagqError


@dataclass(frozen=True)
class Stopped:
    pass


def transportable(exc: BaseException) -> RagqError:
    """ragq's errors travel as themselves (each pickles as itself); anything else as a RagqError naming it."""
    if isinstance(exc, RagqError):
        return exc
    return RagqError(f"{type(exc).__name__}: {exc}")


# -- the engine process --------------------------------------------------------------------------------------------
def _serve_connection(conn: Any, engine: Engine, owner: bool) -> None:
    """Answer one client's requests until it goes (or, for the owner, says stop)."""
    outbox: queue.SimpleQueue[Any] = queue.SimpleQueue()

    def sender() -> None:
        while (message := outbox.get()) is not None:
            try:
                conn.send(message)
            except (OSError, EOFError, ValueError):
                return

    threading.Thread(target=sender, name="ragq-engine-send", daemon=True).start()

    def reply(rid: int, future: Future[EngineResult]) -> None:
        exc = future.exception()
        outbox.put(Answer(rid, future.result()) if exc is None else Failure(rid, transportable(exc)))

    reads: dict[str, Callable[[], Any]] = {
        "resident_models": engine.resident_models, "tiers": engine.tiers, "pending_count": engine.pending_count,
        "stats_snapshot": engine.stats_snapshot,
    }
    outbox.put(Ready())
    try:
        while True:
            try:
                message = conn.recv()
            except (EOFError, OSError):
                if owner:
                    # killed, not stopped: nothing here outlives it usefully (its requests' callers are gone, the
                    # device's memory goes with the process), and its replacement waits for it to be gone
                    log.warning("the worker process went away; the engine exits")
                    logging.shutdown()
                    os._exit(0)
                return
            if isinstance(message, SubmitCall):
                try:
                    future = engine.submit(message.role, message.items, tokens=message.tokens,
                                           priority=message.priority, deadline=message.deadline,
                                           params=message.params)
                except Exception as exc:
                    outbox.put(Failure(message.rid, transportable(exc)))
                    continue
                future.add_done_callback(lambda f, rid=message.rid: reply(rid, f))
            elif isinstance(message, PrewarmCall):
                engine.prewarm(message.role, message.urgent)
            elif isinstance(message, ReadCall):
                try:
                    outbox.put(Answer(message.rid, reads[message.what]()))
                except Exception as exc:
                    outbox.put(Failure(message.rid, transportable(exc)))
            elif isinstance(message, StopCall) and owner:
                return
    finally:
        if owner:
            outbox.put(Stopped())
        outbox.put(None)


def serve(conn: Any, address: str, authkey: bytes, factory: EngineFactory, args: tuple[Any, ...],
          log_level: str, parent_pid: int | None = None) -> None:
    """The engine process's main: build the engine, then answer its owner (the worker that started it, over `conn`)
    and any other local worker that attaches at `address` (the urgent consumer), until the owner stops or goes."""
    if parent_pid is not None:
        from workers.parent import watch_parent

        watch_parent(parent_pid)
    logging.basicConfig(level=log_level, format="[%(asctime)s: %(levelname)s/%(processName)s] %(message)s")
    try:
        engine = factory(*args).start()
        listener = Listener(address, family="AF_UNIX", authkey=authkey)
    except BaseException as exc:  # noqa: BLE001 - the worker must learn why, whatever it is
        log.exception("engine process could not start")
        conn.send(Fatal(transportable(exc)))
        return

    def accept() -> None:
        while True:
            try:
                client = listener.accept()
            except (OSError, EOFError):
                return
            except Exception as exc:  # a client with the wrong key, or one that hung up during the handshake
                log.warning("engine: refused a connection: %s", exc)
                continue
            threading.Thread(target=_serve_connection, args=(client, engine, False), name="ragq-engine-client",
                             daemon=True).start()

    threading.Thread(target=accept, name="ragq-engine-accept", daemon=True).start()
    try:
        _serve_connection(conn, engine, owner=True)
    finally:
        listener.close()
        engine.stop()


# -- the worker side -------------------------------------------------------------------------------------------------
class EngineClient:
    """The engine's API for task threads. The owner (built with a factory) starts the engine process and starts a
    new one if it dies; an attached client (`EngineClient.attach`) connects to an owner's engine at its address
    and reconnects after a restart."""

    def __init__(
        self,
        device: str,
        specs: dict[str, ModelSpec],
        factory: EngineFactory | None,
        args: tuple[Any, ...] = (),
        *,
        address: str | None = None,
        authkey: bytes | None = None,
        token_counter: Callable[[ModelSpec, list[Any]], list[int]] | None = None,
        preparer: Callable[[ModelSpec, list[Any], dict[str, Any]], tuple[list[Any], list[int]]] | None = None,
        log_level: str = "INFO",
        start_timeout_s: float = 600.0,
    ) -> None:
        self.device = device
        self.specs = specs
        self.factory = factory
        self.args = args
        # a Linux abstract socket: no file to clean up, no path-length trouble
        self.address = address or f"\0ragq-engine-{uuid.uuid4().hex}"
        self.authkey = authkey or os.urandom(32)
        self.token_counter = token_counter
        self.preparer = preparer   # on the submitting thread: tokenise here, not on the engine's device thread
        self.log_level = log_level
        self.start_timeout_s = start_timeout_s
        self.restarts = 0
        self._ids = itertools.count(1)
        self._lock = threading.Lock()          # process lifecycle, the connection and the pending table
        self._send_lock = threading.Lock()
        self._pending: dict[int, Future[Any]] = {}
        self._process: multiprocessing.process.BaseProcess | None = None
        self._conn: Any = None
        self._stopping = False
        with self._lock:
            self._connect()

    @classmethod
    def attach(cls, device: str, specs: dict[str, ModelSpec], address: str, authkey: bytes, **kwargs: Any
               ) -> EngineClient:
        return cls(device, specs, None, address=address, authkey=authkey, **kwargs)

    @property
    def owner(self) -> bool:
        return self.factory is not None

    # -- lifecycle -------------------------------------------------------------------------------------------------
    def _connect(self) -> None:
        if self.owner:
            self._start_process()
            return
        deadline = time.monotonic() + self.start_timeout_s
        while True:
            try:
                conn = Client(self.address, family="AF_UNIX", authkey=self.authkey)
                break
            except (OSError, EOFError) as exc:  # not listening yet, or being restarted by its owner
                if time.monotonic() > deadline:
                    raise BackendUnavailable(f"no engine for {self.device} answers at its address: {exc}") from None
                time.sleep(0.2)
        hello = conn.recv()
        assert isinstance(hello, Ready), hello
        self._use(conn, None)

    def _start_process(self) -> None:
        assert self.factory is not None
        context = multiprocessing.get_context("spawn")
        parent, child = context.Pipe()
        process = context.Process(
            target=serve, args=(child, self.address, self.authkey, self.factory, self.args, self.log_level,
                                os.getpid()),
            name=f"ragq-engine-{self.device}", daemon=True)
        process.start()
        child.close()  # so that the engine process's exit reads as EOF here
        if not parent.poll(self.start_timeout_s):
            process.kill()
            raise BackendUnavailable(f"the engine process for {self.device} did not start in {self.start_timeout_s:.0f}s")
        try:
            hello = parent.recv()
        except EOFError:
            process.join(5)
            raise BackendUnavailable(
                f"the engine process for {self.device} exited at start (code {process.exitcode})") from None
        if isinstance(hello, Fatal):
            process.join(5)
            raise hello.error
        self._process = process
        self._use(parent, process)
        log.info("engine process for %s started (pid %d)", self.device, process.pid)

    def _use(self, conn: Any, process: multiprocessing.process.BaseProcess | None) -> None:
        self._conn = conn
        threading.Thread(target=self._read, args=(conn, process), name=f"ragq-engine-read-{self.device}",
                         daemon=True).start()

    def _ensure_running(self) -> Any:
        with self._lock:
            if self._stopping:
                raise BackendUnavailable(f"engine on {self.device} is stopping")
            if self._conn is None:
                if self.owner:
                    self.restarts += 1
                    log.warning("engine process for %s is gone (code %s); starting a new one", self.device,
                                self._process.exitcode if self._process else None)
                else:
                    log.warning("engine for %s went away; reconnecting", self.device)
                self._connect()
            return self._conn

    def _read(self, conn: Any, process: multiprocessing.process.BaseProcess | None) -> None:
        while True:
            try:
                message = conn.recv()
            except (EOFError, OSError):
                break
            if isinstance(message, Stopped):
                break
            if isinstance(message, (Answer, Failure)):
                with self._lock:
                    future = self._pending.pop(message.rid, None)
                if future is None:
                    continue
                if isinstance(message, Failure):
                    future.set_exception(message.error)
                else:
                    future.set_result(message.value)
        code = None
        if process is not None:  # wait for its end without reaping it (stop() joins; two joins race)
            wait([process.sentinel], 10)
            if not self._stopping:   # reading exitcode reaps the child: leave that to stop()'s join when stopping
                code = process.exitcode
        with self._lock:
            if self._conn is conn:
                self._conn = None
            lost = list(self._pending.values())
            self._pending.clear()
        if lost and not self._stopping:
            log.error("engine for %s went away (code %s) with %d requests in flight", self.device, code, len(lost))
        for future in lost:
            future.set_exception(BackendUnavailable(
                f"the engine process for {self.device} exited (code {code}) before answering"))

    def _send(self, message_for: Callable[[int], SubmitCall | ReadCall]) -> Future[Any]:
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
        if not self.owner:
            if conn is not None:
                conn.close()
            return
        if process is None or not process.is_alive():
            return
        try:
            with self._send_lock:
                conn.send(StopCall())
        except (OSError, EOFError, AttributeError):
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
        if self.preparer is not None and items:
            items, tokens = self.preparer(self.specs[role], items, dict(params or {}))
            tokens = list(tokens)
        else:
            tokens = list(self.token_counter(self.specs[role], items)) if self.token_counter and items else None
        return self._send(lambda rid: SubmitCall(rid, role, items, tokens, priority, deadline, dict(params or {})))

    def run(self, role: str, items: list[Any], **kwargs: Any) -> EngineResult:
        return self.submit(role, items, **kwargs).result()

    def prewarm(self, role: str, urgent: bool = False) -> None:
        if role in self.specs:
            conn = self._ensure_running()
            with self._send_lock:
                conn.send(PrewarmCall(role, urgent))

    def _call(self, what: Literal["resident_models", "tiers", "pending_count", "stats_snapshot"],
              timeout_s: float = 30.0) -> Any:
        return self._send(lambda rid: ReadCall(rid, what)).result(timeout_s)

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
