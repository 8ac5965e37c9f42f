"""Queue order with ragq's Celery settings, on a real Redis and a real worker: with N background tasks queued,
an urgent task queued after them starts before all of them except those the worker had already reserved."""

from __future__ import annotations

import time

import pytest

pytestmark = pytest.mark.integration


def test_urgent_task_overtakes_queued_background_tasks(worker, client, settings) -> None:  # type: ignore[no-untyped-def]
    from tasks.diagnostics import probe

    concurrency = settings.worker_concurrency
    total = max(20, 5 * concurrency)  # at least 20, and a backlog several times what the worker can reserve
    background = [probe.apply_async((f"b{i}", 0.25), queue="background") for i in range(total)]
    time.sleep(0.4)  # the worker is now busy with the background tasks it reserved
    urgent_sent = time.time()
    urgent = probe.apply_async(("urgent", 0.0), queue="urgent")
    u = urgent.get(timeout=60)
    b = [r.get(timeout=120) for r in background]

    started_before_urgent = [r for r in b if r["started"] < u["started"]]
    finished_before_sent = [r for r in b if r["finished"] < urgent_sent]
    reserved_at_send = concurrency  # prefetch multiplier 1: reserved == running
    assert len(started_before_urgent) <= len(finished_before_sent) + reserved_at_send, (
        f"urgent started after {len(started_before_urgent)} background tasks; "
        f"{len(finished_before_sent)} had finished and at most {reserved_at_send} were reserved when it was sent"
    )
    assert len(started_before_urgent) < total / 2  # most of the backlog ran after it


def test_urgent_work_never_waits_for_a_thread_held_by_background_work(worker, client, settings) -> None:  # type: ignore[no-untyped-def]
    # every background thread busy for seconds (ingestion waiting on the device looks like this to Celery): an
    # urgent task still starts at once, on the worker's urgent consumer
    from tasks.diagnostics import probe

    hold_s = 6.0
    busy = [probe.apply_async((f"b{i}", hold_s), queue="background")
            for i in range(settings.worker_concurrency + 4)]
    time.sleep(1.0)  # all background threads now hold a task
    sent = time.time()
    u = probe.apply_async(("urgent", 0.0), queue="urgent").get(timeout=30)
    assert u["started"] - sent < 2.0, f"the urgent task waited {u['started'] - sent:.1f}s for a thread"
    assert u["worker"].startswith(f"{worker.name}-urgent@")
    for r in busy:
        r.get(timeout=60)


def test_a_killed_urgent_consumer_is_replaced(worker, client) -> None:  # type: ignore[no-untyped-def]
    import os
    import signal

    import psutil

    def urgent_consumers() -> list[psutil.Process]:
        found = []
        for child in psutil.Process(worker.proc.pid).children():
            try:
                if child.status() != psutil.STATUS_ZOMBIE and "--attach" in child.cmdline():
                    found.append(child)
            except psutil.Error:  # gone, or a zombie not yet reaped
                continue
        return found

    (first,) = urgent_consumers()
    os.kill(first.pid, signal.SIGKILL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        now = [c for c in urgent_consumers() if c.pid != first.pid]
        if now:
            break
        time.sleep(0.5)
    assert now, "no new urgent consumer"
    reply = client.ask("does a question still get an answer?", timeout_s=90)  # the new consumer answers it
    assert reply["answer"]
