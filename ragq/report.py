"""`ragq report`: what the stage_timings, model_events, device_samples and alerts tables say about a time window.

`build(db, since, until)` computes the numbers in SQL (percentiles with percentile_cont); `render_text`, the JSON
output and `render_html` (inline SVG plots from matplotlib: latency distributions, queue vs compute over time,
device memory and residency) only present them.
"""

from __future__ import annotations

import html
import io
from datetime import datetime, timedelta
from typing import Any

QUANTILES = (0.5, 0.9, 0.99)


def _rows(conn: Any, sql: str, **params: Any) -> list[dict[str, Any]]:
    from sqlalchemy import text

    return [dict(r) for r in conn.execute(text(sql), params).mappings()]


def build(db: Any, since: datetime, until: datetime) -> dict[str, Any]:
    window = {"since": since, "until": until}
    seconds = max((until - since).total_seconds(), 1e-9)
    with db.connect() as conn:
        stages = _rows(conn, """
            SELECT coalesce(model, '-') AS model, stage, priority, count(*) AS count,
                   count(*) FILTER (WHERE outcome = 'error') AS errors,
                   count(*) FILTER (WHERE outcome = 'expired') AS expired,
                   sum(items) AS items, sum(tokens) AS tokens,
                   percentile_cont(ARRAY[0.5, 0.9, 0.99]) WITHIN GROUP (ORDER BY queue_ms + load_ms + compute_ms)
                     AS total_ms,
                   percentile_cont(ARRAY[0.5, 0.9, 0.99]) WITHIN GROUP (ORDER BY queue_ms) AS queue_ms,
                   percentile_cont(ARRAY[0.5, 0.9, 0.99]) WITHIN GROUP (ORDER BY compute_ms) AS compute_ms,
                   percentile_cont(ARRAY[0.5, 0.9, 0.99]) WITHIN GROUP (ORDER BY first_token_ms)
                     FILTER (WHERE first_token_ms IS NOT NULL) AS first_token_ms,
                   sum(queue_ms) AS queue_ms_sum, sum(load_ms) AS load_ms_sum, sum(compute_ms) AS compute_ms_sum,
                   avg(batch_size) FILTER (WHERE batch_size > 0) AS batch_mean,
                   percentile_cont(0.5) WITHIN GROUP (ORDER BY batch_size) FILTER (WHERE batch_size > 0)
                     AS batch_p50,
                   max(batch_size) AS batch_max,
                   min(finished_at) AS first, max(finished_at) AS last
            FROM stage_timings WHERE finished_at >= :since AND finished_at < :until
            GROUP BY 1, 2, 3 ORDER BY 3 DESC, 2, 1""", **window)
        for row in stages:
            for key in ("total_ms", "queue_ms", "compute_ms", "first_token_ms"):
                row[key] = dict(zip(("p50", "p90", "p99"), row[key] or (None,) * 3))
            row["items_per_s"] = (row["items"] or 0) / seconds
            row["tokens_per_s"] = (row["tokens"] or 0) / seconds
            row["queue_over_compute"] = (row["queue_ms_sum"] / row["compute_ms_sum"]) if row["compute_ms_sum"] else None
        models = _rows(conn, """
            SELECT device, model, event, count(*) AS count, sum(bytes) AS bytes,
                   percentile_cont(0.5) WITHIN GROUP (ORDER BY ms) AS ms_p50, max(ms) AS ms_max, sum(ms) AS ms_sum
            FROM model_events WHERE ts >= :since AND ts < :until GROUP BY 1, 2, 3 ORDER BY 1, 2, 3""", **window)
        memory = _rows(conn, """
            SELECT worker, device, max(used_bytes) AS used_max, avg(used_bytes) AS used_mean,
                   max(budget_bytes) AS budget_bytes, max(total_bytes) AS total_bytes, count(*) AS samples
            FROM device_samples WHERE ts >= :since AND ts < :until GROUP BY 1, 2 ORDER BY 1, 2""", **window)
        alerts = _rows(conn, """
            SELECT rule, subject, severity, state, message, started_at, fired_at, resolved_at FROM alerts
            WHERE started_at < :until AND (resolved_at IS NULL OR resolved_at >= :since) ORDER BY started_at""",
                       **window)
        starts = _rows(conn, """
            SELECT s.worker, s.device, s.pid, s.started_at, s.consuming_s, s.restored, s.phases,
                   EXISTS (SELECT 1 FROM worker_starts e WHERE e.worker = s.worker AND e.started_at < s.started_at)
                     AS restart
            FROM worker_starts s WHERE s.started_at >= :since AND s.started_at < :until
            ORDER BY s.started_at""", **window)
    return {"since": since, "until": until, "stages": stages, "model_events": models, "device_memory": memory,
            "alerts": alerts, "worker_starts": starts}


