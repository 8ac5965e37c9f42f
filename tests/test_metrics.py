"""The worker's Prometheus endpoint, scraped over HTTP after real jobs: one endpoint for the worker's processes
(background consumer, urgent consumer, engine), values that match the jobs that ran."""

from __future__ import annotations

import json
import os
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.integration


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: dict, name: str, **labels: str) -> float:  # type: ignore[type-arg]
    """Sum of the samples of `name` whose labels include `labels`."""
    return sum(v for (n, ls), v in samples.items() if n == name and labels.items() <= dict(ls).items())


def test_metrics_after_real_jobs(worker, client, settings, ragq_home: Path) -> None:  # type: ignore[no-untyped-def]
    from ragq.demo import sample_paths
    from scheduler.budget import parse_size

    state = json.loads((ragq_home / "workers" / f"pytest@{os.uname().nodename}.json").read_text())
    port = state["metrics_port"]
    before = scrape(port)
    status = client.wait_for_job(client.submit_ingest(sample_paths()[:2]).job_id, timeout_s=240)
    reply = client.ask("how do urgent questions stay fast?", timeout_s=60)
    assert reply["answer"]
    after = scrape(port)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    model = reply["timings"]["embed"]["model"]
    new_chunks = status["chunks_added"]
    # the engine process: every new chunk and the question went through the embedder
    assert delta("ragq_items_total", role="embed", model=model, device="cpu") == new_chunks + 1
    assert delta("ragq_batch_size_count", role="embed") >= 2
    assert value(after, "ragq_model_resident", model=model, device="cpu") == 1
    assert value(after, "ragq_device_memory_budget_bytes", device="cpu") == parse_size(settings.cpu_budget)
    assert 0 < value(after, "ragq_device_memory_usage_ratio", device="cpu") <= 1
    # the background consumer's stages and the urgent consumer's (another process) in the same scrape
    assert delta("ragq_request_duration_seconds_count", stage="embed", priority="background") >= 1
    assert delta("ragq_request_duration_seconds_count", stage="embed", priority="urgent") == 1
    assert delta("ragq_request_duration_seconds_count", stage="search", priority="urgent") == 1
    assert delta("ragq_requests_total", stage="store", priority="background", outcome="ok") >= 1
    assert delta("ragq_request_queue_duration_seconds_sum", stage="embed", priority="urgent") >= 0
    # the broker's queues, read at scrape time: drained
    assert value(after, "ragq_queue_depth", queue="urgent") == 0
    assert ("ragq_queue_depth", (("queue", "background"),)) in after


def test_a_taken_metrics_port_falls_back_to_a_free_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import socket

    from workers.metrics import MULTIPROC_ENV, serve

    (tmp_path / "mp").mkdir()
    monkeypatch.setenv(MULTIPROC_ENV, str(tmp_path / "mp"))
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    taken = holder.getsockname()[1]
    try:
        port = serve(taken, "127.0.0.1", None, tmp_path / "w.json", {"worker": "w"})
        assert port != taken and json.loads((tmp_path / "w.json").read_text())["metrics_port"] == port
        assert urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).status == 200
    finally:
        holder.close()
