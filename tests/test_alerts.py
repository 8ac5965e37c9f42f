"""Alerts: the pure state machine (pending, firing, severity changes, hold before resolving), and each rule fired
and resolved against a real Postgres with injected rows (dated in 2099, so the session's real rows stay out)."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from workers.alerts import AlertState, Observation, evaluate, step, vram_severity

T0 = datetime(2099, 1, 1, tzinfo=timezone.utc)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def obs(severity: str | None, value: float = 0.9, for_s: float = 0.0) -> Observation:
    return Observation("r", "s", severity, value, 0.8, "m", for_s)


def test_vram_levels() -> None:
    assert vram_severity(0.5) == (None, 0.80)
    assert vram_severity(0.81) == ("warning", 0.80)
    assert vram_severity(0.91) == ("major", 0.90)
    assert vram_severity(0.951) == ("critical", 0.95)


def test_fire_change_hold_and_resolve() -> None:
    alerts, t = step([], [obs("warning")], at(0))
    assert [x.kind for x in t] == ["fire"] and alerts[0].state == "firing"
    alerts, t = step(alerts, [obs("critical", 0.97)], at(10))
    assert [x.kind for x in t] == ["change"] and alerts[0].severity == "critical"
    alerts, t = step(alerts, [obs(None, 0.5)], at(20))  # below the threshold: held, not resolved yet
    assert t == [] and alerts[0].state == "firing"
    alerts, t = step(alerts, [obs("warning", 0.82)], at(30))  # back above: the same alert, no new one
    assert t == [] or [x.kind for x in t] == ["change"]
    alerts, t = step(alerts, [obs(None, 0.5)], at(40))
    alerts, t = step(alerts, [], at(100))  # 60 s since it last held
    assert [x.kind for x in t] == ["resolve"] and alerts == []


def test_no_flapping_around_a_threshold() -> None:
    alerts: list[AlertState] = []
    fires = 0
    for i in range(60):  # the value crosses the threshold every 10 s for ten minutes
        alerts, t = step(alerts, [obs("warning" if i % 2 else None)], at(10 * i))
        fires += sum(x.kind == "fire" for x in t)
    assert fires == 1


def test_a_sustained_condition_fires_only_after_its_for_time() -> None:
    alerts, t = step([], [obs("warning", for_s=300)], at(0))
    assert t == [] and alerts[0].state == "pending"
    alerts, t = step(alerts, [obs("warning", for_s=300)], at(200))
    assert t == []
    alerts, t = step(alerts, [obs("warning", for_s=300)], at(300))
    assert [x.kind for x in t] == ["fire"]
    pending, t = step([], [obs("warning", for_s=300)], at(0))
    pending, t = step(pending, [obs(None, for_s=300)], at(100))  # went away before its time: never fired
    assert pending == [] and [x.kind for x in t] == ["drop"]


@pytest.fixture()
def db(db_engine):  # type: ignore[no-untyped-def]
    from tests.conftest import delete_rows_from

    delete_rows_from(db_engine, T0)
    yield db_engine
    delete_rows_from(db_engine, T0)


def sample(engine, seconds: float, used_gib: float, total_gib: float = 16.0) -> None:  # type: ignore[no-untyped-def]
    from sqlalchemy import insert

    from ragq.core.db import DeviceSample

    with engine.begin() as conn:
        conn.execute(insert(DeviceSample).values(ts=at(seconds), worker="alert-test", device="cuda:0",
                                                 used_bytes=int(used_gib * 2**30), budget_bytes=int(13.6 * 2**30),
                                                 total_bytes=int(total_gib * 2**30)))


def stages(engine, seconds: float, n: int, errors: int = 0, queue_ms: float = 10.0,  # type: ignore[no-untyped-def]
           compute_ms: float = 100.0, priority: str = "background") -> None:
    from sqlalchemy import insert

    from ragq.core.db import StageTiming

    rows = [{"stage": "embed", "priority": priority, "outcome": "error" if i < errors else "ok",
             "started_at": at(seconds), "finished_at": at(seconds), "queue_ms": queue_ms, "load_ms": 0.0,
             "compute_ms": compute_ms, "batch_size": 1, "items": 1, "tokens": 1} for i in range(n)]
    with engine.begin() as conn:
        conn.execute(insert(StageTiming), rows)


def open_alerts(engine, rule: str) -> list[dict]:  # type: ignore[no-untyped-def,type-arg]
    from sqlalchemy import text

    with engine.connect() as conn:
        return [dict(r) for r in conn.execute(text("SELECT * FROM alerts WHERE rule = :r AND started_at >= :t "
                                                   "ORDER BY id"), {"r": rule, "t": T0}).mappings()]


def test_vram_alert_fires_escalates_and_resolves(db) -> None:  # type: ignore[no-untyped-def]
    sample(db, 0, used_gib=13.2)  # 82.5 % of the card
    assert [t.kind for t in evaluate(db, at(1))] == ["fire"]
    assert [(a["state"], a["severity"]) for a in open_alerts(db, "vram_usage")] == [("firing", "warning")]
    sample(db, 10, used_gib=15.5)  # 96.9 %
    assert [(t.kind, t.alert.severity) for t in evaluate(db, at(11))] == [("change", "critical")]
    sample(db, 20, used_gib=8.0)
    assert evaluate(db, at(21)) == []  # held for a minute
    assert [t.kind for t in evaluate(db, at(75))] == ["resolve"]
    rows = open_alerts(db, "vram_usage")
    assert [(a["state"], a["severity"]) for a in rows] == [("resolved", "critical")]
    assert rows[0]["fired_at"] == at(1) and rows[0]["resolved_at"] == at(75)


def test_error_rate_alert_fires_and_resolves(db) -> None:  # type: ignore[no-untyped-def]
    stages(db, 0, n=100, errors=5)  # 5 %
    assert [t.kind for t in evaluate(db, at(10))] == ["fire"]
    assert open_alerts(db, "error_rate")[0]["severity"] == "major"
    stages(db, 30, n=10)
    assert evaluate(db, at(40)) == []  # still 5 of 110 (4.5 %)
    stages(db, 400, n=100, errors=1)  # 1 % in the window that follows, the condition last held at 40 s
    assert [t.kind for t in evaluate(db, at(410))] == ["resolve"]
    assert open_alerts(db, "error_rate")[0]["state"] == "resolved"


def test_queue_over_compute_fires_only_when_sustained_and_resolves(db) -> None:  # type: ignore[no-untyped-def]
    for s in range(0, 331, 30):  # queue 5x compute, every 30 s for 5.5 minutes
        stages(db, s, n=5, queue_ms=500.0, compute_ms=100.0)
        kinds = [t.kind for t in evaluate(db, at(s + 1))]
        assert kinds == (["fire"] if s == 300 else []), (s, kinds)
    assert open_alerts(db, "queue_over_compute")[0]["state"] == "firing"
    stages(db, 360, n=5, queue_ms=10.0, compute_ms=100.0)
    evaluate(db, at(361))
    assert [t.kind for t in evaluate(db, at(430))] == ["resolve"]


@pytest.mark.integration
def test_beat_has_the_workers_evaluate_alerts_and_the_cli_lists_them(worker, ragq_home, db) -> None:  # type: ignore[no-untyped-def]
    import json
    import subprocess
    import sys
    import time

    from sqlalchemy import insert, text

    from ragq.core.db import DeviceSample
    from tests.conftest import ROOT, ragq_env, run_ragq

    with db.begin() as conn:  # a device at 97 % of its memory, now
        conn.execute(insert(DeviceSample).values(worker="beat-test", device="cuda:0", used_bytes=int(15.5 * 2**30),
                                                 budget_bytes=int(13.6 * 2**30), total_bytes=16 * 2**30))
    env = ragq_env(ragq_home, RAGQ_ALERT_INTERVAL_S="1")
    beat = subprocess.Popen([sys.executable, "-m", "ragq.cli", "beat"], env=env, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        firing: list[dict] = []  # type: ignore[type-arg]
        while time.monotonic() < deadline and not firing:
            time.sleep(1.0)
            out = run_ragq(env, "alerts", "--json")
            assert out.returncode == 0, out.stderr
            firing = [a for a in json.loads(out.stdout) if a["subject"] == "beat-test cuda:0"]
        assert firing and firing[0]["state"] == "firing" and firing[0]["severity"] == "critical"
        table = run_ragq(env, "alerts")
        assert "beat-test" in table.stdout and "firing" in table.stdout and "critical" in table.stdout
    finally:
        beat.terminate()
        beat.wait(30)
        with db.begin() as conn:
            conn.execute(text("DELETE FROM device_samples WHERE worker = 'beat-test'"))
            conn.execute(text("DELETE FROM alerts WHERE subject = 'beat-test cuda:0'"))
    bad = run_ragq(env, "alerts", "--since", "soon")
    assert bad.returncode == 2 and "'soon' is not a duration" in bad.stderr + bad.stdout