def series(db: Any, since: datetime, until: datetime) -> dict[str, list[dict[str, Any]]]:
    """The raw points the HTML plots need (capped, newest kept)."""
    window = {"since": since, "until": until}
    with db.connect() as conn:
        return {
            "stages": _rows(conn, """
                SELECT * FROM (SELECT stage, priority, finished_at, queue_ms, load_ms, compute_ms
                               FROM stage_timings WHERE finished_at >= :since AND finished_at < :until
                               ORDER BY finished_at DESC LIMIT 200000) s ORDER BY finished_at""", **window),
            "memory": _rows(conn, """
                SELECT worker, device, ts, used_bytes, budget_bytes, total_bytes, resident FROM device_samples
                WHERE ts >= :since AND ts < :until ORDER BY ts LIMIT 200000""", **window),
            "events": _rows(conn, """
                SELECT device, model, event, ts, ms FROM model_events WHERE ts >= :since AND ts < :until
                ORDER BY ts LIMIT 200000""", **window),
        }


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}" if value >= 100 else f"{value:.1f}"


def stage_table_rows(report: dict[str, Any]) -> list[list[str]]:
    rows = []
    for r in report["stages"]:
        rows.append([
            r["priority"], r["stage"], r["model"], str(r["count"]), str(r["errors"]),
            _ms(r["total_ms"]["p50"]), _ms(r["total_ms"]["p90"]), _ms(r["total_ms"]["p99"]),
            _ms(r["queue_ms"]["p50"]), _ms(r["compute_ms"]["p50"]), _ms(r["first_token_ms"]["p50"]),
            "-" if r["queue_over_compute"] is None else f"{r['queue_over_compute']:.2f}",
            f"{r['items_per_s']:.2f}", "-" if r["batch_mean"] is None else f"{r['batch_mean']:.1f}",
        ])
    return rows


STAGE_HEADERS = ["priority", "stage", "model", "n", "errors", "p50 ms", "p90 ms", "p99 ms", "queue p50",
                 "compute p50", "first token p50", "queue/compute", "items/s", "batch mean"]
MODEL_HEADERS = ["device", "model", "event", "count", "p50 ms", "max ms", "total s"]
START_HEADERS = ["worker", "starts", "restarts", "consuming after p50 s", "max s", "tasks put back", "last start"]


def start_table_rows(report: dict[str, Any]) -> list[list[str]]:
    """Per consumer: how often it started in the window, how many of those were restarts (it had started before),
    and how long each took from its process's start to consuming."""
    import statistics

    by_worker: dict[str, list[dict[str, Any]]] = {}
    for row in report.get("worker_starts", []):
        by_worker.setdefault(row["worker"], []).append(row)
    rows = []
    for worker, starts in sorted(by_worker.items()):
        times = [r["consuming_s"] for r in starts]
        rows.append([worker, str(len(starts)), str(sum(1 for r in starts if r["restart"])),
                     f"{statistics.median(times):.1f}", f"{max(times):.1f}", str(sum(r["restored"] for r in starts)),
                     f"{starts[-1]['started_at']:%Y-%m-%d %H:%M:%S}"])
    return rows


