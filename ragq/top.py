"""`ragq top`: a live terminal view of the broker's queues, each worker's device (memory, resident models, from
the engine's latest device sample), recent stage latencies and open alerts. `--once` prints one frame."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any


def snapshot(db: Any, broker_url: str, recent_s: float = 60.0) -> dict[str, Any]:
    import redis
    from sqlalchemy import text

    from workers.metrics import queue_depths

    now = datetime.now(timezone.utc)
    try:
        queues: dict[str, int] | str = queue_depths(redis.Redis.from_url(broker_url, socket_timeout=2))
    except Exception as exc:  # the view goes on without the broker, and says so
        queues = f"unavailable: {exc}"
    with db.connect() as conn:
        devices = [dict(r) for r in conn.execute(text("""
            SELECT DISTINCT ON (worker, device) worker, device, ts, used_bytes, budget_bytes, total_bytes, resident
            FROM device_samples WHERE ts > :since ORDER BY worker, device, ts DESC"""),
            {"since": now - timedelta(minutes=2)}).mappings()]
        latencies = [dict(r) for r in conn.execute(text("""
            SELECT priority, stage, count(*) AS n,
                   percentile_cont(0.5) WITHIN GROUP (ORDER BY queue_ms + load_ms + compute_ms) AS p50_ms,
                   percentile_cont(0.95) WITHIN GROUP (ORDER BY queue_ms + load_ms + compute_ms) AS p95_ms,
                   avg(queue_ms) AS queue_ms, avg(compute_ms) AS compute_ms,
                   count(*) FILTER (WHERE outcome <> 'ok') AS failed
            FROM stage_timings WHERE finished_at > :since GROUP BY 1, 2 ORDER BY 1 DESC, 2"""),
            {"since": now - timedelta(seconds=recent_s)}).mappings()]
        alerts = [dict(r) for r in conn.execute(text(
            "SELECT rule, subject, severity, state, message FROM alerts WHERE state IN ('pending', 'firing') "
            "ORDER BY started_at")).mappings()]
    for d in devices:
        d["age_s"] = (now - d.pop("ts")).total_seconds()
    return {"at": now.isoformat(), "queues": queues, "devices": devices, "latencies": latencies,
            "recent_s": recent_s, "alerts": alerts}


def render(snap: dict[str, Any]) -> Any:
    from rich.console import Group
    from rich.table import Table

    parts: list[Any] = []
    queues = snap["queues"]
    table = Table("queue", "waiting", title=f"ragq top — {snap['at'][:19]}Z", title_justify="left")
    if isinstance(queues, str):
        table.add_row("broker", queues)
    else:
        for name, depth in queues.items():
            table.add_row(name, str(depth))
    parts.append(table)
    table = Table("worker", "device", "memory used", "budget", "of device", "resident models", "sample age")
    for d in snap["devices"]:
        total = d["total_bytes"] or d["budget_bytes"]
        table.add_row(d["worker"] or "-", d["device"], f"{d['used_bytes'] / 2**30:.2f} GiB",
                      f"{d['budget_bytes'] / 2**30:.2f} GiB", f"{d['used_bytes'] / total:.0%}" if total else "-",
                      d["resident"] or "-", f"{d['age_s']:.0f}s")
    if not snap["devices"]:
        table.add_row("no worker has reported in the last 2 minutes", "", "", "", "", "", "")
    parts.append(table)
    table = Table("priority", "stage", "n", "p50 ms", "p95 ms", "queue ms", "compute ms", "failed",
                  title=f"last {snap['recent_s']:.0f}s", title_justify="left")
    for r in snap["latencies"]:
        table.add_row(r["priority"], r["stage"], str(r["n"]), f"{r['p50_ms']:.0f}", f"{r['p95_ms']:.0f}",
                      f"{r['queue_ms']:.0f}", f"{r['compute_ms']:.0f}", str(r["failed"]))
    parts.append(table)
    for a in snap["alerts"]:
        parts.append(f"[bold red]{a['state']} {a['severity']}[/] {a['rule']} {a['subject']}: {a['message']}")
    return Group(*parts)
