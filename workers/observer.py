"""What the engine reports, through one interface: model events, batches, device state and device samples.

`EngineObserver` is a base of do-nothing hooks (as dramatiq's middleware is): metrics, the timing sink and tests'
recorders override the hooks they need. The engine holds one `Observers`, which calls each observer in order and
logs and swallows a failing one: reporting never breaks serving.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BatchReport:
    """One micro-batch that ran."""

    device: str
    model: str
    role: str
    items: int
    tokens: int
    seconds: float                 # run time on the engine thread
    alloc_retries: int = 0


@dataclass(frozen=True)
class DeviceState:
    """Residency, memory and pending work after a change."""

    device: str
    resident: dict[str, bool]      # model -> in device memory
    used_bytes: int
    budget_bytes: int
    pending: dict[str, int]        # "urgent" / "background" -> requests waiting in the engine


class EngineObserver:
    """Hooks the engine calls on its own thread; each should be quick (queue the work, don't do it)."""

    def model_event(self, row: dict[str, Any]) -> None:
        """A model_events row: device, model, event (load, wake, sleep, unload, evict, oom), bytes, ms, reason."""

    def batch(self, report: BatchReport) -> None:
        """A micro-batch ran."""

    def state(self, state: DeviceState) -> None:
        """Residency, memory or pending work changed (after a batch or a model event)."""

    def sample(self, row: dict[str, Any]) -> None:
        """A device_samples row (device, used_bytes, budget_bytes, resident, busy_ms, interval_ms), at most every
        sample interval, also while idle."""


class Observers(EngineObserver):
    """The engine's observers, called in order; one that raises is logged and the others still hear."""

    def __init__(self, *observers: EngineObserver) -> None:
        self.observers = [o for o in observers if o is not None]

    def __bool__(self) -> bool:
        return bool(self.observers)

    def add(self, observer: EngineObserver) -> None:
        self.observers.append(observer)

    @staticmethod
    def _guarded(hook: Callable[..., None], *args: Any) -> None:
        try:
            hook(*args)
        except Exception:  # reporting must never break serving
            log.exception("engine observer %s failed", getattr(hook, "__qualname__", hook))

    def model_event(self, row: dict[str, Any]) -> None:
        for observer in self.observers:
            self._guarded(observer.model_event, row)

    def batch(self, report: BatchReport) -> None:
        for observer in self.observers:
            self._guarded(observer.batch, report)

    def state(self, state: DeviceState) -> None:
        for observer in self.observers:
            self._guarded(observer.state, state)

    def sample(self, row: dict[str, Any]) -> None:
        for observer in self.observers:
            self._guarded(observer.sample, row)


class EventLog(EngineObserver):
    """Collects model events in a list (tests, benchmarks)."""

    def __init__(self, events: list[dict[str, Any]] | None = None) -> None:
        self.events = events if events is not None else []

    def model_event(self, row: dict[str, Any]) -> None:
        self.events.append(row)


__all__ = ["BatchReport", "DeviceState", "EngineObserver", "EventLog", "Observers"]