def model_table_rows(report: dict[str, Any]) -> list[list[str]]:
    return [[r["device"] or "-", r["model"], r["event"], str(r["count"]), _ms(r["ms_p50"]), _ms(r["ms_max"]),
             f"{(r['ms_sum'] or 0) / 1000:.1f}"] for r in report["model_events"]]


def render_text(report: dict[str, Any], console: Any) -> None:
    from rich.table import Table

    console.print(f"ragq report {report['since']:%Y-%m-%d %H:%M:%S} → {report['until']:%Y-%m-%d %H:%M:%S} UTC")
    if not report["stages"]:
        console.print("no stages finished in this window")
    else:
        table = Table(*STAGE_HEADERS, title="stages (latency = queue + load + compute)")
        for row in stage_table_rows(report):
            table.add_row(*row)
        console.print(table)
    if report["model_events"]:
        table = Table(*MODEL_HEADERS, title="models: loads, wakes, evictions")
        for row in model_table_rows(report):
            table.add_row(*row)
        console.print(table)
    if report.get("worker_starts"):
        table = Table(*START_HEADERS, title="worker starts (time from the process's start to consuming)")
        for row in start_table_rows(report):
            table.add_row(*row)
        console.print(table)
    for m in report["device_memory"]:
        total = m["total_bytes"] or m["budget_bytes"]
        console.print(f"{m['device']} on {m['worker']}: peak {m['used_max'] / 2**30:.2f} GiB of "
                      f"{total / 2**30:.2f} GiB ({m['used_max'] / total:.0%}), budget {m['budget_bytes'] / 2**30:.2f} GiB")
    for a in report["alerts"]:
        console.print(f"alert {a['state']} [{a['severity']}] {a['rule']} {a['subject']}: {a['message']}")


