"""`ragq report`: numbers computed from known rows (dated in 2099, away from the session's real rows), the CLI on
the session's real data, and the HTML report rendered in headless Chromium with a screenshot."""

from __future__ import annotations

import json
import os
import shutil
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

T0 = datetime(2099, 6, 1, tzinfo=timezone.utc)


@pytest.fixture()
def db(db_engine):  # type: ignore[no-untyped-def]
    from tests.conftest import delete_rows_from

    delete_rows_from(db_engine, T0)
    yield db_engine
    delete_rows_from(db_engine, T0)


def known_rows(engine) -> None:  # type: ignore[no-untyped-def]
    from sqlalchemy import insert, text

    from ragq.core.db import Alert, DeviceSample, ModelEvent, StageTiming

    stages = []
    for i in range(1, 101):  # urgent embed: totals 1..100 ms (queue 0.1 i, load 0, compute 0.9 i)
        stages.append({"stage": "embed", "model": "m", "priority": "urgent", "outcome": "ok" if i > 2 else "error",
                       "finished_at": T0 + timedelta(seconds=i), "queue_ms": 0.1 * i, "load_ms": 0.0,
                       "compute_ms": 0.9 * i, "batch_size": 1, "items": 1, "tokens": 10})
    for i in range(10):  # background embed: 10 batches of 64 items, queue 300 ms, compute 100 ms
        stages.append({"stage": "embed", "model": "m", "priority": "background", "outcome": "ok",
                       "finished_at": T0 + timedelta(seconds=10 * i), "queue_ms": 300.0, "load_ms": 0.0,
                       "compute_ms": 100.0, "batch_size": 64, "items": 64, "tokens": 12800})
    streamed = []
    for i in range(1, 5):  # urgent generate: first tokens at 100..400 ms (streamed answers)
        streamed.append({"stage": "generate", "model": "g", "priority": "urgent", "outcome": "ok",
                       "finished_at": T0 + timedelta(seconds=i), "queue_ms": 1.0, "load_ms": 0.0,
                       "compute_ms": 1000.0, "first_token_ms": 100.0 * i, "batch_size": 4, "items": 1, "tokens": 50})
    events = [{"device": "cuda:0", "model": "m", "event": "wake", "ms": ms, "bytes": 2**30,
               "ts": T0 + timedelta(seconds=ms / 10)} for ms in (100.0, 200.0, 300.0)]
    events.append({"device": "cuda:0", "model": "m", "event": "sleep", "ms": 3.0, "bytes": 2**30,
                   "ts": T0 + timedelta(seconds=50)})
    samples = [{"worker": "w", "device": "cuda:0", "ts": T0 + timedelta(seconds=s), "used_bytes": used * 2**30,
                "budget_bytes": 16 * 2**30, "total_bytes": 80 * 2**30, "resident": "m"}
               for s, used in ((0, 8), (30, 12), (60, 10))]
    with engine.begin() as conn:
        conn.execute(insert(StageTiming), stages)
        conn.execute(insert(StageTiming), streamed)   # rows of one executemany share the first row's columns
        conn.execute(insert(ModelEvent), events)
        conn.execute(insert(DeviceSample), samples)
        conn.execute(text(
            "INSERT INTO worker_starts (worker, device, pid, started_at, consuming_s, restored) "
            "VALUES ('w@h', 'cpu', 1, :a, 4.0, 0), ('w@h', 'cpu', 2, :b, 6.0, 2), ('w@h', 'cpu', 3, :c, 20.0, 0)"),
            {"a": T0, "b": T0 + timedelta(seconds=60), "c": T0 + timedelta(seconds=120)})
        conn.execute(insert(Alert).values(rule="vram_usage", subject="w cuda:0", severity="warning", state="resolved",
                                          value=0.85, threshold=0.8, message="85 %", started_at=T0,
                                          updated_at=T0, fired_at=T0, resolved_at=T0 + timedelta(seconds=90)))


