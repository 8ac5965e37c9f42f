"""The engine's side of continuous generation.

When the generate role's model runs a decode loop (`model.continuous`), the engine does not run its requests as
micro-batches: every pending generate item joins the loop when the planner picks the role (the loop keeps its own
waiting line, urgent first, and its slots), and the engine advances the loop one slice at a time — decode steps
until the slice's time is up or a message arrives in the inbox (a new question joins at the next step; an urgent
request of another role gets the device between two steps). Requests with sequences in flight stay pending, so
the planner keeps choosing the role (and bringing the model back if it had to sleep) until they finish.

Pieces of each answer go to the request's stream (`params["stream"]`, written by the engine's `streamer`), and
the time to the first piece is kept with the request.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from ragq.core.errors import RequestExpired
from scheduler.batching import URGENT
from workers.backends import BatchOutput
from workers.engine_state import thread_schedstat

log = logging.getLogger(__name__)

Streamer = Callable[[str, str], None]   # (stream key, piece)


class Decoding:
    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.model: Any = None                              # the loaded model the sequences run on
        self.inflight: dict[tuple[int, int], Any] = {}      # (request key, item index) -> Sequence
        self.requests: dict[int, Any] = {}                  # request key -> Request with items in flight

    def in_flight(self, request: Any) -> list[int]:
        return [index for key, index in self.inflight if key == request.key]

    # -- one slice ------------------------------------------------------------------------------------------------
    def run(self, role: str, batch: list[tuple[Any, list[int]]], slot: Any, model: Any, load_ms: float) -> None:
        """Admit the planned items and every other pending item of `role`, run decode steps for one slice,
        complete what finished."""
        engine = self.engine
        if self.model is not model:
            self._restart()   # the model was unloaded and loaded again: its sequences start over
            self.model = model
        now = engine.clock()
        planned: dict[int, tuple[Any, set[int]]] = {r.key: (r, set(indices)) for r, indices in batch}
        for request in engine._pending.values():
            if request.role == role and request.todo:
                planned.setdefault(request.key, (request, set()))[1].update(request.todo)
        for request, indices in planned.values():
            fresh = sorted(i for i in indices if (request.key, i) not in self.inflight and i not in request.results)
            if not fresh:
                continue
            if request.started is None:
                request.started = now
            request.load_ms += load_ms
            for index in fresh:
                self.inflight[(request.key, index)] = model.start_sequence(
                    (request.key, index), request.items[index], request.params,
                    urgent=request.priority == URGENT, on_piece=self._sink(request, index),
                    alive=self._alive(request))
            self.requests[request.key] = request
            request.todo = []
        started = time.perf_counter()
        sched0 = thread_schedstat()
        counters = model.loop.counters
        before = {key: counters[key] for key in ("steps", "tokens", "prefill_tokens", "chained", "wait_ms")}
        finished: list[Any] = []
        cut = False
        try:
            while model.loop.active:
                finished += model.decode_step()
                if not engine._inbox.empty():
                    cut = True   # a message came (a new request, a read of the engine's state): it goes first
                    break
                if time.perf_counter() - started >= engine.config.decode_slice_s:
                    break
            finished += model.settle_decode()   # no step left in flight while other work has the device
        except Exception as exc:   # a failed step fails the sequences in flight, never the loop
            log.error("decode step on %s failed: %s", engine.device, exc)
            for request in list(self.requests.values()):
                engine._fail(request, exc)
            for seq in list(self.inflight.values()):
                model.loop.cancel(seq.key)
            self.inflight.clear()
            self.requests.clear()
            return
        slice_ms = (time.perf_counter() - started) * 1000.0
        sched1 = thread_schedstat()
        slot.last_used = engine.clock()
        self._complete(finished, slice_ms)
        phases = {f"decode_{key}": float(counters[key] - value) for key, value in before.items()}
        phases["decode_slices_cut"] = float(cut)
        done = [s for s in finished if s.done != "cancelled"]
        engine._count(role, model.name, BatchOutput([None] * len(done), phases=phases),
                      [len(s.generated) for s in done], slice_ms, sched1[0] - sched0[0], sched1[1] - sched0[1])

    def _complete(self, finished: list[Any], slice_ms: float) -> None:
        engine = self.engine
        touched = {key for key, _ in self.inflight}
        for request_key in touched:
            request = self.requests.get(request_key)
            if request is not None:
                request.compute_ms += slice_ms
                request.batch_size = max(request.batch_size, len(self.inflight))
        for seq in finished:
            key, index = seq.key
            self.inflight.pop(seq.key, None)
            request = self.requests.get(key)
            if request is None or key not in engine._pending:
                continue
            if seq.done == "cancelled":
                continue   # its request already failed (deadline) or went away
            request.results[index] = seq.answer
            if not request.todo and not self.in_flight(request) and request.done:
                self.requests.pop(key, None)
                engine._finish_request(request)
        for key in [k for k, r in self.requests.items() if k not in engine._pending]:
            self.requests.pop(key, None)   # failed meanwhile (expired): its sequences are dropped by `alive`

    def _restart(self) -> None:
        for (key, index) in list(self.inflight):
            request = self.requests.get(key)
            if request is not None and index not in request.todo:
                request.todo.append(index)
        self.inflight.clear()
        self.requests.clear()

    # -- per request --------------------------------------------------------------------------------------------
    def _alive(self, request: Any) -> Callable[[], bool]:
        engine = self.engine

        def alive() -> bool:
            if request.key not in engine._pending:
                return False   # failed (its deadline passed) or cancelled by its caller
            if request.deadline is not None and engine.clock() > request.deadline:
                engine.stats.role(request.role).expired += 1
                engine._fail(request, RequestExpired(f"{request.role} request passed its deadline mid-decode"))
                return False
            return True

        return alive

    def _sink(self, request: Any, index: int) -> Callable[[str], None]:
        """Where the item's pieces go: the first one dates the request's first token; pieces of a streamed
        request's first item go to its stream."""
        engine = self.engine
        stream = request.params.get("stream") if index == 0 else None

        def piece(text: str) -> None:
            if request.first_token_at is None:
                request.first_token_at = engine.clock()
            if stream and engine.streamer is not None:
                engine.streamer(str(stream), text)

        return piece
