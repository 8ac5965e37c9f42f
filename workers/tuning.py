"""The periodic tuner: evidence from Postgres -> the playbook (scheduler/playbook.py) -> knob moves, written to
tuning_knobs (live values every worker applies within seconds) and tuning_actions (the audit trail).

`ragq beat` sends `ragq.tune` every RAGQ_TUNE_INTERVAL_S; `ragq tune --dry-run` shows the symptoms and the moves
without making them. Knobs named in RAGQ_TUNING_PINNED never move. One-shot actions (unload idle models) are
counters the engines watch.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from typing import Any

from ragq.core.db import TuningAction, TuningKnob
from ragq.core.errors import ConfigError
from scheduler.playbook import ONCE, Evidence, Knob, Move, Symptom, Thresholds, diagnose, plan

log = logging.getLogger("workers.tuning")
_LOCK_KEY = 727_002


def knob_defaults(settings: Any, specs: dict[str, Any]) -> dict[str, Knob]:
    """Every live knob with its configured value, bounds and step."""
    pinned = {name.strip() for name in settings.tuning_pinned.split(",") if name.strip()}
    out: list[Knob] = []
    for spec in specs.values():
        # the cap may rise above a configured size that proves too small (up to 512), and fall to 1
        out.append(Knob(f"batch_max:{spec.name}", spec.batch_size, 1, max(spec.batch_size, 512), 2, factor=True))
        out.append(Knob(f"max_length:{spec.name}", spec.max_length, min(128, spec.max_length), spec.max_length,
                        1.5, factor=True))
        out.append(Knob(f"max_queue_delay_ms:{spec.name}", spec.max_queue_delay_ms, 0,
                        max(20.0, spec.max_queue_delay_ms), 2, integer=False))
        if spec.role == "generate":
            out.append(Knob("max_new_tokens", spec.max_new_tokens, min(16, spec.max_new_tokens), spec.max_new_tokens,
                            1.5, factor=True))
    out.append(Knob("generate_chunks", settings.top_k, 1, settings.top_k, 1))
    out.append(Knob("cooldown_s", settings.cooldown_s, 0, max(30.0, settings.cooldown_s), 2, integer=False))
    out.append(Knob("unload_idle", 0, 0, 1e12, 1))  # a counter: each one-shot action adds one
    unknown = sorted(pinned - {k.name for k in out})
    if unknown:
        raise ConfigError(f"RAGQ_TUNING_PINNED: no knob named {', '.join(unknown)}; the knobs are "
                          f"{', '.join(k.name for k in out)}")
    return {k.name: replace(k, pinned=k.name in pinned) for k in out}


def current_knobs(conn: Any, defaults: dict[str, Knob]) -> dict[str, Knob]:
    from sqlalchemy import text

    knobs = dict(defaults)
    for row in conn.execute(text("SELECT name, value, last_direction, last_moved_at FROM tuning_knobs")).mappings():
        if row["name"] in knobs:
            knobs[row["name"]] = replace(
                knobs[row["name"]], value=row["value"], last_direction=row["last_direction"],
                last_moved_at=row["last_moved_at"].timestamp() if row["last_moved_at"] else None)
    return knobs


def gather(conn: Any, start: datetime, end: datetime, background_pending: int = 0) -> Evidence:
    from sqlalchemy import text

    window = {"since": start, "until": end}
    ooms: dict[str, int] = {}
    swaps: dict[str, int] = {}
    swap_ms = 0.0
    for row in conn.execute(text("""
            SELECT model, event, count(*) AS n, sum(coalesce(ms, 0)) AS ms FROM model_events
            WHERE ts >= :since AND ts < :until
              AND (event = 'oom' OR (event IN ('load', 'wake') AND coalesce(reason, '') NOT LIKE '%urgent%'
                                     AND coalesce(reason, '') NOT LIKE 'prewarm%'))
            GROUP BY 1, 2"""), window).mappings():
        # swaps for urgent work (and prewarms of a question's next stage) pass any cooldown or come anyway:
        # only the others count towards oscillation
        target = ooms if row["event"] == "oom" else swaps
        target[row["model"]] = target.get(row["model"], 0) + int(row["n"])
        if row["event"] != "oom":
            swap_ms += float(row["ms"] or 0.0)
    # what the evictions that made room cost too (an unload frees memory and collects garbage; a sleep switches
    # to the host copy)
    swap_ms += float(conn.execute(text("""
        SELECT coalesce(sum(ms), 0) FROM model_events WHERE ts >= :since AND ts < :until
          AND event IN ('sleep', 'unload') AND coalesce(reason, '') LIKE 'evicted to fit%'"""), window).scalar() or 0)
    queue: dict[str, float] = {}
    compute: dict[str, float] = {}
    for row in conn.execute(text("""
            SELECT priority, sum(coalesce(engine_queue_ms, 0)) AS q, sum(compute_ms) AS c FROM stage_timings
            WHERE finished_at >= :since AND finished_at < :until GROUP BY 1"""), window).mappings():
        queue[row["priority"]], compute[row["priority"]] = float(row["q"] or 0), float(row["c"] or 0)
    p95 = conn.execute(text("""
        SELECT percentile_cont(0.95) WITHIN GROUP (ORDER BY compute_ms) FROM stage_timings
        WHERE stage = 'generate' AND model NOT IN ('none', 'extractive') AND outcome = 'ok'
          AND finished_at >= :since AND finished_at < :until"""), window).scalar()
    busy, interval = conn.execute(text("""
        SELECT sum(busy_ms), sum(interval_ms) FROM device_samples
        WHERE ts >= :since AND ts < :until AND busy_ms IS NOT NULL"""), window).one()
    items = conn.execute(text("""
        SELECT coalesce(sum(items), 0) FROM stage_timings WHERE stage = 'embed' AND priority = 'background'
          AND finished_at >= :since AND finished_at < :until"""), window).scalar()
    return Evidence(start=start.timestamp(), end=end.timestamp(), ooms=ooms, swaps=swaps, swap_ms=swap_ms, queue_ms=queue,
                    compute_ms=compute, generate_p95_ms=float(p95) if p95 is not None else None,
                    device_busy=(busy / interval) if interval else None, background_pending=background_pending,
                    embed_items=int(items or 0))


RAISED_FOR_THROUGHPUT = ("batch_max:", "max_queue_delay_ms:")


def mark_stalled(conn: Any, knobs: dict[str, Knob], evidence: Evidence, gain: float = 1.05,
                 fewer: float = 0.9) -> dict[str, Knob]:
    """A knob whose last raise did not pay is `stalled` (not raised further): a batch cap or queue delay raised for
    throughput when a window gathered after the raise shows no more items per second than the window that called
    for it (within `gain`); the cooldown, raised against oscillation, when swaps per minute did not fall below
    `fewer` times what they were (a longer cooldown no longer spaces the swaps out)."""
    from sqlalchemy import text

    seconds = max(evidence.end - evidence.start, 1e-9)
    rate = evidence.embed_items / seconds
    swaps_now = sum(evidence.swaps.values()) / (seconds / 60.0)
    out = dict(knobs)
    for name, knob in knobs.items():
        cooldown = name == "cooldown_s"
        if not (cooldown or name.startswith(RAISED_FOR_THROUGHPUT)) or knob.last_direction <= 0 \
                or knob.last_moved_at is None:
            continue
        if evidence.start < knob.last_moved_at:
            continue  # no window after the move yet: settling decides
        before = conn.execute(text("SELECT evidence FROM tuning_actions WHERE knob = :k ORDER BY id DESC LIMIT 1"),
                              {"k": name}).scalar() or {}
        if cooldown:
            previous_swaps = before.get("swaps_per_min")
            if previous_swaps and swaps_now > fewer * sum(float(v) for v in previous_swaps.values()):
                out[name] = replace(knob, stalled=True)
            continue
        previous = before.get("embed_items_per_s")
        if previous is not None and rate < gain * float(previous):
            out[name] = replace(knob, stalled=True)
    return out


def tick(db: Any, settings: Any, specs: dict[str, Any], *, now: datetime | None = None, dry_run: bool = False,
         background_pending: int = 0) -> tuple[list[Symptom], list[Move]]:
    """One tuner step over the last RAGQ_TUNE_WINDOW_S; with dry_run nothing is written."""
    from sqlalchemy import text


    now = now or datetime.now(timezone.utc)
    start = now - timedelta(seconds=settings.tune_window_s)
    thresholds = Thresholds(settle_s=settings.tune_settle_s, generate_p95_ms=settings.tune_generate_p95_ms)
    models = {role: spec.name for role, spec in specs.items()}
    with db.begin() as conn:
        if not dry_run and not conn.execute(text("SELECT pg_try_advisory_xact_lock(:k)"), {"k": _LOCK_KEY}).scalar():
            return [], []
        knobs = current_knobs(conn, knob_defaults(settings, specs))
        evidence = gather(conn, start, now, background_pending)
        knobs = mark_stalled(conn, knobs, evidence)
        symptoms = diagnose(evidence, models, thresholds)
        moves = plan(symptoms, knobs, now.timestamp(), start.timestamp(), thresholds)
        if dry_run or not moves:
            return symptoms, moves
        from sqlalchemy.dialects.postgresql import insert

        for move in moves:
            if move.direction == ONCE:
                knob = knobs[move.knob]
                move = replace(move, before=knob.value, after=knob.value + 1)
            values = {"name": move.knob, "value": move.after, "last_direction": move.direction, "last_moved_at": now}
            conn.execute(insert(TuningKnob).values(**values).on_conflict_do_update(
                index_elements=["name"], set_={k: v for k, v in values.items() if k != "name"}))
            conn.execute(insert(TuningAction).values(ts=now, knob=move.knob, before=move.before, after=move.after,
                                                     symptom=move.symptom, evidence=move.evidence))
            log.warning("tuning: %s %s -> %s (%s: %s)", move.knob, move.before, move.after, move.symptom,
                        move.evidence)
    return symptoms, moves


def live_values(db: Any) -> dict[str, float]:
    """The knobs the tuner has moved (the others keep their configured values)."""
    from sqlalchemy import text

    with db.connect() as conn:
        return {r["name"]: float(r["value"]) for r in conn.execute(
            text("SELECT name, value FROM tuning_knobs")).mappings()}
