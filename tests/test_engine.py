"""The engine with injected fakes for loading and running: batching, priority, budget, expiry, failures."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from ragq.errors import BudgetExceeded, RequestExpired
from scheduler.batching import BACKGROUND, URGENT
from workers.engine import Engine
from workers.models import ModelSpec

MiB = 2**20


class FakeModel:
    def __init__(self, spec: ModelSpec, log: list[tuple[str, list[Any]]], gate: threading.Event | None,
                 fail_on: str | None) -> None:
        self.spec = spec
        self.name = spec.name
        self.nbytes = spec.estimate_bytes or MiB
        self.log = log
        self.gate = gate
        self.fail_on = fail_on

    def run(self, items: list[Any], params: dict[str, Any]) -> list[Any]:
        if self.gate is not None:
            self.gate.wait(5)
        if self.fail_on is not None and self.fail_on in items:
            raise RuntimeError(f"cannot process {self.fail_on}")
        self.log.append((self.name, list(items)))
        return [f"{self.name}:{item}" for item in items]

    def count_tokens(self, items: list[Any]) -> list[int]:
        return [len(str(item)) for item in items]

    def unload(self) -> None:
        pass


class Harness:
    def __init__(self, budget: int = 100 * MiB, batch: int = 8, sizes: dict[str, int] | None = None,
                 fail_on: str | None = None) -> None:
        sizes = sizes or {}
        self.specs = {
            role: ModelSpec(role=role, path=__import__("pathlib").Path("/nonexistent"), name=role, batch_size=batch,
                            estimate_bytes=sizes.get(role, MiB))
            for role in ("embed", "rerank", "generate")
        }
        self.runs: list[tuple[str, list[Any]]] = []
        self.loads: list[str] = []
        self.events: list[dict[str, Any]] = []
        self.gate: threading.Event | None = None
        self.fail_on = fail_on

        def loader(spec: ModelSpec, device: str) -> FakeModel:
            self.loads.append(spec.name)
            return FakeModel(spec, self.runs, self.gate, self.fail_on)

        self.engine = Engine("cpu", self.specs, loader, budget, on_model_event=self.events.append)


def test_requests_from_many_callers_share_one_micro_batch() -> None:
    h = Harness(batch=16)
    futures = [h.engine.submit("embed", [f"t{i}a", f"t{i}b"]) for i in range(5)]
    h.engine.start()
    results = [f.result(5) for f in futures]
    h.engine.stop()
    assert h.runs == [("embed", [f"t{i}{s}" for i in range(5) for s in "ab"])]
    assert results[2].outputs == ["embed:t2a", "embed:t2b"]
    assert all(r.batch_size == 10 for r in results)
    assert h.loads == ["embed"]


def test_large_request_is_split_into_micro_batches_and_reassembled() -> None:
    h = Harness(batch=4)
    h.engine.start()
    result = h.engine.run("embed", [str(i) for i in range(10)])
    h.engine.stop()
    assert [len(items) for _, items in h.runs] == [4, 4, 2]
    assert result.outputs == [f"embed:{i}" for i in range(10)]


def test_urgent_jumps_ahead_at_a_micro_batch_boundary() -> None:
    h = Harness(batch=2)
    h.gate = threading.Event()
    h.engine.start()
    background = h.engine.submit("embed", [f"b{i}" for i in range(8)], priority=BACKGROUND)
    time.sleep(0.1)  # the first background micro-batch is now running, held by the gate
    urgent = h.engine.submit("embed", ["u0"], priority=URGENT)
    h.gate.set()
    urgent.result(5)
    background.result(5)
    h.engine.stop()
    batches = [items for _, items in h.runs]
    assert batches[0] == ["b0", "b1"]
    assert batches[1][0] == "u0"  # right after the running micro-batch, not after the whole backlog


def test_models_are_evicted_lru_to_stay_in_budget() -> None:
    h = Harness(budget=10 * MiB, sizes={"embed": 6 * MiB, "rerank": 3 * MiB, "generate": 6 * MiB})
    h.engine.start()
    h.engine.run("embed", ["a"])
    h.engine.run("rerank", ["b"])
    assert set(h.engine.resident_models()) == {"embed", "rerank"}
    h.engine.run("generate", ["c"])
    resident = h.engine.resident_models()
    h.engine.stop()
    assert sum(resident.values()) <= 10 * MiB
    assert "embed" not in resident  # least recently used
    kinds = [(e["event"], e["model"]) for e in h.events]
    assert ("unload", "embed") in kinds and ("load", "generate") in kinds


def test_model_larger_than_budget_fails_its_request_only() -> None:
    h = Harness(budget=4 * MiB, sizes={"generate": 8 * MiB})
    h.engine.start()
    with pytest.raises(BudgetExceeded):
        h.engine.run("generate", ["x"])
    assert h.engine.run("embed", ["y"]).outputs == ["embed:y"]
    h.engine.stop()


def test_expired_requests_never_run() -> None:
    h = Harness()
    late = h.engine.submit("embed", ["late"], priority=URGENT, deadline=time.monotonic() - 0.01)
    on_time = h.engine.submit("embed", ["fine"], priority=URGENT, deadline=time.monotonic() + 30)
    h.engine.start()
    with pytest.raises(RequestExpired):
        late.result(5)
    assert on_time.result(5).outputs == ["embed:fine"]
    h.engine.stop()
    assert all("late" not in items for _, items in h.runs)


def test_failing_batch_fails_its_requests_and_the_engine_goes_on() -> None:
    h = Harness(fail_on="poison")
    h.engine.start()
    with pytest.raises(RuntimeError, match="poison"):
        h.engine.run("embed", ["poison"])
    assert h.engine.run("embed", ["ok"]).outputs == ["embed:ok"]
    h.engine.stop()


def test_timings_split_queue_load_compute() -> None:
    h = Harness()
    h.engine.start()
    first = h.engine.run("embed", ["a"])
    second = h.engine.run("embed", ["b"])
    h.engine.stop()
    assert first.load_ms >= 0 and second.load_ms == 0.0
    assert first.tokens == 1 and first.model == "embed"
