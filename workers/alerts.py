"""Alert rules, evaluated in-process into the alerts table and the log (Celery beat runs `ragq.evaluate_alerts`;
`ragq alerts --evaluate` runs it once). The same rules, for Prometheus, are in ragq/monitoring/prometheus-rules.yml.

Rules (thresholds as the users asked):
  vram_usage          device memory in use / the device's memory: > 80 % warning, > 90 % major, > 95 % critical
                      (per worker and device, from the engine's device_samples)
  error_rate          failed stages / all stages over the last RAGQ_ALERT_WINDOW_S (5 min) > 2 %: major
                      (at least 20 stages, so that one failure among three is not an incident)
  queue_over_compute  queue time above compute time for a priority class, over each evaluation's last minute,
                      held for RAGQ_ALERT_QUEUE_FOR_S (5 min): warning (urgent: major)

States: a condition seen first is `pending` until it has held for the rule's `for` time, then `firing`; a firing
alert resolves only after its condition has been false for `keep_firing_s` (60 s), so a value hovering at a
threshold does not flap. The state machine (`step`) is pure; `evaluate` reads conditions from Postgres, applies it
under an advisory lock and writes the rows.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from datetime import datetime, timedelta, timezone
from typing import Any

from ragq.core.db import Alert

log = logging.getLogger("workers.alerts")

SEVERITIES = ("warning", "major", "critical")
VRAM_LEVELS = ((0.95, "critical"), (0.90, "major"), (0.80, "warning"))
ERROR_RATE_THRESHOLD = 0.02
ERROR_RATE_MIN_STAGES = 20
KEEP_FIRING_S = 60.0
_LOCK_KEY = 727_001  # pg advisory lock: one evaluation at a time across beat ticks and CLI runs


@dataclass(frozen=True)
class Observation:
    """One rule's verdict on one subject at one evaluation: severity None means the condition is false."""

    rule: str
    subject: str
    severity: str | None
    value: float
    threshold: float
    message: str
    for_s: float = 0.0


@dataclass(frozen=True)
class AlertState:
    rule: str
    subject: str
    severity: str
    state: str                 # pending | firing
    value: float
    threshold: float
    message: str
    started_at: datetime       # the condition first held
    updated_at: datetime       # the condition last held
    fired_at: datetime | None = None
    id: int | None = None


@dataclass(frozen=True)
class Transition:
    kind: str                  # fire | change | resolve | drop (a pending alert whose condition went away)
    alert: AlertState
    at: datetime


def step(open_alerts: list[AlertState], observations: list[Observation], now: datetime,
         keep_firing_s: float = KEEP_FIRING_S) -> tuple[list[AlertState], list[Transition]]:
    """The alerts still open after this evaluation, and what changed."""
    seen = {(o.rule, o.subject): o for o in observations}
    current = {(a.rule, a.subject): a for a in open_alerts}
    still_open: list[AlertState] = []
    transitions: list[Transition] = []
    for key in sorted(set(seen) | set(current)):
        obs, alert = seen.get(key), current.get(key)
        if obs is not None and obs.severity is not None:
            if alert is None:
                alert = AlertState(obs.rule, obs.subject, obs.severity, "pending", obs.value, obs.threshold,
                                   obs.message, started_at=now, updated_at=now)
            else:
                before = alert.severity
                alert = replace(alert, severity=obs.severity, value=obs.value, threshold=obs.threshold,
                                message=obs.message, updated_at=now)
                if alert.state == "firing" and before != obs.severity:
                    transitions.append(Transition("change", alert, now))
            if alert.state == "pending" and (now - alert.started_at).total_seconds() >= obs.for_s:
                alert = replace(alert, state="firing", fired_at=now)
                transitions.append(Transition("fire", alert, now))
            still_open.append(alert)
        elif alert is not None:
            if alert.state == "pending":
                transitions.append(Transition("drop", alert, now))
            elif (now - alert.updated_at).total_seconds() >= keep_firing_s:
                transitions.append(Transition("resolve", alert, now))
            else:
                still_open.append(alert)  # keep firing a while: no flapping at the threshold
    return still_open, transitions


def vram_severity(ratio: float) -> tuple[str | None, float]:
    for threshold, severity in VRAM_LEVELS:
        if ratio > threshold:
            return severity, threshold
    return None, VRAM_LEVELS[-1][0]


