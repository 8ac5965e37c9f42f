"""Fakes for the engine's injected side effects: a device that counts bytes, models that take time and can run out
of memory, and a clock that only moves when told. They stand in for the GPU, not for ragq's own code."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

from ragq.core.errors import BadInput, DeviceOutOfMemory
from workers.backends import BatchOutput, ModelBase
from workers.models import ModelSpec

MiB = 2**20


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += max(seconds, 1e-6)


class FakeDevice:
    """Physical memory of a pretend card: every resident weight byte and every activation is counted."""

    def __init__(self, capacity_bytes: int) -> None:
        self.capacity = capacity_bytes
        self.used = 0
        self.peak = 0
        self.lock = threading.Lock()

    def allocate(self, nbytes: int, what: str) -> None:
        with self.lock:
            if self.used + nbytes > self.capacity:
                raise DeviceOutOfMemory(f"{what}: {nbytes} more bytes do not fit ({self.used}/{self.capacity})")
            self.used += nbytes
            self.peak = max(self.peak, self.used)

    def free(self, nbytes: int) -> None:
        with self.lock:
            self.used -= nbytes


class FakeReady:
    def __init__(self, seconds: float, timeline: list[tuple[str, float, float]] | None, name: str) -> None:
        self.start = time.monotonic()
        self.done = threading.Event()

        def finish() -> None:
            time.sleep(seconds)
            if timeline is not None:
                timeline.append((f"wake:{name}", self.start, time.monotonic()))
            self.done.set()

        threading.Thread(target=finish, daemon=True).start()

    def wait(self) -> None:
        self.done.wait(10)


class FakeModel(ModelBase):
    def __init__(self, spec: ModelSpec, device: FakeDevice, clock: Any, *, run_s_per_item: float = 0.0,
                 act_bytes_per_item: int = 0, wake_s: float = 0.0, real_time: bool = False,
                 runs: list[tuple[str, list[Any]]] | None = None,
                 timeline: list[tuple[str, float, float]] | None = None, fail_on: str | None = None,
                 gate: threading.Event | None = None, run_s_fixed: float = 0.0, bad_input: str | None = None) -> None:
        self.spec = spec
        self.name = spec.name
        self.nbytes = spec.estimate_bytes or MiB
        self.device = device
        self.clock = clock
        self.run_s_per_item = run_s_per_item
        self.act_bytes_per_item = act_bytes_per_item
        self.wake_s = wake_s
        self.real_time = real_time
        self.runs = runs if runs is not None else []
        self.timeline = timeline
        self.fail_on = fail_on
        self.gate = gate
        self.run_s_fixed = run_s_fixed
        self.bad_input = bad_input
        self.on_device = True
        device.allocate(self.nbytes, f"load {self.name}")

    def _spend(self, seconds: float) -> None:
        if self.real_time:
            time.sleep(seconds)
        elif seconds:
            self.clock.advance(seconds)

    def execute(self, items: list[Any], params: dict[str, Any]) -> BatchOutput:
        assert self.on_device, f"{self.name} ran while asleep"
        if self.gate is not None:
            self.gate.wait(5)
        if self.fail_on is not None and self.fail_on in items:
            raise RuntimeError(f"cannot process {self.fail_on}")
        if self.bad_input is not None and self.bad_input in items:
            raise BadInput(self.bad_input, "cannot be embedded")
        activations = self.act_bytes_per_item * len(items)
        self.device.allocate(activations, f"{self.name} batch of {len(items)}")
        try:
            start = time.monotonic()
            self._spend(self.run_s_fixed + self.run_s_per_item * len(items))
            if self.timeline is not None:
                self.timeline.append((f"run:{self.name}", start, time.monotonic()))
        finally:
            self.device.free(activations)
        self.runs.append((self.name, list(items)))
        return BatchOutput([f"{self.name}:{item}" for item in items],
                           peak_bytes=activations if self.act_bytes_per_item else None)

    def count_tokens(self, items: list[Any]) -> list[int]:
        return [len(str(item)) for item in items]

    def sleep(self) -> None:
        if self.on_device:
            self.device.free(self.nbytes)
            self.on_device = False

    def wake(self, asynchronous: bool = False) -> FakeReady | None:
        self.device.allocate(self.nbytes, f"wake {self.name}")
        self.on_device = True
        if asynchronous and self.real_time:
            return FakeReady(self.wake_s, self.timeline, self.name)
        self._spend(self.wake_s)
        return None

    def unload(self) -> None:
        self.sleep()


def spec(role: str, mib: float, batch: int = 8) -> ModelSpec:
    return ModelSpec(role=role, path=Path("/nonexistent"), name=role, batch_size=batch, initial_batch=batch,
                     urgent_batch=batch, estimate_bytes=int(mib * MiB))


def fake_engine(run_s_fixed: float = 0.0, fail_to_start: str | None = None, bad_input: str | None = None) -> Any:
    """An engine over fake models that take real time, for running in an engine process (a picklable factory)."""
    from ragq.core.errors import ConfigError
    from workers.engine import Engine

    if fail_to_start:
        raise ConfigError(fail_to_start)
    device = FakeDevice(1024 * MiB)
    specs = {"embed": spec("embed", 100), "generate": spec("generate", 200)}
    return Engine("fake", specs, lambda s, d: FakeModel(s, device, time.monotonic, real_time=True,
                                                        run_s_fixed=run_s_fixed, bad_input=bad_input), 1024 * MiB)
