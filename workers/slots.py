"""The models' tiers and the moves between them (load, wake, sleep, unload), done on the engine's thread.

`ModelSlots` executes the residency moves the planner chose: each move runs the backend's own load, wake, sleep or
unload, measures what it took, reports a model event, and keeps the measured footprint (weights at load,
activations per batch) in the profile store so the next start plans with it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor

from ragq.core.errors import BudgetExceeded, DeviceOutOfMemory
from scheduler.plan import idle_evictions
from scheduler.residency import (
    DISK, DROP_HOST, HOST, LOAD, SLEEP, UNLOAD, VRAM, WAKE, ModelView, Move, ResidencyPolicy, trim_to_budget,
)
from workers.backends import LoadedModel
from workers.engine_state import EngineStats, Slot
from workers.models import ModelSpec, kv_cache_guess
from workers.observer import Observers
from workers.profiles import ModelProfile, ProfileStore

log = logging.getLogger(__name__)

Loader = Callable[[ModelSpec, str], LoadedModel]
Demand = Callable[[], tuple[dict[str, int], set[str]]]   # pending requests per model, models expected soon


class ModelSlots:
    def __init__(self, device: str, specs: Iterable[ModelSpec], loader: Loader, policy: ResidencyPolicy, *,
                 profiles: ProfileStore, device_kind: str, clock: Callable[[], float], stats: EngineStats,
                 observer: Observers, demand: Demand, changed: Callable[[], None]) -> None:
        self.device = device
        self.loader = loader
        self.policy = policy
        self.profiles = profiles
        self.device_kind = device_kind
        self.clock = clock
        self.stats = stats
        self.observer = observer
        self.demand = demand
        self.changed = changed            # residency changed: the engine publishes its state
        self.slots: dict[str, Slot] = {}
        for spec in specs:
            profile = self.profile(spec)
            guess = profile.weights_bytes if profile else (spec.estimate_bytes or 0)
            if not profile and spec.estimate_bytes:   # a generator's first load allocates its KV cache too
                guess += kv_cache_guess(spec, device.split(":")[0])
            self.slots[spec.name] = Slot(spec, vram_bytes=guess, host_bytes=guess)
        self.swap_ms: dict[str, float] = {}    # what bringing each model in took last (a load or a wake)
        self.evict_ms: dict[str, float] = {}   # what its last sleep or unload took
        self._background = ThreadPoolExecutor(1, thread_name_prefix=f"ragq-load-{device}")
        self._pinning = ThreadPoolExecutor(1, thread_name_prefix=f"ragq-pin-{device}")

    def profile(self, spec: ModelSpec) -> ModelProfile | None:
        return self.profiles.get(spec.name, self.device_kind, spec.precision)

    # -- what the planner sees -------------------------------------------------------------------------------------
    def views(self, pending: dict[str, int] | None = None, expected: set[str] | None = None) -> dict[str, ModelView]:
        if pending is None or expected is None:
            pending, expected = self.demand()
        return {
            name: ModelView(name, s.tier, s.vram_bytes, s.host_bytes, s.last_used, s.resident_since,
                            pending.get(name, 0), name in expected,
                            (self.swap_in_ms(name) + self.evict_ms.get(name, 0.0)) / 1000.0)
            for name, s in self.slots.items()
        }

    def swap_in_ms(self, name: str) -> float:
        """What bringing the model in took last time (a load or a wake); first guess: its bytes at 20 GB/s."""
        return self.swap_ms.get(name, self.slots[name].vram_bytes / 20e9 * 1000.0)

    def resident_bytes(self) -> int:
        return sum(s.vram_bytes for s in self.slots.values() if s.tier == VRAM)

    def loading_any(self) -> bool:
        return any(s.loading is not None for s in self.slots.values())

    # -- moves -----------------------------------------------------------------------------------------------------
    def apply(self, moves: Iterable[Move]) -> None:
        for move in moves:
            slot = self.slots[move.model]
            if move.action in (SLEEP, UNLOAD):
                self.event(move.model, "evict", slot.vram_bytes, 0.0, move.reason)
            if move.action == SLEEP:
                self.sleep(slot, move.reason)
            elif move.action in (UNLOAD, DROP_HOST):
                self.unload(slot, move.reason)
            elif move.action == WAKE:
                self.wake(slot, move.reason, asynchronous=move.reason.startswith("prewarm"))
            elif move.action == LOAD:
                self.load(slot, move.reason, background=move.reason.startswith("prewarm"))

    def evict_idle(self, keep: str, everything: bool = False, unused_for_s: float | None = None,
                   reason: str = "evicted after an out-of-memory error") -> bool:
        """Evict models no pending work needs (or, with `everything`, all but `keep`); True if any went."""
        moves = idle_evictions(self.views(), self.policy, self.clock(), keep, everything=everything,
                               unused_for_s=unused_for_s, reason=reason)
        self.apply(moves)
        return bool(moves)

    def ready(self, slot: Slot) -> LoadedModel:
        """The slot's model, active on the device: finishing a background load or an asynchronous wake."""
        if slot.loading is not None:
            self.finish_loading(slot)
        if slot.tier == HOST:
            self.wake(slot, "needed by pending work", asynchronous=False)
        elif slot.tier == DISK or slot.model is None:
            self.load(slot, "needed by pending work", background=False)
        if slot.ready is not None:
            slot.ready.wait()
            slot.ready = None
        assert slot.model is not None
        return slot.model

    def load(self, slot: Slot, reason: str, background: bool) -> None:
        if background:
            slot.tier = VRAM  # its bytes count against the budget from now on
            slot.resident_since = self.clock()
            slot.loading = self._background.submit(self._timed_load, slot.spec)
            return
        t0 = self.clock()
        try:
            model = self.loader(slot.spec, self.device)
        except DeviceOutOfMemory as exc:  # the first guess of its size was low: make room, try once more
            self.stats.ooms += 1
            self.event(slot.spec.name, "oom", slot.vram_bytes, 0.0, f"loading: {exc}"[:500])
            if not self.evict_idle(keep=slot.spec.name, everything=True):
                raise
            model = self.loader(slot.spec, self.device)
        slot.tier = VRAM
        slot.resident_since = self.clock()
        self._loaded(slot, model, (self.clock() - t0) * 1000.0, reason)

    def _timed_load(self, spec: ModelSpec) -> tuple[LoadedModel, float]:
        t0 = self.clock()
        model = self.loader(spec, self.device)
        return model, (self.clock() - t0) * 1000.0

    def finish_loading(self, slot: Slot) -> None:
        future, slot.loading = slot.loading, None
        assert future is not None
        try:
            model, ms = future.result()
        except Exception:
            slot.tier, slot.resident_since = DISK, None
            raise
        self._loaded(slot, model, ms, "prewarm: loaded in the background")

    def _loaded(self, slot: Slot, model: LoadedModel, ms: float, reason: str) -> None:
        slot.model = model
        slot.vram_bytes = slot.host_bytes = model.nbytes
        slot.last_used = self.clock()
        self.stats.loads += 1
        self.stats.load_ms += ms
        self.swap_ms[slot.spec.name] = ms
        self.event(slot.spec.name, "load", model.nbytes, ms, reason)
        self.save_profile(slot, weights_bytes=model.nbytes)
        self._prepare_host_copy(model)
        if model.nbytes > self.policy.budget_bytes:
            self.unload(slot, "larger than the budget")
            raise BudgetExceeded(
                f"model {slot.spec.name} measured {model.nbytes} bytes, more than the budget of "
                f"{self.policy.budget_bytes}"
            )
        # the first guess may have been low: put back within the budget what no pending work needs
        self.apply(trim_to_budget(self.views(), slot.spec.name, self.policy,
                                  f"{slot.spec.name} measured larger than its first guess"))

    def _prepare_host_copy(self, model: LoadedModel) -> None:
        """Where every model's host copy fits the host tier at once, make a new model's copy now, off the loop, so
        that evicting it later is a pointer switch instead of seconds of pinning while work waits."""
        if len(self.slots) < 2 or sum(s.vram_bytes for s in self.slots.values()) > self.policy.host_budget_bytes:
            return

        def run() -> None:
            try:
                model.prepare_host_copy()
            except Exception:
                log.exception("could not prepare the host copy of %s (a sleep will make it)", model.name)

        self._pinning.submit(run)

    def wake(self, slot: Slot, reason: str, asynchronous: bool) -> None:
        if slot.model is None:  # its host copy was dropped meanwhile: load it instead
            self.load(slot, reason, background=asynchronous)
            return
        t0 = self.clock()
        slot.ready = slot.model.wake(asynchronous=asynchronous)
        if not asynchronous and slot.ready is not None:
            slot.ready.wait()
            slot.ready = None
        slot.tier = VRAM
        slot.resident_since = self.clock()
        ms = (self.clock() - t0) * 1000.0
        self.stats.wakes += 1
        if not asynchronous:
            self.swap_ms[slot.spec.name] = ms
        self.event(slot.spec.name, "wake", slot.vram_bytes, ms, reason)

    def sleep(self, slot: Slot, reason: str) -> None:
        if slot.loading is not None:
            self.finish_loading(slot)
        if slot.ready is not None:
            slot.ready.wait()
            slot.ready = None
        assert slot.model is not None
        t0 = self.clock()
        slot.model.sleep()
        slot.tier = HOST
        slot.resident_since = None
        self.stats.sleeps += 1
        self.evict_ms[slot.spec.name] = (self.clock() - t0) * 1000.0
        self.event(slot.spec.name, "sleep", slot.host_bytes, self.evict_ms[slot.spec.name], reason)

    def unload(self, slot: Slot, reason: str) -> None:
        if slot.loading is not None:
            try:
                self.finish_loading(slot)
            except Exception:
                return
        if slot.model is None:
            slot.tier = DISK
            return
        t0 = self.clock()
        if slot.ready is not None:
            slot.ready.wait()
            slot.ready = None
        slot.model.unload()
        slot.model = None
        nbytes = slot.vram_bytes
        slot.tier = DISK
        slot.resident_since = None
        self.stats.unloads += 1
        self.evict_ms[slot.spec.name] = (self.clock() - t0) * 1000.0
        self.event(slot.spec.name, "unload", nbytes, self.evict_ms[slot.spec.name], reason)

    def close(self) -> None:
        """At shutdown (the engine thread has ended): every model off the device, the helper threads stopped."""
        for slot in self.slots.values():
            if slot.loading is not None:
                self.finish_loading(slot)
            if slot.model is not None:
                self.unload(slot, "shutdown")
        self._background.shutdown(wait=True)
        self._pinning.shutdown(wait=True)

    # -- footprints ----------------------------------------------------------------------------------------------
    def record_activation(self, slot: Slot, peak_bytes: int | None, batch_size: int, max_tokens: int) -> None:
        if peak_bytes is not None:
            self.save_profile(slot, activation=(batch_size, max_tokens, int(peak_bytes)))

    def save_profile(self, slot: Slot, weights_bytes: int | None = None,
                     activation: tuple[int, int, int] | None = None, tuned_batch: int | None = None) -> None:
        spec = slot.spec
        profile = self.profile(spec) or ModelProfile(spec.name, self.device_kind, spec.precision,
                                                     weights_bytes or slot.vram_bytes)
        changed = False
        if weights_bytes is not None and weights_bytes != profile.weights_bytes:
            profile.weights_bytes = weights_bytes
            changed = True
        if activation is not None:
            changed = profile.observe(*activation) or changed
        if tuned_batch is not None and tuned_batch != profile.tuned_batch:
            profile.tuned_batch = tuned_batch
            changed = True
        if changed or weights_bytes is not None:
            try:
                self.profiles.put(profile)
            except Exception:
                log.exception("could not persist the profile of %s", spec.name)

    def event(self, model: str, event: str, nbytes: int, ms: float, reason: str) -> None:
        log.info("model %s %s on %s: %.1f MiB in %.0f ms (%s)", model, event, self.device, nbytes / 2**20, ms, reason)
        self.observer.model_event({"device": self.device, "model": model, "event": event, "bytes": nbytes,
                                   "ms": ms, "reason": reason})
        if event != "evict":
            self.changed()


__all__ = ["Demand", "Loader", "ModelSlots"]