def _svg(fig: Any) -> str:
    buffer = io.StringIO()
    fig.savefig(buffer, format="svg", bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    text = buffer.getvalue()
    return text[text.index("<svg"):]


def plots(points: dict[str, list[dict[str, Any]]]) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out: dict[str, str] = {}
    stages = points["stages"]
    if stages:
        fig, ax = plt.subplots(figsize=(9, 3.6))
        groups: dict[tuple[str, str], list[float]] = {}
        for r in stages:
            groups.setdefault((r["priority"], r["stage"]), []).append(r["queue_ms"] + r["load_ms"] + r["compute_ms"])
        labels = [f"{p} {s}" for p, s in groups]
        ax.boxplot([sorted(v) for v in groups.values()], orientation="horizontal", whis=(1, 99), showfliers=False)
        ax.set_yticks(range(1, len(labels) + 1), labels)
        ax.set_xscale("log")
        ax.set_xlabel("stage latency, ms (box: p25–p75, whiskers: p1–p99)")
        out["latency"] = _svg(fig)

        start = stages[0]["finished_at"]
        span = max((stages[-1]["finished_at"] - start).total_seconds(), 1.0)
        width = max(span / 60, 1.0)
        bins: dict[tuple[str, int], list[float]] = {}
        for r in stages:
            key = (r["priority"], int((r["finished_at"] - start).total_seconds() // width))
            acc = bins.setdefault(key, [0.0, 0.0])
            acc[0] += r["queue_ms"] / 1000.0
            acc[1] += r["compute_ms"] / 1000.0
        fig, ax = plt.subplots(figsize=(9, 3.2))
        for priority in sorted({p for p, _ in bins}):
            xs = sorted(b for p, b in bins if p == priority)
            ax.plot([x * width for x in xs], [bins[(priority, x)][0] for x in xs], label=f"queue {priority}")
            ax.plot([x * width for x in xs], [bins[(priority, x)][1] for x in xs], "--", label=f"compute {priority}")
        ax.set_xlabel(f"seconds since {start:%H:%M:%S} (bins of {width:.0f}s)")
        ax.set_ylabel("seconds")
        ax.legend(fontsize=8)
        out["queue_vs_compute"] = _svg(fig)
    memory = points["memory"]
    if memory:
        fig, ax = plt.subplots(figsize=(9, 3.6))
        t0 = memory[0]["ts"]
        for key in sorted({(m["worker"], m["device"]) for m in memory}):
            mine = [m for m in memory if (m["worker"], m["device"]) == key]
            ax.step([(m["ts"] - t0).total_seconds() for m in mine], [m["used_bytes"] / 2**30 for m in mine],
                    where="post", label=f"used {key[1]} {key[0]}")
            ax.axhline(mine[-1]["budget_bytes"] / 2**30, linestyle=":", color="grey")
        events = [e for e in points["events"] if e["event"] in ("load", "wake", "sleep", "unload")]
        models = sorted({e["model"] for e in events})
        top = max(m["used_bytes"] for m in memory) / 2**30 or 1.0
        for i, model in enumerate(models):  # residency bands above the memory line
            since = None
            y = top * (1.08 + 0.08 * i)
            for e in (e for e in events if e["model"] == model):
                x = (e["ts"] - t0).total_seconds()
                if e["event"] in ("load", "wake") and since is None:
                    since = x
                elif e["event"] in ("sleep", "unload") and since is not None:
                    ax.plot([since, x], [y, y], linewidth=5, solid_capstyle="butt")
                    since = None
            if since is not None:
                ax.plot([since, (memory[-1]["ts"] - t0).total_seconds()], [y, y], linewidth=5, solid_capstyle="butt")
            ax.text(0, y, f" {model}", va="bottom", fontsize=7)
        ax.set_xlabel(f"seconds since {t0:%H:%M:%S}")
        ax.set_ylabel("GiB (dotted: budget; bars: models resident)")
        ax.legend(fontsize=8, loc="lower right")
        out["memory"] = _svg(fig)
    return out


def _table(headers: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def render_html(report: dict[str, Any], points: dict[str, list[dict[str, Any]]]) -> str:
    figures = plots(points)
    sections = [f"<h1>ragq report</h1><p>{report['since']:%Y-%m-%d %H:%M:%S} → {report['until']:%Y-%m-%d %H:%M:%S} "
                "UTC</p>", "<h2>Stages</h2>",
                _table(STAGE_HEADERS, stage_table_rows(report)) if report["stages"] else "<p>no stages</p>"]
    for key, title in (("latency", "Latency distributions"), ("queue_vs_compute", "Queue vs compute over time"),
                       ("memory", "Device memory and residency")):
        if key in figures:
            sections.append(f'<h2>{title}</h2><div class="plot" id="plot-{key}">{figures[key]}</div>')
    sections.append("<h2>Models</h2>")
    sections.append(_table(MODEL_HEADERS, model_table_rows(report)) if report["model_events"] else "<p>no events</p>")
    sections.append("<h2>Worker starts</h2>")
    sections.append(_table(START_HEADERS, start_table_rows(report)) if report.get("worker_starts")
                    else "<p>none</p>")
    sections.append("<h2>Alerts</h2>")
    sections.append(_table(["state", "severity", "rule", "subject", "message"],
                           [[a["state"], a["severity"], a["rule"], a["subject"], a["message"]]
                            for a in report["alerts"]]) if report["alerts"] else "<p>none</p>")
    style = ("body{font-family:sans-serif;margin:2em;max-width:70em}table{border-collapse:collapse;font-size:13px}"
             "td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}th{background:#f3f3f3}"
             ".plot svg{max-width:100%;height:auto}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>ragq report</title><style>{style}</style>"
            f"</head><body>{''.join(sections)}</body></html>")


def to_json(report: dict[str, Any]) -> dict[str, Any]:
    def convert(value: Any) -> Any:
        if isinstance(value, datetime):
            return value.isoformat()
        if isinstance(value, timedelta):
            return value.total_seconds()
        if isinstance(value, dict):
            return {k: convert(v) for k, v in value.items()}
        if isinstance(value, list):
            return [convert(v) for v in value]
        if hasattr(value, "__float__") and not isinstance(value, (int, float, bool)):
            return float(value)
        return value

    return convert(report)
