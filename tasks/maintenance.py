"""Periodic work sent by `ragq beat`: alert evaluation and the tuner. It runs on a worker's urgent consumer (quick, and due on
time even while ingestion fills the background queue) and expires rather than pile up if no worker is there."""

from __future__ import annotations

from typing import Any

from workers.alerts import evaluate
from workers.celery_app import app
from workers.metrics import queue_depths
from workers.tuning import tick


@app.task(name="ragq.evaluate_alerts", bind=True, ignore_result=True)
def evaluate_alerts(self: Any) -> int:
    rt = self.app.require_runtime()
    settings = rt.settings
    return len(evaluate(rt.db, window_s=settings.alert_window_s, queue_for_s=settings.alert_queue_for_s))


@app.task(name="ragq.tune", bind=True, ignore_result=True)
def tune(self: Any) -> int:
    rt = self.app.require_runtime()
    try:
        import redis

        pending = queue_depths(redis.Redis.from_url(rt.endpoints.broker_url, socket_timeout=2))["background"]
    except Exception:
        pending = 0
    _, moves = tick(rt.db, rt.settings, rt.specs, background_pending=pending)
    return len(moves)