def observe(conn: Any, now: datetime, window_s: float, queue_for_s: float) -> list[Observation]:
    """Every rule's verdicts from the database, as of `now` (rows after `now` are not looked at)."""
    from sqlalchemy import text

    out: list[Observation] = []
    rows = conn.execute(text("""
        SELECT DISTINCT ON (worker, device) worker, device, used_bytes, budget_bytes, total_bytes
        FROM device_samples WHERE ts > :since AND ts <= :now ORDER BY worker, device, ts DESC"""),
        {"since": now - timedelta(minutes=10), "now": now}).mappings()
    for row in rows:
        total = row["total_bytes"] or row["budget_bytes"]
        ratio = row["used_bytes"] / total if total else 0.0
        severity, threshold = vram_severity(ratio)
        out.append(Observation("vram_usage", f"{row['worker']} {row['device']}", severity, ratio, threshold,
                               f"{row['device']} on {row['worker']}: {ratio:.0%} of device memory in use "
                               f"({row['used_bytes'] / 2**30:.2f} of {total / 2**30:.2f} GiB)"))
    since = now - timedelta(seconds=window_s)
    total, failed = conn.execute(text("""
        SELECT count(*), count(*) FILTER (WHERE outcome = 'error') FROM stage_timings
        WHERE finished_at > :since AND finished_at <= :now"""), {"since": since, "now": now}).one()
    if total:
        rate = failed / total
        firing = total >= ERROR_RATE_MIN_STAGES and rate > ERROR_RATE_THRESHOLD
        out.append(Observation("error_rate", "stages", "major" if firing else None, rate, ERROR_RATE_THRESHOLD,
                               f"{failed} of {total} stages failed in the last {window_s / 60:.0f} min ({rate:.1%})"))
    rows = conn.execute(text("""
        SELECT priority, sum(queue_ms) AS queue_ms, sum(compute_ms) AS compute_ms, count(*) AS n FROM stage_timings
        WHERE finished_at > :since AND finished_at <= :now GROUP BY priority"""),
        {"since": now - timedelta(seconds=60), "now": now}).mappings()
    for row in rows:
        queue_ms, compute_ms = float(row["queue_ms"] or 0.0), float(row["compute_ms"] or 0.0)
        ratio = queue_ms / compute_ms if compute_ms else (float("inf") if queue_ms else 0.0)
        severity = ("major" if row["priority"] == "urgent" else "warning") if queue_ms > compute_ms else None
        out.append(Observation(
            "queue_over_compute", str(row["priority"]), severity, min(ratio, 1e9), 1.0,
            f"{row['priority']} stages waited {queue_ms / 1000:.1f}s and computed {compute_ms / 1000:.1f}s "
            f"in the last minute ({row['n']} stages)", for_s=queue_for_s))
    return out


def evaluate(db: Any, now: datetime | None = None, *, window_s: float = 300.0, queue_for_s: float = 300.0,
             keep_firing_s: float = KEEP_FIRING_S) -> list[Transition]:
    """One evaluation: conditions from Postgres, the state machine, rows written, transitions logged."""
    from sqlalchemy import delete, select, text, update


    now = now or datetime.now(timezone.utc)
    with db.begin() as conn:
        if not conn.execute(text("SELECT pg_try_advisory_xact_lock(:k)"), {"k": _LOCK_KEY}).scalar():
            return []  # another evaluation is running
        rows = conn.execute(select(Alert.__table__).where(Alert.state.in_(("pending", "firing")))).mappings().all()
        open_alerts = [AlertState(r["rule"], r["subject"], r["severity"], r["state"], r["value"] or 0.0,
                                  r["threshold"] or 0.0, r["message"], r["started_at"], r["updated_at"],
                                  r["fired_at"], r["id"])
                       for r in rows]
        observations = observe(conn, now, window_s, queue_for_s)
        still_open, transitions = step(open_alerts, observations, now, keep_firing_s)
        for alert in still_open:
            values = {"severity": alert.severity, "state": alert.state, "value": alert.value,
                      "threshold": alert.threshold, "message": alert.message, "updated_at": alert.updated_at,
                      "fired_at": alert.fired_at}
            if alert.id is None:
                conn.execute(Alert.__table__.insert().values(
                    rule=alert.rule, subject=alert.subject, started_at=alert.started_at, **values))
            else:
                conn.execute(update(Alert).where(Alert.id == alert.id).values(**values))
        for t in transitions:
            if t.alert.id is None:
                continue
            if t.kind == "resolve":
                conn.execute(update(Alert).where(Alert.id == t.alert.id).values(state="resolved", resolved_at=now))
            elif t.kind == "drop":  # pending, never fired: nothing to remember
                conn.execute(delete(Alert).where(Alert.id == t.alert.id))
    for t in transitions:
        level = logging.WARNING if t.kind in ("fire", "change") else logging.INFO
        if t.kind != "drop":
            log.log(level, "alert %s %s [%s] %s: %s", t.alert.rule, {"fire": "FIRING", "change": "now",
                    "resolve": "RESOLVED"}[t.kind], t.alert.severity, t.alert.subject, t.alert.message)
    return transitions


def recent(db: Any, since: datetime, now: datetime | None = None) -> list[dict[str, Any]]:
    """Alerts open now or started since `since`, newest first."""
    from sqlalchemy import or_, select


    with db.connect() as conn:
        rows = conn.execute(select(Alert.__table__).where(
            or_(Alert.state.in_(("pending", "firing")), Alert.started_at >= since)
        ).order_by(Alert.started_at.desc())).mappings().all()
    return [dict(r) for r in rows]