def test_numbers_from_known_rows(db) -> None:  # type: ignore[no-untyped-def]
    from ragq.report import build

    known_rows(db)
    report = build(db, T0, T0 + timedelta(seconds=200))
    by = {(r["priority"], r["stage"]): r for r in report["stages"]}
    urgent = by[("urgent", "embed")]
    assert urgent["count"] == 100 and urgent["errors"] == 2
    assert urgent["total_ms"] == pytest.approx({"p50": 50.5, "p90": 90.1, "p99": 99.01})
    assert urgent["queue_ms"]["p50"] == pytest.approx(5.05) and urgent["compute_ms"]["p50"] == pytest.approx(45.45)
    assert urgent["queue_over_compute"] == pytest.approx(0.1 / 0.9)
    assert urgent["first_token_ms"]["p50"] is None   # embeds stream nothing
    assert by[("urgent", "generate")]["first_token_ms"]["p50"] == pytest.approx(250.0)
    background = by[("background", "embed")]
    assert background["items"] == 640 and background["items_per_s"] == pytest.approx(640 / 200)
    assert background["batch_mean"] == 64 and background["batch_max"] == 64
    assert background["queue_over_compute"] == pytest.approx(3.0)
    wake = next(e for e in report["model_events"] if e["event"] == "wake")
    assert wake["count"] == 3 and wake["ms_p50"] == 200 and wake["ms_max"] == 300 and wake["ms_sum"] == 600
    memory = report["device_memory"][0]
    assert memory["used_max"] == 12 * 2**30 and memory["samples"] == 3
    assert [a["rule"] for a in report["alerts"]] == ["vram_usage"]
    from ragq.report import start_table_rows

    # three starts of one consumer: two of them restarts, from start to consuming 4, 6 and 20 s
    assert start_table_rows(report) == [["w@h", "3", "2", "6.0", "20.0", "2", "2099-06-01 00:02:00"]]
    empty = build(db, T0 + timedelta(days=1), T0 + timedelta(days=2))
    assert empty["stages"] == [] and empty["model_events"] == []


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian chromium is not installed")
def test_the_html_report_renders_in_headless_chromium(db, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from ragq.report import build, render_html, series
    from tests.conftest import run_chromium

    known_rows(db)
    until = T0 + timedelta(seconds=200)
    page = tmp_path / "report.html"
    page.write_text(render_html(build(db, T0, until), series(db, T0, until)))
    dom = run_chromium(tmp_path, "--dump-dom", page.as_uri(), timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    for plot in ("plot-latency", "plot-queue_vs_compute", "plot-memory"):
        assert f'id="{plot}"' in dom.stdout and "<svg" in dom.stdout
    shot = tmp_path / "report.png"
    run_chromium(tmp_path, "--window-size=1280,2400", f"--screenshot={shot}", page.as_uri(), timeout=120) \
        .check_returncode()
    assert shot.stat().st_size > 20_000  # a page with plots, not a blank one
    from PIL import Image

    with Image.open(shot) as image:
        assert image.size == (1280, 2400)
        colours = image.convert("RGB").getcolors(maxcolors=1_000_000)
        assert colours is not None and len(colours) > 50  # lines, text and bars, not a blank page


@pytest.mark.integration
def test_report_cli_on_the_sessions_jobs(worker, client, ragq_home, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from ragq.demo import sample_paths
    from tests.conftest import ragq_env, run_ragq

    client.wait_for_job(client.submit_ingest(sample_paths()[:1]).job_id, timeout_s=240)
    client.ask("what is pgvector?", timeout_s=60)
    env = ragq_env(ragq_home)
    out = run_ragq(env, "report", "--since", "2h", "--json")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    stages = {(r["priority"], r["stage"]) for r in data["stages"]}
    assert {("urgent", "embed"), ("urgent", "search"), ("background", "embed"), ("background", "store")} <= stages
    # the session's worker recorded its two consumers' starts, with their start-up phases
    starts = {r["worker"]: r for r in data["worker_starts"] if r["worker"].startswith(f"{worker.name}")}
    host = os.uname().nodename
    assert {f"{worker.name}@{host}", f"{worker.name}-urgent@{host}"} <= set(starts), data["worker_starts"]
    main = starts[f"{worker.name}@{host}"]
    assert 0 < main["consuming_s"] < 600 and {"imports", "services", "schema", "engine process"} <= set(main["phases"])
    log = worker.log_path.read_text(errors="replace")
    assert "start-up: engine process" in log and "consuming background" in log   # one line per phase
    assert "engine on the CPU: " in log and "torch thread(s) of" in log   # the intra-op threads it chose
    text = run_ragq(env, "report", "--since", "2h", "--html", str(tmp_path / "r.html"))
    assert text.returncode == 0 and "stages" in text.stdout and (tmp_path / "r.html").stat().st_size > 1000
    assert "worker starts" in text.stdout and f"{worker.name}-urgent@" in text.stdout
    bad = run_ragq(env, "report", "--html", str(tmp_path / "missing" / "r.html"))
    assert bad.returncode == 2 and "cannot write the HTML report" in bad.stderr + bad.stdout
    assert not (tmp_path / "missing").exists()  # nothing half-written


@pytest.mark.integration
def test_top_shows_queues_devices_and_latencies(worker, client, ragq_home) -> None:  # type: ignore[no-untyped-def]
    import os

    from tests.conftest import ragq_env, run_ragq

    client.ask("what does the engine do?", timeout_s=60)
    env = ragq_env(ragq_home)
    out = run_ragq(env, "top", "--once", "--json")
    assert out.returncode == 0, out.stderr
    frame = json.loads(out.stdout)
    assert set(frame["queues"]) == {"urgent", "background"}
    mine = [d for d in frame["devices"] if d["worker"] == f"pytest@{os.uname().nodename}"]
    assert mine and mine[0]["device"] == "cpu" and mine[0]["resident"] and mine[0]["age_s"] < 60
    assert any(r["priority"] == "urgent" and r["stage"] == "embed" for r in frame["latencies"])
    text = run_ragq(env, "top", "--once")
    assert text.returncode == 0 and "urgent" in text.stdout and "resident" in text.stdout
    assert run_ragq(env, "top", "--interval", "0").returncode == 2
