"""The tuner's live knob values applied to an engine: batch size caps, context lengths, queue delays, the
cooldown, and the unload-idle counter (each increase evicts the models no pending work needs)."""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any

log = logging.getLogger("workers.engine")


def apply_knobs(engine: Any, values: dict[str, float]) -> None:
    """Apply the tuner's live knob values (on the engine thread, or before it starts): batch size caps,
    context lengths, queue delays, the cooldown, and the unload-idle counter (each increase evicts the models
    no pending work needs)."""
    for role, spec in list(engine.specs.items()):
        changes: dict[str, Any] = {}
        if f"max_length:{spec.name}" in values:
            changes["max_length"] = max(1, int(values[f"max_length:{spec.name}"]))
        if f"max_queue_delay_ms:{spec.name}" in values:
            changes["max_queue_delay_ms"] = max(0.0, float(values[f"max_queue_delay_ms:{spec.name}"]))
        changes = {k: v for k, v in changes.items() if getattr(spec, k) != v}
        if changes:
            new = replace(spec, **changes)
            engine.specs[role] = new
            slot = engine._slots[spec.name]
            slot.spec = new
            if slot.model is not None:
                slot.model.spec = new
            log.info("tuning: %s now %s", spec.name, changes)
        if f"batch_max:{spec.name}" in values:
            tuner = engine.tuners[spec.name]
            cap = max(1, int(values[f"batch_max:{spec.name}"]))
            if cap != tuner.maximum:
                unbounded = tuner.ceiling >= tuner.maximum
                tuner.maximum = cap
                tuner.ceiling = cap if unbounded else min(tuner.ceiling, cap)
                tuner.size = min(tuner.size, cap)
                log.info("tuning: %s batch size at most %d", spec.name, cap)
    if "cooldown_s" in values and values["cooldown_s"] != engine.policy.cooldown_s:
        engine.residency.policy = replace(engine.policy, cooldown_s=float(values["cooldown_s"]))
        log.info("tuning: cooldown %.1fs", engine.policy.cooldown_s)
    seen = values.get("unload_idle", 0.0)
    if engine._unload_seen is not None and seen > engine._unload_seen:
        if engine.residency.evict_idle(keep=""):
            log.info("tuning: unloaded the idle models")
    engine._unload_seen = seen
