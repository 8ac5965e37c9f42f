"""OpenTelemetry tracing across processes: a question's spans (client, both Celery hops, each stage) and an
ingestion's spans share one trace. Uses its own worker on its own Redis database so that every task of these
jobs runs where spans are recorded; spans come as JSON lines in a file (RAGQ_TRACING=console)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration


def read_spans(path: Path) -> list[dict]:  # type: ignore[type-arg]
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def wait_for(path: Path, predicate, timeout_s: float = 60.0) -> list[dict]:  # type: ignore[no-untyped-def,type-arg]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        spans = read_spans(path)
        if predicate(spans):
            return spans
        time.sleep(0.5)
    raise AssertionError(f"spans never matched; got {[s['name'] for s in read_spans(path)]}")


def test_one_trace_per_question_and_per_job(settings, ragq_home, tmp_path_factory) -> None:  # type: ignore[no-untyped-def]
    from ragq.demo import sample_paths
    from ragq.core.services import ensure_services
    from tests.conftest import WorkerProcess, ragq_env, run_ragq

    base = ensure_services(settings).broker_url.rsplit("/", 1)[0]
    trace_file = tmp_path_factory.mktemp("traces") / "spans.jsonl"
    env = ragq_env(ragq_home, RAGQ_TRACING="console", RAGQ_TRACE_FILE=str(trace_file),
                   RAGQ_BROKER_URL=f"{base}/5", RAGQ_RESULT_BACKEND=f"{base}/5")
    worker = WorkerProcess(env, "traced", tmp_path_factory.mktemp("logs") / "traced.log")
    try:
        from celery import Celery

        probe_app = Celery(broker=f"{base}/5")
        worker.wait_ready(probe_app)
        out = run_ragq(env, "ask", "what keeps urgent questions fast?", "--json")
        assert out.returncode == 0, out.stderr

        def question_done(spans: list[dict]) -> bool:  # type: ignore[type-arg]
            return {"ask", "embed", "search"} <= {s["name"] for s in spans}

        spans = wait_for(trace_file, question_done)
        ask = next(s for s in spans if s["name"] == "ask")
        trace_id = ask["context"]["trace_id"]
        mine = [s for s in spans if s["context"]["trace_id"] == trace_id]
        names = {s["name"] for s in mine}
        assert {"ask", "embed", "search"} <= names, names
        assert any(s["name"].startswith("run/ragq.query.") for s in mine)  # the Celery hops, in the same trace
        services = {s["resource"]["attributes"]["service.name"] for s in mine}
        host = os.uname().nodename
        assert services == {"ragq-client", f"ragq-worker-traced-urgent@{host}"}, services  # client and urgent consumer
        embed = next(s for s in mine if s["name"] == "embed")
        assert embed["attributes"]["ragq.priority"] == "urgent" and embed["attributes"]["ragq.items"] == 1

        out = run_ragq(env, "ingest", str(sample_paths()[0]), "--wait", "--json")
        assert out.returncode == 0, out.stderr
        spans = wait_for(trace_file, lambda s: {"ingest", "chunk", "store"} <= {x["name"] for x in s})
        root = next(s for s in spans if s["name"] == "ingest")
        job = [s for s in spans if s["context"]["trace_id"] == root["context"]["trace_id"]]
        assert {"ingest", "chunk", "store"} <= {s["name"] for s in job}, job
        assert f"ragq-worker-traced@{host}" in {s["resource"]["attributes"]["service.name"] for s in job}
    finally:
        worker.stop()


def test_tracing_off_installs_nothing() -> None:
    from ragq.core import tracing

    with tracing.span("embed", items=3) as span:
        assert span is None


def test_an_unwritable_trace_file_is_a_clear_config_error(ragq_home, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from tests.conftest import ragq_env, run_ragq

    env = ragq_env(ragq_home, RAGQ_TRACING="console", RAGQ_TRACE_FILE=str(tmp_path / "missing" / "spans.jsonl"))
    out = run_ragq(env, "ask", "anything?", "--timeout", "5")
    assert out.returncode == 2 and "RAGQ_TRACE_FILE: cannot append to" in out.stderr + out.stdout


def test_an_unknown_tracing_mode_is_a_config_error(ragq_home) -> None:  # type: ignore[no-untyped-def]
    from tests.conftest import ragq_env, run_ragq

    out = run_ragq(ragq_env(ragq_home, RAGQ_TRACING="jaeger"), "alerts")
    assert out.returncode == 2 and "RAGQ_TRACING" in out.stderr + out.stdout
